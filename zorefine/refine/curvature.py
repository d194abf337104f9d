"""Running ZO-curvature per unit, from the refiner's own evaluations.

When a ZO step perturbs a single unit and also evaluates the clean loss, its three losses give
``(L(θ+εz) + L(θ−εz) − 2L(θ)) / ε²``: a Hutchinson estimate of that unit's curvature along
``z``, with no extra forward pass beyond L(θ). The tracker averages these per unit, starts from
the analyzer's estimates when there are any, and picks the next unit to refine with probability
proportional to its estimated curvature, so the selection is re-ranked as refinement goes.

Everything it does is a function of the logged losses and the step seeds, so a resumed run or
a replay rebuilds the same choices.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence


def curvature_estimate(loss_plus: float, loss_minus: float, loss_clean: float, eps: float) -> float:
    """``(L(θ+εz) + L(θ−εz) − 2L(θ)) / ε²``."""
    return (loss_plus + loss_minus - 2.0 * loss_clean) / (eps * eps)


@dataclass
class CurvatureTracker:
    """Per-unit running mean curvature, and curvature-proportional choice of the next unit."""

    units: Sequence[str]
    prior: dict[str, float] = field(default_factory=dict)
    # Every unit keeps at least this share of the largest estimate, so none starves.
    floor_fraction: float = 0.1
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def observe(self, unit: str, loss_plus: float, loss_minus: float, loss_clean: float, eps: float) -> float:
        """Add one step's evaluations of ``unit``; returns that step's estimate."""
        value = curvature_estimate(loss_plus, loss_minus, loss_clean, eps)
        self.sums[unit] = self.sums.get(unit, 0.0) + value
        self.counts[unit] = self.counts.get(unit, 0) + 1
        return value

    def estimate(self, unit: str) -> float | None:
        """The running mean for ``unit``, else the analyzer's prior, else None."""
        if self.counts.get(unit):
            return self.sums[unit] / self.counts[unit]
        return self.prior.get(unit)

    def choose(self, seed: int) -> str:
        """The unit the next step refines: an unmeasured one first (in order), else sampled ∝ curvature."""
        estimates = {unit: self.estimate(unit) for unit in self.units}
        unknown = [unit for unit, value in estimates.items() if value is None]
        if unknown:
            return unknown[0]
        largest = max(max(estimates.values()), 0.0)  # type: ignore[type-var]
        floor = self.floor_fraction * largest if largest > 0 else 1.0
        weights = [max(value, floor) for value in estimates.values()]  # type: ignore[type-var]
        return random.Random(seed).choices(list(estimates), weights=weights, k=1)[0]

    def ranking(self) -> list[str]:
        """Units by estimated curvature, highest first (unmeasured last, in order)."""
        position = {unit: i for i, unit in enumerate(self.units)}
        return sorted(self.units, key=lambda u: (self.estimate(u) is None, -(self.estimate(u) or 0.0), position[u]))

    def as_dict(self) -> dict[str, dict[str, float | int | None]]:
        """JSON-ready per-unit estimates and observation counts."""
        return {unit: {"curvature": self.estimate(unit), "observations": self.counts.get(unit, 0)} for unit in self.units}
