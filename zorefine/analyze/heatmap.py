"""The units × threats heatmap of an analysis (``sensitivity.png``)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from zorefine.analyze.sensitivity import Analysis


def plot_heatmap(analysis: Analysis, metric: str, selected: Sequence[str], path) -> None:
    """Units × threats heatmap of ``metric`` (plus the curvature column); selected units in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = list(dict.fromkeys(score.unit for score in analysis.scores))
    threats = list(dict.fromkeys(score.threat for score in analysis.scores))
    cell = {(s.unit, s.threat): s.mean(metric) for s in analysis.scores}
    columns = [[cell.get((u, t), float("nan")) for t in threats] for u in units]
    labels = [f"{t}\n{metric}" for t in threats]
    if analysis.curvature:
        for row, unit in zip(columns, units):
            row.append(analysis.curvature.get(unit, {}).get("mean", float("nan")))
        labels.append(f"ZO curvature\nε={analysis.curvature_eps:g}")
    matrix = torch.tensor(columns, dtype=torch.float32)
    # Each column on its own scale: threats differ by orders of magnitude.
    scale = matrix.abs().nan_to_num(0).amax(dim=0).clamp_min(1e-12)
    fig, axis = plt.subplots(figsize=(1.6 + 1.9 * len(labels), 1.2 + 0.32 * len(units)))
    image = axis.imshow((matrix / scale).numpy(), aspect="auto", cmap="magma_r", vmin=0, vmax=1)
    for i in range(len(units)):
        for j in range(len(labels)):
            value = float(matrix[i, j])
            axis.text(j, i, "–" if math.isnan(value) else f"{value:.3g}", ha="center", va="center", fontsize=7, color="tab:blue")
    axis.set_xticks(range(len(labels)), labels, fontsize=8)
    axis.set_yticks(range(len(units)), units, fontsize=7)
    for tick, unit in zip(axis.get_yticklabels(), units):
        if unit in selected:
            tick.set_color("tab:red")
            tick.set_fontweight("bold")
    fig.colorbar(image, ax=axis, label="fraction of the column's largest value")
    axis.set_title("Fragility per unit (mean over seeds); red = selected for refinement", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
