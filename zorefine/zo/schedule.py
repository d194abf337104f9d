"""Learning-rate and ε schedules over a run's steps."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def scheduled(base: float, step: int, total: int, schedule: str, final_fraction: float = 0.0) -> float:
    """``base`` scaled by a schedule over ``total`` steps, decaying towards ``final_fraction × base``.

    Step ``s`` of ``total`` sits at progress ``s / total``, so the last step still moves the
    weights (a schedule that reached its floor on the last step would spend it for nothing when
    the floor is 0); the floor itself is where a step ``total`` would be.
    """
    if schedule == "constant" or total <= 1:
        return base
    progress = min(max(step / total, 0.0), 1.0)
    if schedule == "linear":
        factor = 1.0 - progress
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    return base * (final_fraction + (1.0 - final_fraction) * factor)
