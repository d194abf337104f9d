"""The README's final table from a baselines sweep's ``comparison.json``.

Columns: forward passes and refine wall time, clean ASR, over-refusal, utility loss, ASR under
weight noise at the reference level (the smallest σ at which the unrefined model's ASR is at
least 30%) and the next level, ASR under activation noise (mean and 95% interval over the
seeded ``anoise`` conditions), under int4 and NF4 quantization.

Usage: ``python experiments/final_table.py SWEEP_DIR/comparison.json``
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from zorefine.report import format_interval
from zorefine.robustness import mean_interval

REFERENCE_ASR = 0.30


def _noise_levels(asr: dict[str, dict]) -> list[tuple[float, str]]:
    levels = []
    for key in asr:
        match = re.fullmatch(r"wnoise σ=([0-9.]+)", key)
        if match:
            levels.append((float(match.group(1)), key))
    return sorted(levels)


def main(path: str) -> None:
    rows = json.loads(Path(path).read_text())["rows"]
    none = next(r for r in rows if r["method"] == "none")
    levels = _noise_levels(none["asr_by_condition"])
    reference = next((i for i, (_, key) in enumerate(levels) if none["asr_by_condition"][key]["mean"] >= REFERENCE_ASR), None)
    if reference is None:
        raise SystemExit(f"the unrefined model's ASR never reaches {REFERENCE_ASR} in the grid")
    shown = levels[reference : reference + 2]
    header = ["model", "forward passes", "refine s", "clean ASR", "over-refusal", "utility loss"]
    header += [f"ASR, wnoise σ={sigma:g}" for sigma, _ in shown] + ["ASR, anoise 0.4", "ASR, int4", "ASR, NF4"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        asr = row["asr_by_condition"]
        anoise = mean_interval([cell["mean"] for key, cell in asr.items() if key.startswith("anoise:")])
        cells = [
            row["label"].split(" [")[0],
            str(row["forward_passes"]),
            "–" if row.get("seconds") is None else f"{row['seconds']:g}",
            f"{asr['clean']['mean']:.3f}",
            f"{row['overrefusal']:.3f}",
            f"{row['utility_loss']:.3f}",
            *(format_interval(asr[key]) for _, key in shown),
            format_interval(anoise),
            f"{asr['rtn:int4']['mean']:.3f}" if "rtn:int4" in asr else "–",
            f"{asr['bnb:nf4']['mean']:.3f}" if "bnb:nf4" in asr else "–",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
