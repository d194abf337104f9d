"""Paired comparisons: two models on the same prompts and the same noise draws, difference by difference.

Side-by-side intervals overlap long before a difference is in doubt, and they can look apart when
it is not: the pairing removes the variation the two models share (which prompts are hard, which
noise draw is harsh). For each threat condition, the per-prompt outcome of one model minus the
other's, on the same prompt under the same draw, is averaged with a hierarchical bootstrap
interval over refinement seeds, noise draws and prompts (:func:`zorefine.stats.hierarchical_bootstrap`).
A difference is called better or worse only when that interval excludes zero.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from zorefine.stats import hierarchical_bootstrap, paired_verdict

# Outcomes where lower is better for all of them: attack success, benign refusal, over-refusal.
OUTCOMES = ("attack_success", "overrefusal", "benign_refusal")


def condition_group(family: str, sigma: float | None, label: str) -> str:
    """Conditions that are draws of one threat pool into one group: every seed of a noise level,
    and the seeds of a random spec listed in the grid one by one (``anoise:0.4:seed=0``, ...)."""
    if family == "weight_noise":
        return f"wnoise σ={sigma:g}"
    return re.sub(r":seed=\d+", "", label)


def _group(condition: Mapping[str, Any]) -> str:
    return condition_group(condition["family"], condition.get("sigma"), condition["label"])


def outcome_arrays(result: Mapping[str, Any], outcome: str) -> dict[str, np.ndarray]:
    """Per condition group: a (noise draws × prompts) array of one model's 0/1 outcomes."""
    rows: dict[str, list[list[int]]] = {}
    for condition in result.get("conditions", []):
        values = (condition.get("outcomes") or {}).get(outcome)
        if values:
            rows.setdefault(_group(condition), []).append(values)
    return {group: np.asarray(values, dtype=float) for group, values in rows.items() if len({len(v) for v in values}) == 1}


def paired_differences(
    models: Sequence[Mapping[str, Any]], references: Sequence[Mapping[str, Any]], outcome: str = "attack_success"
) -> dict[str, dict[str, Any]]:
    """``models[r] − references[r]`` per condition group, pooled over ``r`` (refinement seeds).

    A single reference (the unrefined model every seed starts from) pairs with every model.
    Groups or shapes the two sides do not share are left out.
    """
    if len(references) == 1:
        references = list(references) * len(models)
    count = min(len(models), len(references))
    tables = [(outcome_arrays(models[r], outcome), outcome_arrays(references[r], outcome)) for r in range(count)]
    if not tables:
        return {}
    groups = [g for g in tables[0][0] if all(g in a and g in b and a[g].shape == b[g].shape == tables[0][0][g].shape for a, b in tables)]
    paired = {}
    for group in groups:
        stacked = np.stack([a[group] - b[group] for a, b in tables])  # refinement seeds × draws × prompts
        interval = hierarchical_bootstrap(stacked)
        paired[group] = {**interval, "refinement_seeds": count, "verdict": paired_verdict(interval)}
    return paired


def format_paired(cell: Mapping[str, Any] | None) -> str:
    """``-0.031 [-0.052, -0.010] better`` (differences in rate, lower is better)."""
    if not cell:
        return "–"
    return f"{cell['mean']:+.3f} [{cell['low']:+.3f}, {cell['high']:+.3f}] {cell['verdict']}"
