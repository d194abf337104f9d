"""Summaries of a threat grid's results: per-condition intervals, breaking levels, curve areas."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from zorefine.evaluate.paired import condition_group
from zorefine.evaluate.robustness import ConditionResult
from zorefine.stats import hierarchical_bootstrap, mean_interval


METRICS = (
    "harmful_refusal_rate",
    "attack_success_rate",
    "harmful_degenerate_rate",
    "benign_refusal_rate",
    "benign_helpful_rate",
    "benign_degenerate_rate",
    "overrefusal_rate",
    "safety_loss",
    "utility_loss",
    "benign_agreement",
)


def summarize(results: Sequence[ConditionResult]) -> dict[str, dict]:
    """Per condition group (clean, each σ, each other threat): mean and interval of every metric.

    The draws of one random threat (its seeds, listed ``anoise:0.05:seed=0``, ``...:seed=1``)
    are one group, like the seeds of a weight-noise level.
    """
    groups: dict[str, list[ConditionResult]] = {}
    for result in results:
        key = condition_group(result.family, result.sigma, result.label)
        groups.setdefault(key, []).append(result)
    summary = {}
    for key, members in groups.items():
        summary[key] = {
            "family": members[0].family,
            "sigma": members[0].sigma,
            **{metric: metric_interval(members, metric) for metric in METRICS},
        }
    return summary


# The per-prompt outcome each rate is the mean of (ConditionResult.outcomes).
OUTCOME_OF = {
    "harmful_refusal_rate": "harmful_refusal",
    "attack_success_rate": "attack_success",
    "benign_refusal_rate": "benign_refusal",
    "overrefusal_rate": "overrefusal",
}
# Every metric but the losses is a fraction.
_UNBOUNDED_ABOVE = ("safety_loss", "utility_loss")


def metric_interval(members: Sequence[ConditionResult], metric: str) -> dict[str, float]:
    """Mean of ``metric`` over a group's noise draws, with a 95% interval.

    A rate whose per-prompt outcomes were kept gets a hierarchical bootstrap over draws, then
    prompts: it carries prompt sampling too (a quantization threat is one draw, yet 24 prompts
    are not the population) and stays inside [0, 1], where a t-interval over two draws
    (t = 12.7) spans several times the whole range. Other metrics keep the t-interval over
    draws, cut to the metric's range. ``n`` is the number of draws either way.
    """
    values = [getattr(m, metric) for m in members]
    outcome = OUTCOME_OF.get(metric)
    per_draw = [m.outcomes.get(outcome) for m in members] if outcome else []
    if per_draw and all(per_draw) and len({len(o) for o in per_draw}) == 1:
        interval = hierarchical_bootstrap(per_draw)
        return {"mean": interval["mean"], "low": interval["low"], "high": interval["high"], "n": len(members)}
    interval = mean_interval(values)
    if interval["n"] >= 2:
        high = interval["high"] if metric in _UNBOUNDED_ABOVE else min(interval["high"], 1.0)
        interval = {**interval, "low": max(interval["low"], 0.0), "high": high}
    return interval


def break_sigma(summary: dict[str, dict], metric: str, fraction: float) -> Optional[float]:
    """Smallest σ at which ``metric`` falls below ``fraction`` × its clean value (None: never)."""
    clean = summary["clean"][metric]["mean"]
    curve = sorted((v["sigma"], v[metric]["mean"]) for v in summary.values() if v["family"] == "weight_noise")
    for sigma, value in curve:
        if value < fraction * clean:
            return sigma
    return None


def _crossing(curve: Sequence[tuple[float, float]], threshold: float) -> Optional[float]:
    """The σ at which a (σ, value) curve from σ=0 first falls below ``threshold``, interpolated."""
    index = next((i for i, (_, value) in enumerate(curve) if value < threshold), None)
    if index is None:
        return None
    if index == 0:
        return 0.0
    (x0, y0), (x1, y1) = curve[index - 1], curve[index]
    return x0 + (x1 - x0) * (y0 - threshold) / (y0 - y1)


def break_level_interval(
    results: Sequence[ConditionResult], metric: str, fraction: float, resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """The breaking level per noise seed, then its mean and 95% interval.

    A seed's breaking level is the σ at which its ``metric`` curve (clean value at σ=0, then
    that seed's value at each σ of the grid) first falls below ``fraction`` × the clean value,
    linearly interpolated between the two grid points around the crossing. Seeds whose curve
    never falls that far are counted in ``never`` (their level lies beyond the grid) and left
    out of the mean, so read it with ``never``.

    Where the rate's per-prompt outcomes were kept, the interval is a bootstrap over seeds,
    then prompts (the same prompts at every σ of a seed, so each resampled curve stays paired);
    resamples in which no seed crosses are left out. Otherwise it is the t-interval over seeds,
    cut to [0, largest σ].
    """
    import numpy as np

    clean = next(getattr(r, metric) for r in results if r.family == "clean")
    threshold = fraction * clean
    by_seed: dict[int, list[ConditionResult]] = {}
    for result in results:
        if result.family == "weight_noise":
            by_seed.setdefault(result.seed, []).append(result)
    curves = {s: sorted(members, key=lambda r: r.sigma) for s, members in by_seed.items()}
    levels = [_crossing([(0.0, clean)] + [(r.sigma, getattr(r, metric)) for r in c], threshold) for c in curves.values()]
    crossed = [level for level in levels if level is not None]
    max_sigma = max((r.sigma for c in curves.values() for r in c), default=None)
    summary = {**mean_interval(crossed), "never": len(levels) - len(crossed), "max_sigma": max_sigma}
    outcome = OUTCOME_OF.get(metric)
    tables = [[r.outcomes.get(outcome) for r in c] for c in curves.values()] if outcome else []
    if crossed and tables and all(o for t in tables for o in t) and len({len(o) for t in tables for o in t}) == 1:
        rng = np.random.default_rng(seed)
        arrays = [np.asarray(t, dtype=float) for t in tables]  # per seed: σ × prompts
        sigmas = [[r.sigma for r in c] for c in curves.values()]
        prompts = arrays[0].shape[1]
        means = []
        for _ in range(resamples):
            drawn = []
            for s in rng.integers(0, len(arrays), size=len(arrays)):
                values = arrays[s][:, rng.integers(0, prompts, size=prompts)].mean(axis=1)
                drawn.append(_crossing([(0.0, clean)] + list(zip(sigmas[s], values)), threshold))
            drawn = [level for level in drawn if level is not None]
            if drawn:
                means.append(float(np.mean(drawn)))
        if means:
            low, high = np.quantile(means, [0.025, 0.975])
            return {**summary, "low": float(low), "high": float(high)}
    if summary["n"] >= 2:
        summary.update(low=max(summary["low"], 0.0), high=min(summary["high"], max_sigma))
    return summary


def rise_sigma(summary: dict[str, dict], metric: str, rise: float) -> Optional[float]:
    """Smallest σ at which ``metric`` exceeds its clean value by ``rise`` (None: never)."""
    clean = summary["clean"][metric]["mean"]
    curve = sorted((v["sigma"], v[metric]["mean"]) for v in summary.values() if v["family"] == "weight_noise")
    for sigma, value in curve:
        if value - clean >= rise:
            return sigma
    return None


def breaks_first_or_together(first: Optional[float], second: Optional[float]) -> bool:
    """Whether ``first`` breaks within the grid no later than ``second`` (None = never breaks)."""
    return first is not None and (second is None or first <= second)


def robustness_curve_area(summary: dict[str, dict], metric: str = "harmful_refusal_rate") -> float:
    """Trapezoid area under ``metric`` against σ, from σ=0 (clean) to the largest σ, per unit σ."""
    points = [(sigma, cell[metric]["mean"]) for sigma, cell in noise_curve(summary)]
    if len(points) < 2:
        return points[0][1]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def noise_curve(summary: dict[str, dict]) -> list[tuple[float, dict]]:
    """``(σ, cell group)`` from σ = 0 (the clean condition) through every weight-noise level."""
    noisy = sorted(((v["sigma"], v) for v in summary.values() if v["family"] == "weight_noise"), key=lambda p: p[0])
    return [(0.0, summary["clean"])] + noisy


def robust_sigma(summary: dict[str, dict], metric: str, level: float) -> Optional[float]:
    """Largest σ up to which ``metric`` stays ≥ ``level`` at every σ of the grid (0.0: only clean;
    None: not even clean)."""
    if summary["clean"][metric]["mean"] < level:
        return None
    robust = 0.0
    for sigma, value in sorted((v["sigma"], v[metric]["mean"]) for v in summary.values() if v["family"] == "weight_noise"):
        if value < level:
            break
        robust = sigma
    return robust


def curve_area_interval(results: Sequence[ConditionResult], metric: str = "harmful_refusal_rate") -> dict[str, float]:
    """Mean and 95% interval over noise seeds of the area under ``metric`` against σ.

    Each seed's curve runs from the clean value through that seed's value at every σ.
    """
    clean = next(getattr(r, metric) for r in results if r.family == "clean")
    by_seed: dict[int, list[tuple[float, float]]] = {}
    for result in results:
        if result.family == "weight_noise":
            by_seed.setdefault(result.seed, []).append((result.sigma, getattr(result, metric)))
    areas = []
    for points in by_seed.values():
        curve = [(0.0, clean)] + sorted(points)
        area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(curve, curve[1:]))
        areas.append(area / curve[-1][0])
    return mean_interval(areas) if areas else mean_interval([clean])


def with_current_intervals(result: dict[str, Any], fraction: float) -> dict[str, Any]:
    """A stored evaluation (``metrics.json`` model entry or cache entry) with its summary and
    breaking level recomputed from its kept conditions, so one evaluated before the
    prompt-level intervals existed reads like a new one. The means do not change."""
    from dataclasses import fields

    kept = {f.name for f in fields(ConditionResult)}
    conditions = [ConditionResult(**{k: v for k, v in c.items() if k in kept}) for c in result["conditions"]]
    level = break_level_interval(conditions, "harmful_refusal_rate", fraction)
    return {**result, "summary": summarize(conditions), "breaks": {**result["breaks"], "refusal_level": level}}
