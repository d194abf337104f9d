"""Ranking: one fragility score per unit from an analysis, the units in order, JSON rows."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Sequence

from zorefine.analyze.sensitivity import Analysis

RANK_BY = ("safety_loss_rise", "refusal_drop", "curvature")


def unit_scores(analysis: Analysis, rank_by: str) -> dict[str, float]:
    """One fragility score per unit: ``rank_by`` averaged over threat families.

    Each family's scores are divided by that family's largest absolute score first, so a threat
    whose losses run larger does not drown the others.
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    if rank_by == "curvature":
        if not analysis.curvature:
            raise ValueError("rank_by=curvature needs the curvature analysis (analyze.curvature=true)")
        return {unit: value["mean"] for unit, value in analysis.curvature.items()}
    by_family: dict[str, dict[str, float]] = {}
    for score in analysis.scores:
        by_family.setdefault(score.threat, {})[score.unit] = score.mean(rank_by)
    combined: dict[str, list[float]] = {}
    for values in by_family.values():
        finite = [abs(v) for v in values.values() if math.isfinite(v)]
        scale = max(finite) if finite and max(finite) > 0 else 1.0
        for unit, value in values.items():
            combined.setdefault(unit, []).append(value / scale if math.isfinite(value) else 0.0)
    return {unit: statistics.fmean(values) for unit, values in combined.items()}


def rank_units(scores: dict[str, float], order: Sequence[str]) -> list[str]:
    """Unit names, most fragile first; ties keep ``order`` (the model's layer order)."""
    position = {name: i for i, name in enumerate(order)}
    return sorted(scores, key=lambda unit: (-scores[unit], position.get(unit, len(position))))


def as_rows(analysis: Analysis) -> list[dict]:
    """JSON-ready rows, one per (unit, threat), NaN turned into None."""

    def clean(value: object) -> object:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return [{k: clean(v) for k, v in asdict(score).items()} for score in analysis.scores]
