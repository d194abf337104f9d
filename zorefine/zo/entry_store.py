"""The weight store of a unit set: some entries of a tensor, θ kept for those entries only."""

from __future__ import annotations

import torch

from zorefine.zo.weight_store import DirectionOf


class EntryStore:
    """Some entries of a weight (a unit set: neurons, channels, single weights), θ in an fp32 copy of those only.

    ``index`` holds flat positions into the weight; the direction has one value per position, so
    every move costs the selected entries, not the tensor. Writes scatter into the weight.
    """

    # Writes are per entry and always at once; θ does not depend on the moves.
    pending = False
    replays_moves = False

    def __init__(self, param: torch.Tensor, index: torch.Tensor, direction_of: DirectionOf) -> None:
        if not param.is_contiguous():
            raise ValueError("EntryStore needs a contiguous weight")
        self.param, self._direction_of = param, direction_of
        self.index = index.to(device=param.device, dtype=torch.long)
        self._flat = param.data.view(-1)
        self.master = self._flat[self.index].to(torch.float32)

    def theta(self) -> torch.Tensor:
        """θ of the selected entries (1-D fp32, in ``index`` order: do not modify)."""
        return self.master

    def _write(self, values: torch.Tensor) -> None:
        self._flat.index_copy_(0, self.index, values.to(self._flat.dtype))

    def shift(self, seed: int, alpha: float) -> None:
        """Set the selected entries to ``θ + alpha·z(seed)``."""
        self._write(self.master.add(self._direction_of(seed).full().view(-1), alpha=alpha))

    def settle(self) -> None:
        """Write θ back (exact)."""
        self._write(self.master)

    def update_along(self, seed: int, coeff: float, defer: bool = False) -> None:
        """``θ ← θ + coeff·z(seed)`` and write it (``defer`` is ignored: writes are per entry)."""
        self.master.add_(self._direction_of(seed).full().view(-1), alpha=coeff)
        self._write(self.master)

    def update_by(self, direction: torch.Tensor, coeff: float) -> None:
        """``θ ← θ + coeff·direction`` and write it."""
        self.master.add_(direction.view(-1), alpha=coeff)
        self._write(self.master)
