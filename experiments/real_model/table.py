"""The real model's robustness table from evaluate runs' ``metrics.json`` files.

    python experiments/real_model/table.py NAME=RUN_DIR[:MODEL] [NAME=RUN_DIR[:MODEL] ...] > table.md

MODEL picks one model of the run (``model``, ``before`` or ``after``; default: the first).
Per model and threat: refusal of the harmful prompts, its paired drop from clean (the same
prompts, clean minus under the threat; interval: hierarchical bootstrap over noise draws, then
prompts), degenerate answers, over-refusal on XSTest safe prompts, the utility loss (NLL of the
reference benign answers) and the agreement of the benign greedy answers with the clean
model's. Then, per noise family, the breaking level, and for each later model the paired
difference in attack success against the first model on every threat.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from zorefine.evaluate.paired import format_paired, outcome_arrays, paired_differences
from zorefine.evaluate.report import format_interval
from zorefine.evaluate.curves import with_current_intervals
from zorefine.evaluate.robustness import subsample
from zorefine.stats import hierarchical_bootstrap, paired_verdict


def load(spec: str) -> tuple[str, dict, dict]:
    name, _, rest = spec.partition("=")
    directory, _, model = rest.partition(":")
    metrics = json.loads((Path(directory) / "metrics.json").read_text())
    model = model or next(iter(metrics["models"]))
    return name, with_current_intervals(metrics["models"][model], metrics["config"]["evaluate"]["break_fraction"]), metrics


def refusal_drop(result: dict, metrics: dict) -> dict[str, dict]:
    """Per threat group: clean refusal minus refusal under the threat, paired on the grid's prompts."""
    clean = next(c for c in result["conditions"] if c["family"] == "clean")["outcomes"]["harmful_refusal"]
    # The grid's prompts are the seeded subsample of the clean condition's (evaluate.stage.eval_sets).
    picked = subsample(list(range(len(clean))), metrics["num_prompts"]["threats"]["harmful"], metrics["config"]["seed"])
    clean_on_grid = np.asarray([clean[i] for i in picked], dtype=float)
    drops = {}
    for group, draws in outcome_arrays(result, "harmful_refusal").items():
        if group == "clean":
            continue
        interval = hierarchical_bootstrap(clean_on_grid[None, :] - draws)
        drops[group] = {**interval, "verdict": paired_verdict(interval, lower_is_better=False)}
    return drops


def model_table(name: str, result: dict, metrics: dict) -> list[str]:
    drops = refusal_drop(result, metrics)
    lines = [f"### {name}", "",
             "| condition | refusal (harmful) | paired refusal change vs clean | degenerate (harmful) | over-refusal (XSTest) | utility loss | benign answers as clean |",
             "|---|---|---|---|---|---|---|"]
    for group, cell in result["summary"].items():
        drop = drops.get(group)
        change = "–" if drop is None else f"{-drop['mean']:+.3f} [{-drop['high']:+.3f}, {-drop['low']:+.3f}]"
        lines.append(
            f"| {group} | {format_interval(cell['harmful_refusal_rate'])} | {change} | "
            f"{format_interval(cell['harmful_degenerate_rate'])} | {format_interval(cell['overrefusal_rate'])} | "
            f"{format_interval(cell['utility_loss'])} | {format_interval(cell['benign_agreement'])} |"
        )
    level = result["breaks"].get("refusal_level") or {}
    found = f"σ = {format_interval(level)} over {level['n']} seed(s)" if level.get("n") else "no seed breaks"
    never = f"; {level['never']} seed(s) do not break within σ ≤ {level['max_sigma']:g}" if level.get("never") else ""
    lines += ["", f"Breaking level of relative weight noise (refusal below half its clean value): {found}{never}.", ""]
    return lines


def main(specs: list[str]) -> None:
    loaded = [load(spec) for spec in specs]
    lines = []
    for name, result, metrics in loaded:
        lines += model_table(name, result, metrics)
    first_name, first, _ = loaded[0]
    for name, result, _ in loaded[1:]:
        paired = paired_differences([result], [first], "attack_success")
        lines += [f"### Attack success, {name} − {first_name} (paired on prompts and noise draws)", "",
                  "| condition | difference |", "|---|---|"]
        lines += [f"| {group} | {format_paired(cell)} |" for group, cell in paired.items()] + [""]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
