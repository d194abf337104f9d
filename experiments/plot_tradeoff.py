"""The trade-off plot of the val studies: robustness bought against what it cost.

Reads every ``experiments/s*/comparison.json`` and plots, for each refined setting, the drop
in attack success rate under weight noise (x) against the rise in over-refusal (y), with the
marker size giving the forward passes spent and the colour the change in clean refusal.

Usage: ``python experiments/plot_tradeoff.py`` (writes ``experiments/tradeoff.png``).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent


def points() -> list[dict]:
    """One point per refined setting of every study, relative to that study's unrefined row."""
    found = []
    for path in sorted(HERE.glob("s*/comparison.json")):
        rows = json.loads(path.read_text())["rows"]
        none = next(r for r in rows if r["method"] == "none")
        for row in rows:
            if row["method"] == "none":
                continue
            found.append({
                "study": path.parent.name,
                "label": row["label"],
                "asr_drop": none["asr_under_noise"] - row["asr_under_noise"],
                "overrefusal_rise": row["overrefusal"] - none["overrefusal"],
                "clean_refusal_change": row["clean_refusal"] - none["clean_refusal"],
                "utility_change": row["utility_loss"] - none["utility_loss"],
                "forward_passes": row["forward_passes"],
            })
    return found


def main() -> None:
    data = points()
    fig, axis = plt.subplots(figsize=(7.2, 4.8))
    scatter = axis.scatter(
        [p["asr_drop"] for p in data],
        [p["overrefusal_rise"] for p in data],
        s=[20 + p["forward_passes"] / 2 for p in data],
        c=[p["clean_refusal_change"] for p in data],
        cmap="RdYlGn", vmin=-0.1, vmax=0.1, edgecolors="black", linewidths=0.5,
    )
    for p in data:
        if p["asr_drop"] > 0.03:
            axis.annotate(f"{p['study'].split('_')[0]} {p['label'].removeprefix('zo ')}", (p["asr_drop"], p["overrefusal_rise"]), fontsize=6)
    axis.axhline(0.01, color="gray", linestyle=":", linewidth=0.8)
    axis.axvline(0.0, color="gray", linewidth=0.8)
    axis.set_xlim(-0.05, 0.08)
    axis.set_ylim(-0.05, 0.15)
    axis.set_xlabel("drop in ASR under weight noise (val, mean over σ ∈ {0.4, 0.6, 0.8}) →  better")
    axis.set_ylabel("rise in over-refusal (XSTest) ↑ worse")
    fig.colorbar(scatter, label="change in clean refusal")
    axis.set_title("ZO settings on val: robustness bought vs over-refusal paid\n(marker size: forward passes; dotted: +1 point)")
    fig.tight_layout()
    fig.savefig(HERE / "tradeoff.png", dpi=120)
    print(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
