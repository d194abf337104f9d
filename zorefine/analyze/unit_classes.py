"""Unit classes from a safety score and a utility score: SSAH's four classes and Wei et al.'s set difference.

- :func:`ssah_classes`: per group, with ``s`` and ``u`` each unit's share of the group's safety
  and utility importance (shares, because the two data sets differ in length and activation
  scale), safety-critical units (SCU) have the highest ``s − u``, utility-critical units (UCU)
  the lowest, redundant units (RU) the lowest ``s + u`` among the rest, and the remainder are
  common units (CU).
- :func:`set_difference`: per weight tensor, the top ``q`` fraction of entries by safety score
  that are not among the top ``p`` fraction by utility score.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

__all__ = ["SSAH_CLASSES", "class_size", "set_difference", "ssah_classes"]

SSAH_CLASSES = ("scu", "ucu", "ru", "cu")


def class_size(fraction: float, size: int) -> int:
    """Units a class of ``fraction`` takes in a group of ``size``: at least one when the fraction is positive."""
    if fraction <= 0:
        return 0
    return min(size, max(1, round(fraction * size)))


def _top(values: torch.Tensor, count: int, allowed: torch.Tensor) -> torch.Tensor:
    """The ``count`` highest ``values`` among the ``allowed`` ones, as a boolean mask."""
    chosen = torch.zeros_like(allowed)
    if count <= 0:
        return chosen
    candidates = torch.where(allowed, values, torch.full_like(values, -math.inf))
    chosen[torch.topk(candidates, min(count, int(allowed.sum()))).indices] = True
    return chosen


def _shares(scores: torch.Tensor) -> torch.Tensor:
    total = scores.double().sum()
    return (scores.double() / total) if total > 0 else torch.zeros_like(scores, dtype=torch.float64)


def ssah_classes(
    safety: Mapping[str, torch.Tensor], utility: Mapping[str, torch.Tensor], fractions: Mapping[str, float]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{class: {group: bool [size]}}`` for the classes of :data:`SSAH_CLASSES`.

    ``fractions`` gives the share of each group's units for ``scu``, ``ucu`` and ``ru``; CU is the rest.
    """
    classes: dict[str, dict[str, torch.Tensor]] = {name: {} for name in SSAH_CLASSES}
    for key, safety_scores in safety.items():
        s, u = _shares(safety_scores), _shares(utility[key])
        size = s.numel()
        free = torch.ones(size, dtype=torch.bool)
        scu = _top(s - u, class_size(fractions["scu"], size), free)
        ucu = _top(u - s, class_size(fractions["ucu"], size), free & ~scu)
        ru = _top(-(s + u), class_size(fractions["ru"], size), free & ~scu & ~ucu)
        classes["scu"][key], classes["ucu"][key], classes["ru"][key] = scu, ucu, ru
        classes["cu"][key] = ~(scu | ucu | ru)
    return classes


def set_difference(safety: torch.Tensor, utility: torch.Tensor, q: float, p: float) -> torch.Tensor:
    """Entries in the top ``q`` fraction by ``safety`` and not in the top ``p`` fraction by ``utility``."""
    flat_safety, flat_utility = safety.flatten(), utility.flatten()
    everything = torch.ones(flat_safety.numel(), dtype=torch.bool)
    top_safety = _top(flat_safety, round(q * flat_safety.numel()), everything)
    top_utility = _top(flat_utility, round(p * flat_utility.numel()), everything)
    return (top_safety & ~top_utility).reshape(safety.shape)
