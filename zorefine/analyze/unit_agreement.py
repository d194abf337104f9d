"""Do the unit methods agree? Overlap of their safety sets, and with the perturbation layer ranking.

    python -m zorefine.analyze.unit_agreement RUN_DIR [RUN_DIR ...] [--layers RUN_DIR] [--out agreement.md]

Each ``RUN_DIR`` holds an analysis by a unit method (``units.json`` and ``units.safetensors``).
Printed: the Jaccard index of every pair's safety sets (entry by entry: the sets of structured
and of weight-level methods compare in the one currency they share), each method's share of the
safety set per decoder layer side by side (where they disagree shows there), and with
``--layers`` (a run with a perturbation ``sensitivity.json`` at layer granularity) the Spearman
correlation of each method's layer shares with the perturbation ranking's scores.
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path
from typing import Mapping

import torch

from zorefine.errors import ConfigError
from zorefine.models.param_masks import Masks, load_masks
from zorefine.stats import spearman

__all__ = ["jaccard", "agreement_markdown", "main"]


def jaccard(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> float:
    """|A ∩ B| / |A ∪ B| over parameter entries (1.0 for two empty sets)."""
    both = either = 0
    for name in set(first) | set(second):
        a, b = first.get(name), second.get(name)
        if a is None or b is None:
            either += int((a if a is not None else b).sum())
            continue
        both += int((a & b).sum())
        either += int((a | b).sum())
    return both / either if either else 1.0


def _load(run_dir: Path) -> tuple[str, dict, Masks]:
    report_path = run_dir / "units.json"
    if not report_path.is_file():
        raise ConfigError(f"{run_dir} has no units.json: run analyze with analyze.method=ssah|snip_diff|wanda_diff|safeseek there")
    report = json.loads(report_path.read_text())
    return report["method"], report, load_masks(run_dir / "units.safetensors")[report["safety_set"]]


def agreement_markdown(run_dirs: list[Path], layers_run: Path | None = None) -> str:
    """The agreement tables for the analyses in ``run_dirs``."""
    loaded = [_load(Path(d)) for d in run_dirs]
    names = [f"{method} ({report['safety_set']})" for method, report, _ in loaded]
    lines = ["# Agreement between unit methods", "", "Jaccard index of the safety sets, entry by entry:", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, name in enumerate(names):
        cells = [f"{jaccard(loaded[i][2], loaded[j][2]):.3f}" if i != j else "1" for j in range(len(names))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    layers = list(loaded[0][1]["layer_shares"])
    perturbation = None
    if layers_run is not None:
        sensitivity = json.loads((Path(layers_run) / "sensitivity.json").read_text())
        if sensitivity.get("granularity") != "layer":
            raise ConfigError(f"{layers_run}/sensitivity.json ranks {sensitivity.get('granularity')} units; --layers needs a layer ranking")
        perturbation = sensitivity["unit_scores"]
    header = names + (["perturbation score"] if perturbation else [])
    lines += ["", "Share of each safety set per decoder layer:", "", "| layer | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for layer in layers:
        cells = [f"{report['layer_shares'].get(layer, 0.0):.3f}" for _, report, _ in loaded]
        if perturbation:
            cells.append(f"{perturbation.get(layer, float('nan')):.4g}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    if perturbation:
        lines += ["", "Spearman correlation of each method's layer shares with the perturbation scores:", ""]
        for name, (_, report, _) in zip(names, loaded):
            if len(set(report["layer_shares"].values())) == 1:
                # SSAH takes the same fraction of every group: equal shares carry no ranking.
                lines.append(f"- {name}: undefined (the same share in every layer)")
            else:
                lines.append(f"- {name}: {spearman(report['layer_shares'], perturbation):+.3f}")
    if len(loaded) > 1:
        pairs = sorted(combinations(range(len(loaded)), 2), key=lambda p: jaccard(loaded[p[0]][2], loaded[p[1]][2]))
        low = pairs[0]
        lines += ["", f"Least agreement: {names[low[0]]} and {names[low[1]]}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories analysed with a unit method")
    parser.add_argument("--layers", type=Path, default=None, help="a run with a layer-granularity perturbation sensitivity.json")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    text = agreement_markdown(args.runs, args.layers)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
