"""The unit analysis as people read it: ``units.md`` (tables) and ``units.png`` (refusal after each ablation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

__all__ = ["plot_units", "units_markdown"]


def _interval(cell: Mapping[str, float] | None) -> str:
    if not cell:
        return "–"
    return f"{cell['mean']:+.3f} [{cell['low']:+.3f}, {cell['high']:+.3f}]"


def _freezing_verdict(row: dict) -> str:
    """Whether freezing kept refusal above the full fine-tune, lost more of it, or neither."""
    if row["keeps_refusal"]:
        return "yes"
    interval = row.get("refusal_minus_full_finetune") or {}
    if interval.get("excludes_zero") and interval.get("mean", 0) < 0:
        return "no: lower than the full fine-tune"
    return "no significant change"


def units_markdown(report: Mapping[str, Any]) -> str:
    """Markdown tables of the ablation validation and (when run) the freezing comparison."""
    ablation = report["ablation"]
    clean = ablation["clean"]
    counts = ablation["num_prompts"]
    lines = [
        f"# Unit analysis: {report['method']}",
        "",
        f"Scores on {report['data']['safety_pairs']} harmful and {report['data']['utility_pairs']} benign training pairs; "
        f"ablations measured on {counts['harmful']} harmful, {counts['safe']} safe (over-refusal) and {counts['benign']} benign "
        f"validation prompts, each set against {ablation['draws']} random sets of the same structure.",
        "",
        "| set removed | share of decoder | refusal | over-refusal | utility loss | random: refusal | random: utility loss | refusal − random [95%] | beyond random |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| nothing | 0 | {clean['refusal']:.3f} | {clean['overrefusal']:.3f} | {clean['utility_loss']:.3f} | | | | |",
    ]
    for row in ablation["rows"]:
        lines.append(
            f"| {row['set']} | {100 * row['share']:.2f}% | {row['refusal']:.3f} | {row['overrefusal']:.3f} | {row['utility_loss']:.3f} "
            f"| {row['random']['refusal']:.3f} | {row['random']['utility_loss']:.3f} | {_interval(row['refusal_minus_random'])} "
            f"| {'yes' if row['breaks_refusal_beyond_random'] else 'no'} |"
        )
    freezing = report.get("freezing")
    if freezing:
        before = freezing["before"]
        lines += [
            "",
            f"## Freezing during a benign fine-tune (`{freezing['attack']}`)",
            "",
            f"Before the fine-tune: refusal {before['refusal']:.3f}, utility loss {before['utility_loss']:.3f}.",
            "",
            "| frozen | share of decoder | refusal | over-refusal | utility loss | refusal − full fine-tune [95%] | keeps refusal |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in freezing["rows"]:
            keeps = "" if row["frozen"] == "nothing" else _freezing_verdict(row)
            lines.append(
                f"| {row['frozen']} | {100 * row['share']:.2f}% | {row['refusal']:.3f} | {row['overrefusal']:.3f} | {row['utility_loss']:.3f} "
                f"| {_interval(row.get('refusal_minus_full_finetune'))} | {keeps} |"
            )
    cost = report["cost"]
    lines += ["", f"Cost: {cost['attribution']['forward']} forward and {cost['attribution']['backward']} backward passes for the scores, "
              f"{cost['ablation_forward_calls']} forward calls for the validation, {cost['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot_units(report: Mapping[str, Any], path: Path) -> None:
    """Refusal with each set removed next to its random controls (and the intact model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["ablation"]["rows"]
    labels = ["nothing"] + [row["set"] for row in rows]
    removed = [report["ablation"]["clean"]["refusal"]] + [row["refusal"] for row in rows]
    random = [float("nan")] + [row["random"]["refusal"] for row in rows]
    positions = range(len(labels))
    figure, axis = plt.subplots(figsize=(1.6 * len(labels) + 2, 3.2))
    axis.bar([p - 0.2 for p in positions], removed, width=0.4, label="set removed")
    axis.bar([p + 0.2 for p in positions], random, width=0.4, label="random set, same structure", color="0.7")
    axis.set_xticks(list(positions), labels)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("refusal on harmful prompts")
    axis.set_title(f"{report['method']}: ablation validation")
    axis.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
