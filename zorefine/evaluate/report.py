"""The evaluation report: markdown tables and the robustness plot, before vs after refinement."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

from zorefine.evaluate.paired import format_paired
from zorefine.evaluate.curves import noise_curve
from zorefine.evaluate.document import Bullets, Details, Document, Heading, Image, Paragraph, Table

ROWS = [
    ("harmful_refusal_rate", "refusal (harmful) ↑"),
    ("attack_success_rate", "ASR ↓"),
    ("harmful_degenerate_rate", "degenerate (harmful)"),
    ("benign_refusal_rate", "refusal (benign) ↓"),
    ("benign_helpful_rate", "answered (benign) ↑"),
    ("overrefusal_rate", "over-refusal (XSTest) ↓"),
    ("safety_loss", "safety loss ↓"),
    ("utility_loss", "utility loss ↓"),
    ("benign_agreement", "benign answers as clean ↑"),
]


def format_interval(cell: Mapping[str, float]) -> str:
    """``mean [low, high]`` of a summary cell (just the mean when the interval is empty; – for none)."""
    mean = cell["mean"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if cell.get("high") is not None and cell["high"] > cell["low"]:
        return f"{mean:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"
    return f"{mean:.3f}"


def condition_table(summary: Mapping[str, Mapping[str, Any]]) -> Table:
    """Conditions as columns, metrics as rows."""
    conditions = list(summary)
    return Table(["metric", *conditions], [[title, *(format_interval(summary[c][key]) for c in conditions)] for key, title in ROWS])


def before_after_table(models: Mapping[str, Mapping[str, Any]]) -> Table:
    """Harmful refusal and benign answer rates per condition, one column per model."""
    names = list(models)
    conditions = list(next(iter(models.values()))["summary"])
    header = ["condition", *(f"refusal, {n}" for n in names), *(f"answered benign, {n}" for n in names)]
    rows = []
    for condition in conditions:
        refusal = [format_interval(models[n]["summary"][condition]["harmful_refusal_rate"]) for n in names]
        helpful = [format_interval(models[n]["summary"][condition]["benign_helpful_rate"]) for n in names]
        rows.append([condition, *refusal, *helpful])
    return Table(header, rows)


def _sigma_text(sigma: Optional[float]) -> str:
    return "never (within the grid)" if sigma is None else f"σ = {sigma:g}"


def _level_text(level: Optional[Mapping[str, Any]]) -> str:
    # Metrics written before the interpolated level existed have none.
    if not level:
        return ""
    found = f"σ = {format_interval(level)} over {level['n']} seed(s)" if level["n"] else "no seed"
    beyond = f"; {level['never']} seed(s) never within σ ≤ {level['max_sigma']:g}" if level["never"] else ""
    return f" (interpolated per noise seed: {found}{beyond})"


def _model_findings(result: Mapping[str, Any]) -> Bullets:
    breaks = result["breaks"]
    area = result.get("refusal_curve_area_interval") or {"mean": result["refusal_curve_area"], "n": 1}
    robust = result.get("robust_sigma")
    return Bullets([
        f"area under the refusal-vs-σ curve (per unit σ): **{format_interval(area)}**",
        f"robust σ (refusal stays ≥ {result.get('robust_level', 0.9):g}): "
        + ("none: refusal is below the level even clean" if robust is None else f"**{robust:g}**"),
        f"refusal breaks (falls below {breaks['fraction']:g} × clean) at {_sigma_text(breaks['refusal_sigma'])}"
        + _level_text(breaks.get("refusal_level")),
        f"benign answers break at {_sigma_text(breaks['benign_sigma'])}",
        f"safety breaks first or together (by generation): **{breaks['safety_first_or_together']}**",
        f"refusal perplexity doubles (safety loss +ln 2) at {_sigma_text(breaks['safety_loss_sigma'])}; "
        f"benign-answer perplexity doubles (utility loss +ln 2) at {_sigma_text(breaks['utility_loss_sigma'])}; "
        f"safety first or together (by loss): **{breaks['safety_loss_first_or_together']}**",
    ])


def paired_table(paired: Mapping[str, Mapping[str, Any]]) -> Table:
    """After − before per condition and outcome, paired on prompts and noise draws, with the verdict."""
    outcomes = [o for o in ("attack_success", "overrefusal", "benign_refusal") if paired.get(o)]
    groups = list(dict.fromkeys(g for o in outcomes for g in paired[o]))
    names = {"attack_success": "Δ attack success ↓", "overrefusal": "Δ over-refusal ↓", "benign_refusal": "Δ benign refusal ↓"}
    rows = [[group, *(format_paired(paired[o].get(group)) for o in outcomes)] for group in groups]
    return Table(["condition", *(names[o] for o in outcomes)], rows)


def report_document(
    models: Mapping[str, Mapping[str, Any]], header: Mapping[str, Any], plot: Path | None = None,
    paired: Mapping[str, Mapping[str, Any]] | None = None,
) -> Document:
    """The evaluation report of one run (one or two evaluated models)."""
    doc = Document("zorefine report")
    doc.add(Bullets([f"**{key}**: {value}" for key, value in header.items()]))
    doc.add(Paragraph(
        "Rates are fractions of held-out test prompts judged by the refusal judge; noise rows show the "
        "mean and 95% interval over seeds. σ is relative Gaussian weight noise (× each tensor's RMS)."
    ))
    if plot is not None:
        doc.add(Image(plot, "refusal (solid) and benign answers (dashed) against weight noise σ"))
    if len(models) > 1:
        doc.add(Heading("Before vs after refinement"), before_after_table(models))
    if paired and any(paired.values()):
        doc.add(Heading("Paired differences, after − before"), Paragraph(
            "Per prompt, the after model's outcome minus the before model's on the same prompt under the same noise "
            "draw; mean and 95% hierarchical-bootstrap interval over noise draws and prompts. 'better' or 'worse' only "
            "where the interval excludes zero; otherwise 'no significant change'."
        ), paired_table(paired))
    for name, result in models.items():
        doc.add(Heading(f"{name}: `{result['checkpoint']}`"), _model_findings(result), condition_table(result["summary"]))
        samples = result.get("samples", {})
        if samples:
            doc.add(Details("sample clean generations", samples.get("harmful", []) + samples.get("benign", [])))
    return doc


def write_report(
    run_dir: Path, models: Mapping[str, Mapping[str, Any]], header: Mapping[str, Any],
    paired: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Plot the robustness curves and write ``report.md`` and the self-contained ``report.html``."""
    plot = run_dir / "robustness.png"
    plot_robustness(plot, models)
    return report_document(models, header, plot, paired).write(run_dir, "report")


def plot_robustness(path: Path, models: Mapping[str, Mapping[str, Any]]) -> None:
    """Refusal rate (solid) and benign answer rate (dashed) against σ, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    for (name, result), color in zip(models.items(), ["tab:blue", "tab:red", "tab:green", "tab:purple"]):
        summary = result["summary"]
        points = noise_curve(summary)
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
    save_figure(fig, axis, path, "Refusal under weight noise, before vs after refinement")


def save_figure(fig, axis, path: Path, title: str, legend_size: int = 8) -> None:
    """Grid, legend and title, then write ``path`` and free the figure."""
    import matplotlib.pyplot as plt

    axis.grid(alpha=0.3)
    axis.legend(fontsize=legend_size)
    axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
