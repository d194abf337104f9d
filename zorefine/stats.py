"""Plain statistics shared by the stages: mean with a confidence interval, rank correlation."""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence


def mean_interval(values: Sequence[float]) -> dict[str, float]:
    """Mean and a 95% t-interval over seeds (zero width for a single seed)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": len(values)}
    # Two-sided 97.5% t quantiles for small n; 1.96 beyond.
    t_quantile = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
    half = t_quantile.get(len(values), 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def spearman(first: dict[str, float], second: dict[str, float]) -> float:
    """Spearman rank correlation between two scorings of the same units (average ranks for ties)."""
    units = sorted(set(first) & set(second))
    if len(units) < 2:
        return float("nan")

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2.0
            i = j + 1
        return result

    a, b = ranks([first[u] for u in units]), ranks([second[u] for u in units])
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    norm = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return cov / norm if norm > 0 else float("nan")


def hierarchical_bootstrap(
    differences: Any, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean of paired differences and its bootstrap interval, resampling every level of nesting.

    ``differences`` has one axis per source of variation, outermost first (e.g. refinement
    seeds × noise draws × prompts): each resample draws the outer units with replacement, then
    within each of them the next level, down to the prompts, so the interval carries all three
    sources. Returns mean, low, high, n (cells) and ``excludes_zero``.
    """
    import numpy as np

    data = np.asarray(differences, dtype=float)
    if data.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "excludes_zero": False}
    rng = np.random.default_rng(seed)
    # Resamples are drawn in blocks, all of a block at once (a leading resample axis): a Python
    # loop per resample cost more than a small model's whole evaluation. Blocks bound the memory
    # at about 32 MB of float64 however large the grid.
    block = max(1, min(resamples, (1 << 22) // data.size))
    means = np.concatenate([_resample_means(data, count, rng) for count in _blocks(resamples, block)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    mean = float(data.mean())
    return {"mean": mean, "low": float(low), "high": float(high), "n": int(data.size),
            "excludes_zero": bool(low > 0 or high < 0)}


def _blocks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def _resample_means(data: Any, count: int, rng: Any) -> Any:
    """Means of ``count`` nested resamples of ``data`` (each level drawn inside every outer unit)."""
    import numpy as np

    sample = np.broadcast_to(data, (count,) + data.shape)
    for axis in range(data.ndim):
        # Indices for this level, independently for every resample and every outer unit drawn.
        shape = (count,) + data.shape[: axis + 1]
        picks = rng.integers(0, data.shape[axis], size=shape)
        sample = np.take_along_axis(sample, picks.reshape(shape + (1,) * (data.ndim - axis - 1)), axis=axis + 1)
    return sample.reshape(count, -1).mean(axis=1)


def paired_verdict(interval: dict[str, float], lower_is_better: bool = True) -> str:
    """"better" / "worse" only when the paired interval excludes zero; else "no significant change"."""
    if not interval.get("excludes_zero"):
        return "no significant change"
    improved = interval["mean"] < 0 if lower_is_better else interval["mean"] > 0
    return "better" if improved else "worse"
