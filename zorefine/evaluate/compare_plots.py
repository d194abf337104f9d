"""The comparison's plots: robustness gain against forward passes spent, and refusal against σ."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from zorefine.evaluate.compare_runs import Entry, refusal_area
from zorefine.evaluate.report import save_figure
from zorefine.evaluate.curves import noise_curve


def plot_gain_vs_forwards(path: Path, entries: Sequence[Entry]) -> None:
    """Robustness gain (refusal-area change vs the unrefined model) against forward passes, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    methods = sorted({e.method for e in entries if e.method != "none"})
    for method in methods:
        points = sorted(
            ((e.forward_passes, refusal_area(e.result), e.before_area) for e in entries if e.method == method and e.before_area is not None),
            key=lambda point: point[0],
        )
        if not points:
            continue
        xs = [x for x, _, _ in points]
        gains = [a["mean"] - b for _, a, b in points]
        errors = [[a["mean"] - a["low"] for _, a, _ in points], [a["high"] - a["mean"] for _, a, _ in points]]
        # A line reads as "more budget"; settings at the same budget are separate points.
        line = "-" if len(set(xs)) == len(xs) else "none"
        axis.errorbar(xs, gains, yerr=errors, marker="o", capsize=3, linestyle=line, label=method)
    axis.axhline(0.0, color="gray", linewidth=0.8)
    axis.set_xlabel("forward-pass equivalents spent (backward = 2 forwards)")
    axis.set_ylabel("gain in refusal-curve area vs no refinement")
    save_figure(fig, axis, path, "Robustness bought per forward pass")


def plot_refusal_curves(path: Path, entries: Sequence[Entry]) -> None:
    """Refusal rate against σ, one line per compared model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7.2, 4.4))
    for entry in entries:
        points = noise_curve(entry.result["summary"])
        style = "k--" if entry.method == "none" else "-"
        axis.plot([s for s, _ in points], [v["harmful_refusal_rate"]["mean"] for _, v in points], style, marker=".", label=entry.label)
    axis.set_xlabel("relative weight noise σ")
    axis.set_ylabel("refusal rate (harmful, held out)")
    axis.set_ylim(-0.02, 1.02)
    save_figure(fig, axis, path, "Refusal under weight noise, per compared model", legend_size=7)
