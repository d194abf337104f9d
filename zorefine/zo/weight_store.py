"""How the ZO engine moves a weight to θ + α·z and back to θ exactly.

Two stores, one interface:

- :class:`MasterCopy` keeps an fp32 copy of θ. Every move is one fused ``θ + α·z`` written
  straight into the weight, and restoring is a copy. Fastest; costs 4 bytes per weight, and is
  the only choice for bf16/fp16 weights, whose own precision would lose small updates.
- :class:`InPlaceShift` (fp32 weights only) keeps nothing: a move adds ``α·z`` to the weight
  and undoing it adds ``−α·z``, so θ drifts by rounding (a few units in the last place per
  step, as likely up as down). No restore is bit-exact, but the arithmetic is deterministic:
  replay runs the same moves (without the forward passes) and lands on the same bits.
- :class:`CompensatedShift` (fp32 weights only) moves the weight in place and keeps just what
  rounding destroys: the low 4 bits of each θ's bit pattern, plus the exact value of the
  entries where ``|α·z|`` exceeds ``2|θ|``. Undoing a move by subtraction lands within 5
  bit-pattern steps of θ; the saved 4 bits say exactly where. Costs about half a byte per
  weight (plus 8 bytes per exception) instead of 4, for a few more elementwise passes per move.

Every move streams the direction chunk by chunk (:class:`zorefine.zo.directions.Direction`), so no
temporary the size of a tensor is made. Both stores produce bit-identical weights for the same
sequence of moves and updates, because the update itself is the same ``θ.add_(z, alpha=c)``
on an exact fp32 θ in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from zorefine.zo.directions import Direction, scratch_buffer

DirectionOf = Callable[[int], Direction]
STORES = ("copy", "compensated", "inplace")

# Why 4 bits suffice: for |δ| ≤ 2|θ|, s = fl(θ + δ) has |s| ≤ 3|θ|, at most 2 binades above θ,
# so |fl(s − δ) − θ| ≤ ulp(s)/2 + ulp(t)/2 ≤ 2.5 ulp(θ): at most 2 bit-pattern steps within
# θ's binade and 5 when the result drops into the binade below (steps there are half as
# large). A signed 4-bit residue (−8..7) therefore pins θ down. Entries with larger relative
# moves (θ ≈ 0) are saved exactly instead.
_RELATIVE_MOVE_LIMIT = 2.0
_NIBBLE = 0xF


@dataclass
class _Offset:
    seed: int
    alpha: float


class MasterCopy:
    """A weight whose exact value θ lives in an fp32 master copy.

    An update can be *deferred* (``update_along(..., defer=True)``): nothing is written until the
    next move, which then applies it in the same pass over the weight as its own perturbation
    (``θ ← θ + c·z_t``, then weight ← ``θ + α·z_{t+1}``, chunk by chunk while both are in cache).
    That saves one read of θ and one write of the weight per step. θ is the same either way:
    the update is the same ``add_`` on the same chunks in the same order. Until then the weight
    still sits where the last move left it; :meth:`settle` (or :meth:`theta`) applies it.
    """

    replays_moves = False  # θ is the master copy: the moves never touch it

    def __init__(self, param: torch.Tensor, direction_of: DirectionOf) -> None:
        self.param, self._direction_of = param, direction_of
        self.master = param.detach().to(torch.float32).clone().contiguous()
        self._master_flat = self.master.view(-1)
        # Chunks are written through a flat view; a non-contiguous weight gets whole-tensor writes.
        self._param_flat = param.data.view(-1) if param.is_contiguous() else None
        self._in_place = self._param_flat is not None and self._param_flat.dtype == torch.float32
        self._pending: _Offset | None = None  # a deferred update: θ ← θ + alpha·z(seed)
        self._stale = False  # θ moved (a deferred update applied) but the weight was not written

    @property
    def pending(self) -> bool:
        """Whether an update waits for the next move (the weight does not hold θ yet)."""
        return self._pending is not None or self._stale

    def _apply_pending(self) -> None:
        """Apply a deferred update to θ only (the weight is written by the next move or settle)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            for start, end, z in self._direction_of(pending.seed).chunks():
                self._master_flat[start:end].add_(z, alpha=pending.alpha)
            self._stale = True

    def theta(self) -> torch.Tensor:
        """θ in fp32 (the master copy itself: do not modify)."""
        self._apply_pending()
        return self.master

    def _write_chunk(self, start: int, end: int, z: torch.Tensor, alpha: float) -> None:
        if self._in_place:
            torch.add(self._master_flat[start:end], z, alpha=alpha, out=self._param_flat[start:end])
        else:
            self._param_flat[start:end].copy_(self._master_flat[start:end].add(z, alpha=alpha))

    def shift(self, seed: int, alpha: float) -> None:
        """Set the weight to ``θ + alpha·z(seed)``, from whatever offset it had."""
        self._stale = False  # every entry is written below
        if self._param_flat is None:
            self._apply_pending()
            self.param.data.copy_(self.master.add(self._direction_of(seed).full().view_as(self.master), alpha=alpha))
            return
        if self._pending is None:
            for start, end, z in self._direction_of(seed).chunks():
                self._write_chunk(start, end, z, alpha)
            return
        pending, self._pending = self._pending, None
        updates = self._direction_of(pending.seed).chunks()
        for start, end, z in self._direction_of(seed).chunks():
            _, _, z_update = next(updates)
            self._master_flat[start:end].add_(z_update, alpha=pending.alpha)
            self._write_chunk(start, end, z, alpha)

    def settle(self) -> None:
        """Write θ back into the weight (exact), applying a deferred update first."""
        if self._pending is not None and self._param_flat is not None:
            pending, self._pending = self._pending, None
            self.update_along(pending.seed, pending.alpha)
            return
        self._apply_pending()
        self.param.data.copy_(self.master)
        self._stale = False

    def update_along(self, seed: int, coeff: float, defer: bool = False) -> None:
        """``θ ← θ + coeff·z(seed)`` and write it: the restore fused into the update.

        ``defer``: leave the weight as it is and apply the update in the next move's pass.
        """
        self._apply_pending()
        if defer and self._param_flat is not None:
            self._pending = _Offset(seed, coeff)
            return
        for start, end, z in self._direction_of(seed).chunks():
            self._master_flat[start:end].add_(z, alpha=coeff)
            if self._param_flat is not None:
                self._param_flat[start:end].copy_(self._master_flat[start:end])
        if self._param_flat is None:
            self.param.data.copy_(self.master)
        self._stale = False

    def update_by(self, direction: torch.Tensor, coeff: float) -> None:
        """``θ ← θ + coeff·direction`` and write it."""
        self._apply_pending()
        self.master.add_(direction, alpha=coeff)
        self.param.data.copy_(self.master)
        self._stale = False


class CompensatedShift:
    """An fp32 weight moved in place and restored bit for bit from about half a byte per entry."""

    # Updates are applied at once (``defer`` is ignored), and undoing a move is exact.
    pending = False
    replays_moves = False

    def __init__(self, param: torch.Tensor, direction_of: DirectionOf) -> None:
        if param.dtype != torch.float32 or not param.is_contiguous():
            raise ValueError("CompensatedShift needs a contiguous float32 tensor")
        self.param, self._direction_of = param, direction_of
        self._flat = param.data.view(-1)
        self._bits = self._flat.view(torch.int32)
        self._offset: _Offset | None = None
        self._low: torch.Tensor | None = None  # low 4 bits of θ, two per byte; valid until θ changes
        self._exact_for: tuple[int, float] | None = None  # (seed, |alpha|) the exceptions cover
        # Per chunk: positions (within the chunk) and exact θ of entries moved too far to undo.
        self._exceptions: list[tuple[torch.Tensor, torch.Tensor]] = []

    def theta(self) -> torch.Tensor:
        """θ in fp32: settles the weight first and returns it."""
        self.settle()
        return self.param.data

    def _nibbles(self, start: int, end: int) -> torch.Tensor:
        """The low 4 bits of the current bit patterns of a chunk, as uint8."""
        return (self._bits[start:end] & _NIBBLE).to(torch.uint8)

    def _save_nibbles(self, start: int, end: int) -> None:
        # Chunks start at multiples of 64, so entry pairs never straddle two chunks.
        nibbles = self._nibbles(start, end)
        packed = nibbles[0::2].clone()
        packed[: nibbles.numel() // 2] |= nibbles[1::2] << 4
        self._low[start // 2 : start // 2 + packed.numel()] = packed

    def _saved_nibbles(self, start: int, end: int) -> torch.Tensor:
        count = end - start
        packed = self._low[start // 2 : start // 2 + (count + 1) // 2]
        nibbles = torch.empty(count, dtype=torch.uint8, device=packed.device)
        nibbles[0::2] = packed & _NIBBLE
        nibbles[1::2] = (packed >> 4)[: count // 2]
        return nibbles

    def _chunks_with_offset(self, seed: int) -> Iterator[tuple[int, int, int, torch.Tensor, torch.Tensor | None]]:
        """``(index, start, end, z(seed) chunk, z(current offset) chunk or None)``, in lockstep."""
        new = self._direction_of(seed).chunks()
        offset = self._offset
        # The same seed: one chunk serves both the undo and the next move.
        old = None if offset is None or offset.seed == seed else self._direction_of(offset.seed).chunks()
        for index, (start, end, z) in enumerate(new):
            if offset is None:
                yield index, start, end, z, None
            else:
                yield index, start, end, z, z if old is None else next(old)[2]

    def _undo_chunk(self, index: int, start: int, end: int, z_old: torch.Tensor) -> None:
        """Take the current offset off one chunk of the weight, landing on θ exactly."""
        assert self._offset is not None and self._low is not None
        self._flat[start:end].add_(z_old, alpha=-self._offset.alpha)
        # The 4-bit difference, read as signed (−8..7): how many bit-pattern steps to θ.
        correction = ((self._saved_nibbles(start, end) - self._nibbles(start, end)) & _NIBBLE).to(torch.int32)
        correction -= (correction >= 8).to(torch.int32) << 4
        self._bits[start:end].add_(correction)
        positions, values = self._exceptions[index]
        if positions.numel():
            self._flat[start:end][positions] = values

    def _remember_chunk(self, index: int, start: int, end: int, z: torch.Tensor, alpha: float) -> None:
        """Save what a move of ``alpha·z`` from θ (this chunk's current value) would destroy."""
        assert self._low is not None
        theta = self._flat[start:end]
        self._save_nibbles(start, end)
        count = end - start
        with scratch_buffer(theta.device) as limit, scratch_buffer(theta.device) as moved:
            torch.abs(theta, out=limit[:count]).mul_(_RELATIVE_MOVE_LIMIT)
            torch.abs(z, out=moved[:count]).mul_(abs(alpha))
            # int32 positions within the chunk: 8 bytes per exception with its value.
            positions = limit[:count].lt_(moved[:count]).nonzero().squeeze(1).to(torch.int32)
        entry = (positions, theta[positions].clone())
        if index < len(self._exceptions):
            self._exceptions[index] = entry
        else:
            self._exceptions.append(entry)

    def shift(self, seed: int, alpha: float) -> None:
        """Set the weight to ``θ + alpha·z(seed)``, from whatever offset it had."""
        if self._low is None:
            self._low = torch.empty((self._flat.numel() + 1) // 2, dtype=torch.uint8, device=self._flat.device)
            self._exact_for = None
        remember = self._exact_for != (seed, abs(alpha))
        for index, start, end, z, z_old in self._chunks_with_offset(seed):
            if z_old is not None:
                self._undo_chunk(index, start, end, z_old)
            if remember:
                self._remember_chunk(index, start, end, z, alpha)
            self._flat[start:end].add_(z, alpha=alpha)
        self._exact_for = (seed, abs(alpha))
        self._offset = _Offset(seed, alpha)

    def settle(self) -> None:
        """Bring the weight back to θ exactly."""
        if self._offset is None:
            return
        for index, (start, end, z_old) in enumerate(self._direction_of(self._offset.seed).chunks()):
            self._undo_chunk(index, start, end, z_old)
        self._offset = None

    def _forget(self) -> None:
        """θ changed: the saved residues and exceptions no longer describe it."""
        self._low, self._exact_for = None, None

    def update_along(self, seed: int, coeff: float, defer: bool = False) -> None:
        """``θ ← θ + coeff·z(seed)``; when the weight sits at ``θ + α·z(seed)``, one draw.

        ``defer`` is accepted for the common interface; this store always updates at once.
        """
        for index, start, end, z, z_old in self._chunks_with_offset(seed):
            if z_old is not None:
                self._undo_chunk(index, start, end, z_old)
            self._flat[start:end].add_(z, alpha=coeff)
        self._offset = None
        self._forget()

    def update_by(self, direction: torch.Tensor, coeff: float) -> None:
        """``θ ← θ + coeff·direction``."""
        self.settle()
        self._flat.add_(direction.view(-1), alpha=coeff)
        self._forget()


class InPlaceShift:
    """An fp32 weight that is its own θ: moves are in-place adds, nothing else is kept.

    The lean store: zero bytes per weight, and each move is one read-modify-write of the weight
    (the master copy's moves read θ and write the weight: the same traffic). The price is
    exactness: undoing ``+α·z`` by adding ``−α·z`` rounds, so after a step θ is θ moved by the
    update *plus rounding* of a few ulp. That θ is still a pure function of the moves, so a
    replay that makes the same moves (:meth:`zorefine.zo.engine.ZOEngine.replay`) rebuilds it bit
    for bit. A deferred update is merged into the next move: the same adds, in the same order,
    as when it is applied at once.
    """

    replays_moves = True  # undoing a move rounds: replay must make the moves again

    def __init__(self, param: torch.Tensor, direction_of: DirectionOf) -> None:
        if param.dtype != torch.float32 or not param.is_contiguous():
            raise ValueError("InPlaceShift needs a contiguous float32 tensor")
        self.param, self._direction_of = param, direction_of
        self._flat = param.data.view(-1)
        self._offset: _Offset | None = None  # the weight sits at θ + alpha·z(seed)
        self._pending: _Offset | None = None  # a deferred update of θ

    @property
    def pending(self) -> bool:
        """Whether the weight is away from θ with an update waiting (a step left unsettled)."""
        return self._pending is not None

    def _to_theta(self) -> list[_Offset]:
        """The adds that take the weight to θ with any pending update applied (same seeds merged)."""
        terms = [_Offset(self._offset.seed, -self._offset.alpha)] if self._offset is not None else []
        if self._pending is not None:
            if terms and terms[0].seed == self._pending.seed:
                terms[0] = _Offset(self._pending.seed, terms[0].alpha + self._pending.alpha)
            else:
                terms.append(self._pending)
        return terms

    def _add(self, terms: list[_Offset]) -> None:
        """Add every ``alpha·z(seed)`` of ``terms`` to the weight, in order, chunk by chunk."""
        if not terms:
            return
        streams = [self._direction_of(term.seed).chunks() for term in terms]
        for chunks in zip(*streams):
            for term, (start, end, z) in zip(terms, chunks):
                self._flat[start:end].add_(z, alpha=term.alpha)

    def theta(self) -> torch.Tensor:
        """θ in fp32: settles the weight first and returns it."""
        self.settle()
        return self.param.data

    def shift(self, seed: int, alpha: float) -> None:
        """Move the weight to ``θ + alpha·z(seed)`` (θ as the moves so far define it)."""
        terms = self._to_theta()
        if self._pending is None and terms and terms[-1].seed == seed:
            # From +α to −α along one direction: a single add (and a single draw).
            terms[-1] = _Offset(seed, terms[-1].alpha + alpha)
        else:
            terms.append(_Offset(seed, alpha))
        self._add(terms)
        self._offset, self._pending = _Offset(seed, alpha), None

    def settle(self) -> None:
        """Bring the weight to θ (with any pending update applied)."""
        self._add(self._to_theta())
        self._offset, self._pending = None, None

    def update_along(self, seed: int, coeff: float, defer: bool = False) -> None:
        """``θ ← θ + coeff·z(seed)``, merged with undoing the current move; ``defer``: at the next move."""
        if self._pending is not None:
            self.settle()
        self._pending = _Offset(seed, coeff)
        if not defer:
            self.settle()

    def update_by(self, direction: torch.Tensor, coeff: float) -> None:
        """``θ ← θ + coeff·direction``."""
        self.settle()
        self._flat.add_(direction.view(-1), alpha=coeff)


def make_store(kind: str, param: torch.Tensor, direction_of: DirectionOf) -> MasterCopy | CompensatedShift | InPlaceShift:
    """The store of ``kind`` for ``param``; half-precision weights always get a master copy."""
    if kind not in STORES:
        raise ValueError(f"store must be one of {STORES}, got {kind!r}")
    if param.dtype == torch.float32 and param.is_contiguous():
        if kind == "compensated":
            return CompensatedShift(param, direction_of)
        if kind == "inplace":
            return InPlaceShift(param, direction_of)
    return MasterCopy(param, direction_of)
