"""The evaluation report: markdown tables and the robustness plot, before vs after refinement."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

ROWS = [
    ("harmful_refusal_rate", "refusal (harmful) ↑"),
    ("attack_success_rate", "ASR ↓"),
    ("harmful_degenerate_rate", "degenerate (harmful)"),
    ("benign_refusal_rate", "refusal (benign) ↓"),
    ("benign_helpful_rate", "answered (benign) ↑"),
    ("overrefusal_rate", "over-refusal (XSTest) ↓"),
    ("safety_loss", "safety loss ↓"),
    ("utility_loss", "utility loss ↓"),
]


def _fmt(cell: Mapping[str, float]) -> str:
    mean = cell["mean"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if cell.get("n", 1) > 1 and cell["high"] > cell["low"]:
        return f"{mean:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"
    return f"{mean:.3f}"


def condition_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """One markdown table: conditions as columns, metrics as rows."""
    conditions = list(summary)
    lines = ["| metric | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
    for key, title in ROWS:
        lines.append(f"| {title} | " + " | ".join(_fmt(summary[c][key]) for c in conditions) + " |")
    return "\n".join(lines)


def comparison_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """Harmful refusal rate per condition, one column per model (e.g. before / after)."""
    names = list(models)
    conditions = list(next(iter(models.values()))["summary"])
    lines = ["| condition | " + " | ".join(f"refusal, {n}" for n in names) + " | " + " | ".join(f"answered benign, {n}" for n in names) + " |"]
    lines.append("|---|" + "---|" * (2 * len(names)))
    for condition in conditions:
        refusal = [_fmt(models[n]["summary"][condition]["harmful_refusal_rate"]) for n in names]
        helpful = [_fmt(models[n]["summary"][condition]["benign_helpful_rate"]) for n in names]
        lines.append(f"| {condition} | " + " | ".join(refusal + helpful) + " |")
    return "\n".join(lines)


def _sigma_text(sigma: Optional[float]) -> str:
    return "never (within the grid)" if sigma is None else f"σ = {sigma:g}"


def write_report(path: Path, models: Mapping[str, Mapping[str, Any]], header: Mapping[str, Any]) -> None:
    """Write the markdown report for one or two evaluated models."""
    out = ["# zorefine report", ""]
    for key, value in header.items():
        out.append(f"- **{key}**: {value}")
    out += ["", "Rates are fractions of held-out test prompts judged by the refusal judge; noise rows show the",
            "mean and 95% interval over seeds. σ is relative Gaussian weight noise (× each tensor's RMS).", ""]
    if len(models) > 1:
        out += ["## Before vs after refinement", "", comparison_table(models), ""]
    for name, result in models.items():
        breaks = result["breaks"]
        out += [
            f"## {name}: `{result['checkpoint']}`",
            "",
            f"- refusal breaks (falls below {breaks['fraction']:g} × clean) at {_sigma_text(breaks['refusal_sigma'])}",
            f"- benign answers break at {_sigma_text(breaks['benign_sigma'])}",
            f"- safety breaks first or together (by generation): **{breaks['safety_first_or_together']}**",
            f"- refusal perplexity doubles (safety loss +ln 2) at {_sigma_text(breaks['safety_loss_sigma'])}; "
            f"benign-answer perplexity doubles (utility loss +ln 2) at {_sigma_text(breaks['utility_loss_sigma'])}; "
            f"safety first or together (by loss): **{breaks['safety_loss_first_or_together']}**",
            f"- area under the refusal-vs-σ curve (per unit σ): {result['refusal_curve_area']:.3f}",
            "",
            condition_table(result["summary"]),
            "",
        ]
        samples = result.get("samples", {})
        if samples:
            out += ["<details><summary>sample clean generations</summary>", ""]
            out += [f"- {line}" for line in samples.get("harmful", []) + samples.get("benign", [])]
            out += ["", "</details>", ""]
    path.write_text("\n".join(out) + "\n")


def plot_robustness(path: Path, models: Mapping[str, Mapping[str, Any]]) -> None:
    """Refusal rate (solid) and benign answer rate (dashed) against σ, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    for (name, result), color in zip(models.items(), ["tab:blue", "tab:red", "tab:green", "tab:purple"]):
        summary = result["summary"]
        points = [(0.0, summary["clean"])] + sorted(
            ((v["sigma"], v) for v in summary.values() if v["family"] == "weight_noise"), key=lambda p: p[0]
        )
        sigmas = [s for s, _ in points]
        for metric, style, label in [("harmful_refusal_rate", "-", "refusal (harmful)"), ("benign_helpful_rate", "--", "answered (benign)")]:
            means = [v[metric]["mean"] for _, v in points]
            lows = [v[metric]["low"] for _, v in points]
            highs = [v[metric]["high"] for _, v in points]
            axis.plot(sigmas, means, style, marker="o", color=color, label=f"{name}: {label}")
            axis.fill_between(sigmas, lows, highs, color=color, alpha=0.12)
    axis.set_xlabel("relative weight noise σ")
    axis.set_ylabel("rate on held-out prompts")
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("Refusal under weight noise, before vs after refinement")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
