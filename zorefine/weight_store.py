"""How the ZO engine moves a weight to θ + α·z and back to θ exactly.

Two stores, one interface:

- :class:`MasterCopy` keeps an fp32 copy of θ. Every move is one fused ``θ + α·z`` written
  straight into the weight, and restoring is a copy. Fastest; costs 4 bytes per weight, and is
  the only choice for bf16/fp16 weights, whose own precision would lose small updates.
- :class:`CompensatedShift` (fp32 weights only) moves the weight in place and keeps just what
  rounding destroys: the low byte of each θ's bit pattern, plus the exact value of the rare
  entries where ``|α·z|`` dwarfs ``|θ|``. Undoing a move by subtraction lands within a few
  units in the last place of θ; the saved low byte says exactly where. Costs about 1 byte per
  weight instead of 4, for a few more elementwise passes per move.

Both produce bit-identical weights for the same sequence of moves and updates, because the
update itself is the same ``θ.add_(z, alpha=c)`` on an exact fp32 θ in both.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

Draw = Callable[[int], torch.Tensor]
STORES = ("copy", "compensated")

# A move of size |δ| ≤ 16·|θ| is undone by subtraction to within 34 bit-pattern steps of θ
# (≤ 5 binades of rounding up, ≤ 1 down), well inside the ±127 one signed byte corrects.
# Entries with larger relative moves (θ ≈ 0) are saved exactly instead.
_RELATIVE_MOVE_LIMIT = 16.0
_LOW_BYTE = 0 if sys.byteorder == "little" else 3
# Bookkeeping runs over slices of this many entries, so its temporaries stay a few MB even for
# an embedding matrix (the point of this store is memory).
_CHUNK = 1 << 20


@dataclass
class _Offset:
    seed: int
    alpha: float


class MasterCopy:
    """A weight whose exact value θ lives in an fp32 master copy."""

    def __init__(self, param: torch.Tensor, draw: Draw) -> None:
        self.param, self._draw = param, draw
        self.master = param.detach().to(torch.float32).clone()
        self._in_place = param.dtype == torch.float32

    def theta(self) -> torch.Tensor:
        """θ in fp32 (the master copy itself: do not modify)."""
        return self.master

    def shift(self, seed: int, alpha: float) -> None:
        """Set the weight to ``θ + alpha·z(seed)``, from whatever offset it had."""
        z = self._draw(seed)
        if self._in_place:
            # Written straight into the weight: no temporary the size of the tensor.
            torch.add(self.master, z, alpha=alpha, out=self.param.data)
        else:
            self.param.data.copy_(self.master.add(z, alpha=alpha))

    def settle(self) -> None:
        """Write θ back into the weight (exact)."""
        self.param.data.copy_(self.master)

    def update_along(self, seed: int, coeff: float) -> None:
        """``θ ← θ + coeff·z(seed)`` and write it: the restore fused into the update."""
        self.master.add_(self._draw(seed), alpha=coeff)
        self.param.data.copy_(self.master)

    def update_by(self, direction: torch.Tensor, coeff: float) -> None:
        """``θ ← θ + coeff·direction`` and write it."""
        self.master.add_(direction, alpha=coeff)
        self.param.data.copy_(self.master)


class CompensatedShift:
    """An fp32 weight moved in place and restored bit for bit from about 1 byte per entry."""

    def __init__(self, param: torch.Tensor, draw: Draw) -> None:
        if param.dtype != torch.float32 or not param.is_contiguous():
            raise ValueError("CompensatedShift needs a contiguous float32 tensor")
        self.param, self._draw = param, draw
        self._flat = param.data.view(-1)
        self._bits = self._flat.view(torch.int32)
        self._offset: _Offset | None = None
        self._low: torch.Tensor | None = None  # low bytes of θ; valid until θ changes
        self._exact_for: tuple[int, float] | None = None  # (seed, |alpha|) the exceptions cover
        self._exact_index = torch.empty(0, dtype=torch.long, device=param.device)
        self._exact_value = torch.empty(0, dtype=torch.float32, device=param.device)

    def theta(self) -> torch.Tensor:
        """θ in fp32: settles the weight first and returns it."""
        self.settle()
        return self.param.data

    def _low_bytes(self) -> torch.Tensor:
        return self._flat.view(torch.uint8)[_LOW_BYTE::4]

    def _remember(self, seed: int, alpha: float, z: torch.Tensor) -> None:
        """Save what a move of ``alpha·z`` from θ (the current weight) would destroy."""
        if self._low is None:
            self._low = self._low_bytes().clone()
        if self._exact_for != (seed, abs(alpha)):
            z_flat, found = z.view(-1), []
            for start in range(0, self._flat.numel(), _CHUNK):
                end = start + _CHUNK
                moved = z_flat[start:end].abs().mul_(abs(alpha))
                large = self._flat[start:end].abs().mul_(_RELATIVE_MOVE_LIMIT).lt_(moved)
                found.append(large.nonzero().squeeze(1).add_(start))
            self._exact_index = torch.cat(found)
            self._exact_value = self._flat[self._exact_index].clone()
            self._exact_for = (seed, abs(alpha))

    def _undo(self, z: torch.Tensor) -> None:
        """Take the current offset off the weight, landing on θ exactly."""
        assert self._offset is not None and self._low is not None
        self._flat.add_(z.view(-1), alpha=-self._offset.alpha)
        low_now = self._low_bytes()
        for start in range(0, self._flat.numel(), _CHUNK):
            end = start + _CHUNK
            # Wrapping uint8 difference, read as signed: how many bit-pattern steps to θ.
            correction = (self._low[start:end] - low_now[start:end]).view(torch.int8)
            self._bits[start:end].add_(correction.to(torch.int32))
        self._flat[self._exact_index] = self._exact_value
        self._offset = None

    def _settle_reusing(self, seed: int, z: torch.Tensor) -> None:
        """Back to θ; ``z`` is ``z(seed)``, reused when the current offset has the same seed."""
        if self._offset is not None:
            self._undo(z if self._offset.seed == seed else self._draw(self._offset.seed))

    def shift(self, seed: int, alpha: float) -> None:
        """Set the weight to ``θ + alpha·z(seed)``, from whatever offset it had."""
        z = self._draw(seed)
        self._settle_reusing(seed, z)
        self._remember(seed, alpha, z)
        self._flat.add_(z.view(-1), alpha=alpha)
        self._offset = _Offset(seed, alpha)

    def settle(self) -> None:
        """Bring the weight back to θ exactly."""
        if self._offset is not None:
            self._undo(self._draw(self._offset.seed))

    def _forget(self) -> None:
        self._low, self._exact_for = None, None

    def update_along(self, seed: int, coeff: float) -> None:
        """``θ ← θ + coeff·z(seed)``; when the weight sits at ``θ + α·z(seed)``, one draw."""
        z = self._draw(seed)
        self._settle_reusing(seed, z)
        self._flat.add_(z.view(-1), alpha=coeff)
        self._forget()

    def update_by(self, direction: torch.Tensor, coeff: float) -> None:
        """``θ ← θ + coeff·direction``."""
        self.settle()
        self._flat.add_(direction.view(-1), alpha=coeff)
        self._forget()


def make_store(kind: str, param: torch.Tensor, draw: Draw) -> MasterCopy | CompensatedShift:
    """The store of ``kind`` for ``param``; half-precision weights always get a master copy."""
    if kind not in STORES:
        raise ValueError(f"store must be one of {STORES}, got {kind!r}")
    if kind == "compensated" and param.dtype == torch.float32 and param.is_contiguous():
        return CompensatedShift(param, draw)
    return MasterCopy(param, draw)
