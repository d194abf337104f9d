"""The trade-off plot of the val studies: robustness bought against what it cost.

Reads every ``experiments/s*/comparison.json``. Settings run over several refinement seeds
(pooled rows) are drawn with 95% intervals over the seeds on both axes; single-seed settings of
the earlier studies are drawn as small grey points, since one seed's value is as much its
random walk as its setting. x: the drop in attack success rate under weight noise; y: the rise
in over-refusal; colour: the change in utility loss (left panel) and the forward passes spent
are in the labels.

Usage: ``python experiments/plot_tradeoff.py`` (writes ``experiments/tradeoff.png``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent


def _none_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in rows if r["method"] == "none")


def single_seed_points() -> list[dict[str, Any]]:
    """One point per refined run of the studies that used one refinement seed per setting."""
    found = []
    for path in sorted(HERE.glob("s*/comparison.json")):
        document = json.loads(path.read_text())
        if document.get("pooled"):
            continue
        none = _none_row(document["rows"])
        for row in document["rows"]:
            if row["method"] != "none":
                found.append({
                    "study": path.parent.name,
                    "asr_drop": none["asr_under_noise"] - row["asr_under_noise"],
                    "overrefusal_rise": row["overrefusal"] - none["overrefusal"],
                })
    return found


def pooled_points() -> list[dict[str, Any]]:
    """One point per setting run over several refinement seeds, with its 95% intervals."""
    found = []
    for path in sorted(HERE.glob("s*/comparison.json")):
        document = json.loads(path.read_text())
        if not document.get("pooled"):
            continue
        none = _none_row(document["rows"])
        for row in document["pooled"]:
            asr, over, utility = row["asr_under_noise"], row["overrefusal"], row["utility_loss"]
            found.append({
                "study": path.parent.name,
                "label": row["label"],
                "runs": row["runs"],
                "forward_passes": row.get("forward_passes"),
                "asr_drop": none["asr_under_noise"] - asr["mean"],
                "asr_drop_interval": (none["asr_under_noise"] - asr["high"], none["asr_under_noise"] - asr["low"]),
                "overrefusal_rise": over["mean"] - none["overrefusal"],
                "overrefusal_interval": (over["low"] - none["overrefusal"], over["high"] - none["overrefusal"]),
                "utility_change": utility["mean"] - none["utility_loss"],
            })
    return found


def _short(label: str) -> str:
    """A plot label: no ``refine.`` prefixes; a reused selection named by its run directory."""
    label = re.sub(r"selection_file=[^,\]]*/([^/,\]]+)/selection\.json", r"selection=\1", label.replace("refine.", ""))
    label = re.sub(r"(, )?selection=run", "", label).replace("[, ", "[").replace(" []", "")
    return label.replace("zo [", "[")


def main() -> None:
    singles, pooled = single_seed_points(), pooled_points()
    fig, axis = plt.subplots(figsize=(8.0, 5.4))
    x_range, y_range = (-0.05, 0.08), (-0.06, 0.16)
    inside = [p for p in singles if x_range[0] <= p["asr_drop"] <= x_range[1] and y_range[0] <= p["overrefusal_rise"] <= y_range[1]]
    axis.scatter([p["asr_drop"] for p in inside], [p["overrefusal_rise"] for p in inside], s=12, color="lightgray",
                 label=f"one refinement seed (studies 1–6; {len(singles) - len(inside)} runs that erased refusal are off the plot)", zorder=1)
    colours = plt.get_cmap("coolwarm")
    for index, p in enumerate(pooled):
        x, y = p["asr_drop"], p["overrefusal_rise"]
        xerr = [[x - p["asr_drop_interval"][0]], [p["asr_drop_interval"][1] - x]]
        yerr = [[y - p["overrefusal_interval"][0]], [p["overrefusal_interval"][1] - y]]
        colour = colours(0.5 + max(-0.5, min(0.5, p["utility_change"] / 0.2)))
        axis.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", color=colour, markeredgecolor="black",
                      ecolor=colour, elinewidth=1, capsize=2, zorder=2)
        label = _short(p["label"])
        axis.annotate(f"{p['study'].split('_')[0]} {label}", (x, y), fontsize=6,
                      xytext=(4, 3 if index % 2 else -8), textcoords="offset points")
    axis.axhline(0.01, color="gray", linestyle=":", linewidth=0.8)
    axis.axvline(0.0, color="gray", linewidth=0.8)
    axis.set_xlim(*x_range)
    axis.set_ylim(*y_range)
    axis.set_xlabel("drop in ASR under weight noise (val, mean over σ ∈ {0.4, 0.6, 0.8}) →  better")
    axis.set_ylabel("rise in over-refusal (XSTest) ↑ worse")
    axis.set_title("Refinement settings on val at 400 forward passes: robustness bought vs over-refusal paid\n"
                   "(bars: 95% over 5 refinement seeds; colour: utility-loss change, red = worse; dotted: +1 point)",
                   fontsize=9)
    axis.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "tradeoff.png", dpi=120)
    print(json.dumps(pooled, indent=1))


if __name__ == "__main__":
    main()
