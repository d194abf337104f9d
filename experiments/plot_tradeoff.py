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

from zorefine.evaluate.compare import pooled_rows

HERE = Path(__file__).parent


def _none_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in rows if r["method"] == "none")


def _study_files() -> list[Path]:
    """Every study's comparison, in study order (s7 before s10)."""
    return sorted(HERE.glob("s*/comparison.json"), key=lambda path: int(re.match(r"s(\d+)", path.parent.name).group(1)))


def single_seed_points() -> list[dict[str, Any]]:
    """One point per refined run of the studies that used one refinement seed per setting."""
    found = []
    for path in _study_files():
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


def _budgets(document: dict[str, Any]) -> dict[tuple[str, ...], int | None]:
    """Forward passes per pooled setting, keyed by method and overrides. Reports older than the
    pooled ``forward_passes`` field get them from compare's own pooling of their per-seed rows."""
    pooled = document["pooled"]
    if any(row.get("forward_passes") is None for row in pooled):
        pooled = pooled_rows(document["rows"], pooled[0].get("pooled_over", "refine.seed"))[2]
    return {(row["method"], *row["overrides"]): row.get("forward_passes") for row in pooled}


def pooled_points() -> list[dict[str, Any]]:
    """One point per setting run over several refinement seeds, with its 95% intervals."""
    found = []
    for path in _study_files():
        document = json.loads(path.read_text())
        if not document.get("pooled"):
            continue
        none, budgets = _none_row(document["rows"]), _budgets(document)
        for row in document["pooled"]:
            asr, over, utility = row["asr_under_noise"], row["overrefusal"], row["utility_loss"]
            found.append({
                "study": path.parent.name,
                "label": row["label"],
                "runs": row["runs"],
                "forward_passes": budgets.get((row["method"], *row["overrides"])),
                "asr_drop": none["asr_under_noise"] - asr["mean"],
                "asr_drop_interval": (none["asr_under_noise"] - asr["high"], none["asr_under_noise"] - asr["low"]),
                "overrefusal_rise": over["mean"] - none["overrefusal"],
                "overrefusal_interval": (over["low"] - none["overrefusal"], over["high"] - none["overrefusal"]),
                "clean_asr_rise": none["clean_refusal"] - row["clean_refusal"]["mean"],
                "utility_change": utility["mean"] - none["utility_loss"],
            })
    return found


def _short(label: str) -> str:
    """A plot label: no ``refine.`` prefixes; a reused selection named by its run directory."""
    label = re.sub(r"selection_file=[^,\]]*/([^/,\]]+)/selection\.json", r"selection=\1", label.replace("refine.", ""))
    label = re.sub(r"(, )?selection=run", "", label).replace("[, ", "[").replace(" []", "")
    return label.replace("zo [", "[")


# Marker per budget, so the panels can be read together without a label on every point.
BUDGET_MARKERS = {400: "o", 1200: "s", 2000: "D"}


def _nearest_budget(forward_passes: int | None) -> int:
    # Budget-matched baselines spend a few passes less (a backward counts as two forwards).
    return min(BUDGET_MARKERS, key=lambda budget: abs(budget - (forward_passes or 400)))


def _utility_colour(change: float) -> Any:
    # ±0.2 nats/token (about 2.5% of the utility loss) spans the colour map.
    return plt.get_cmap("coolwarm")(0.5 + max(-0.5, min(0.5, change / 0.2)))


def _draw_cost_panel(axis: Any, singles: list[dict[str, Any]], pooled: list[dict[str, Any]]) -> None:
    """ASR drop against over-refusal rise, each seeded setting numbered for the key."""
    x_range, y_range = (-0.05, 0.08), (-0.06, 0.16)
    inside = [p for p in singles if x_range[0] <= p["asr_drop"] <= x_range[1] and y_range[0] <= p["overrefusal_rise"] <= y_range[1]]
    axis.scatter([p["asr_drop"] for p in inside], [p["overrefusal_rise"] for p in inside], s=12, color="lightgray",
                 label=f"one refinement seed (studies 1–6; {len(singles) - len(inside)} runs that erased refusal are off the plot)", zorder=1)
    for number, p in enumerate(pooled, start=1):
        x, y = p["asr_drop"], p["overrefusal_rise"]
        xerr = [[x - p["asr_drop_interval"][0]], [p["asr_drop_interval"][1] - x]]
        yerr = [[y - p["overrefusal_interval"][0]], [p["overrefusal_interval"][1] - y]]
        colour = _utility_colour(p["utility_change"])
        axis.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=BUDGET_MARKERS[_nearest_budget(p["forward_passes"])], color=colour, markeredgecolor="black",
                      ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.9, zorder=2)
        axis.annotate(str(number), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points", zorder=3)
    for budget, marker in BUDGET_MARKERS.items():
        axis.scatter([], [], marker=marker, color="white", edgecolor="black", label=f"{budget} forward passes")
    axis.axhline(0.01, color="gray", linestyle=":", linewidth=0.8)
    axis.axvline(0.0, color="gray", linewidth=0.8)
    axis.set_xlim(*x_range)
    axis.set_ylim(*y_range)
    axis.set_xlabel("drop in ASR under weight noise (val, σ 0.4–0.8) →  better")
    axis.set_ylabel("rise in over-refusal (XSTest) ↑ worse")
    axis.set_title("robustness bought vs over-refusal paid\n(bars: 95% over 5 refinement seeds; colour: "
                   "utility-loss change, red = worse; dotted: +1 point)", fontsize=8)
    axis.legend(loc="lower right", fontsize=6)


def _draw_budget_panel(axis: Any, pooled: list[dict[str, Any]]) -> None:
    """ASR drop against forward passes: what more budget buys."""
    at_budget: dict[int, int] = {}
    for number, p in enumerate(pooled, start=1):
        budget = _nearest_budget(p["forward_passes"])
        # Settings at one budget are spread sideways so their bars and numbers stay apart.
        slot = at_budget.get(budget, 0)
        at_budget[budget] = slot + 1
        x, y = budget + 35 * (slot - 8 if budget == 400 else slot), p["asr_drop"]
        yerr = [[y - p["asr_drop_interval"][0]], [p["asr_drop_interval"][1] - y]]
        colour = _utility_colour(p["utility_change"])
        axis.errorbar(x, y, yerr=yerr, fmt=BUDGET_MARKERS[budget], color=colour, markeredgecolor="black", ecolor=colour,
                      elinewidth=0.8, capsize=2, alpha=0.9, markersize=5)
        axis.annotate(str(number), (x, y), fontsize=5, xytext=(2, 3), textcoords="offset points")
    axis.axhline(0.0, color="gray", linewidth=0.8)
    axis.set_xticks(sorted(BUDGET_MARKERS), [str(b) for b in sorted(BUDGET_MARKERS)])
    axis.set_xlim(0, 2300)
    axis.set_xlabel("forward passes spent on refinement")
    axis.set_ylabel("drop in ASR under weight noise →  better")
    axis.set_title("robustness bought vs budget", fontsize=8)


def _key(pooled: list[dict[str, Any]]) -> str:
    lines = []
    for number, p in enumerate(pooled, start=1):
        # Labels omit overrides a study's sweeps share (study 13's 600 steps), so the budget is spelled out.
        lines.append(f"{number:>2} {p['study'].split('_')[0]} {_short(p['label'])}  {p['forward_passes']} fwd, "
                     f"clean ASR {100 * p['clean_asr_rise']:+.1f}pt, util {p['utility_change']:+.3f}")
    lines.append("")
    lines.append("change vs the model refined from; s7 and s10–s13 refine one aligned")
    lines.append("model, s8–s9 another (experiments/README.md)")
    return "\n".join(lines)


def main() -> None:
    singles, pooled = single_seed_points(), pooled_points()
    fig = plt.figure(figsize=(15.5, 5.6))
    grid = fig.add_gridspec(1, 3, width_ratios=[1.2, 0.85, 1.25])
    _draw_cost_panel(fig.add_subplot(grid[0]), singles, pooled)
    _draw_budget_panel(fig.add_subplot(grid[1]), pooled)
    key_axis = fig.add_subplot(grid[2])
    key_axis.axis("off")
    key_axis.text(-0.08, 1.0, _key(pooled), fontsize=6.5, family="monospace", va="top", transform=key_axis.transAxes)
    fig.suptitle("Refinement settings on val: robustness against clean safety, over-refusal, utility and forward passes",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(HERE / "tradeoff.png", dpi=120)
    print(json.dumps(pooled, indent=1))


if __name__ == "__main__":
    main()
