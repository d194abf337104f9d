"""The README's final table from one or more sweeps' ``comparison.json``.

Columns: forward passes and refine wall time, clean ASR, over-refusal, utility loss, ASR under
weight noise at the reference level (the smallest σ at which the unrefined model's ASR is at
least 30%) and the next level, ASR under activation noise (mean over the seeded ``anoise``
conditions), under int4 and NF4 quantization, and the relative change of the ASR at the
reference level against the unrefined model.

Runs that differ only in ``refine.seed`` are pooled into one row: each run's value (for noise,
its mean over the noise seeds) is one sample, and the interval is a 95% t-interval over the
refinement seeds. The unrefined model is one run: its intervals are over the noise seeds.

Usage: ``python experiments/final_table.py SWEEP_DIR/comparison.json [MORE.json ...]``
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from zorefine.evaluate.report import format_interval
from zorefine.stats import mean_interval

REFERENCE_ASR = 0.30
POOL_KEY = "refine.seed="


def _noise_levels(asr: dict[str, dict]) -> list[tuple[float, str]]:
    levels = []
    for key in asr:
        match = re.fullmatch(r"wnoise σ=([0-9.]+)", key)
        if match:
            levels.append((float(match.group(1)), key))
    return sorted(levels)


def _anoise(row: dict[str, Any]) -> float | None:
    values = [cell["mean"] for key, cell in row["asr_by_condition"].items() if key.startswith("anoise:")]
    return sum(values) / len(values) if values else None


def _groups(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Rows grouped by everything but the refinement seed, in first-seen order, each labelled by
    its method and the overrides that set it apart from the other groups."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        setting = tuple(o for o in row["overrides"] if not o.startswith(POOL_KEY))
        groups.setdefault((row["method"], *setting), []).append(row)
    refined = [set(key[1:]) for key in groups if key[0] != "none"]
    shared = set.intersection(*refined) if refined else set()
    labelled = []
    for (method, *setting), members in groups.items():
        distinct = [o for o in setting if o not in shared and not o.startswith(("refine.method=", "hydra."))]
        label = "none (alignment only)" if method == "none" else method + (f" [{', '.join(distinct)}]" if distinct else "")
        labelled.append((label, members))
    return labelled


def _cell(members: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None], single: Callable[[dict[str, Any]], dict] | None = None) -> str:
    """Mean [95% interval] over the refinement seeds; one run shows its own (noise-seed) interval."""
    if len(members) == 1:
        return format_interval(single(members[0])) if single else f"{value(members[0]):.3f}"
    values = [value(m) for m in members]
    return format_interval(mean_interval([v for v in values if v is not None]))


def _load(paths: list[str]) -> list[dict[str, Any]]:
    rows, seen_none = [], False
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            if row["method"] == "none":
                # Every sweep starts from the same aligned model: keep one row for it.
                if seen_none:
                    continue
                seen_none = True
            rows.append(row)
    return rows


def main(paths: list[str]) -> None:
    rows = _load(paths)
    none = next(r for r in rows if r["method"] == "none")
    levels = _noise_levels(none["asr_by_condition"])
    reference = next((i for i, (_, key) in enumerate(levels) if none["asr_by_condition"][key]["mean"] >= REFERENCE_ASR), None)
    if reference is None:
        raise SystemExit(f"the unrefined model's ASR never reaches {REFERENCE_ASR} in the grid")
    shown = levels[reference : reference + 2]
    reference_key = shown[0][1]
    reference_asr = none["asr_by_condition"][reference_key]["mean"]
    header = ["model", "seeds", "forward passes", "refine s", "clean ASR", "over-refusal", "utility loss"]
    header += [f"ASR, wnoise σ={sigma:g}" for sigma, _ in shown]
    header += ["ASR, anoise 0.4", "ASR, int4", "ASR, NF4", f"change at σ={shown[0][0]:g}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, members in _groups(rows):
        method = members[0]["method"]
        asr = lambda key: (lambda m: m["asr_by_condition"][key]["mean"] if key in m["asr_by_condition"] else None)
        seconds = [m["seconds"] for m in members if m.get("seconds") is not None]
        change = sum(asr(reference_key)(m) for m in members) / len(members) / reference_asr - 1
        cells = [
            label,
            str(len(members)),
            str(max(m["forward_passes"] for m in members)),
            f"{sum(seconds) / len(seconds):.1f}" if seconds else "–",
            _cell(members, asr("clean")),
            _cell(members, lambda m: m["overrefusal"]),
            _cell(members, lambda m: m["utility_loss"]),
            *(_cell(members, asr(key), lambda m, key=key: m["asr_by_condition"][key]) for _, key in shown),
            _cell(members, _anoise, lambda m: mean_interval([c["mean"] for k, c in m["asr_by_condition"].items() if k.startswith("anoise:")])),
            _cell(members, asr("rtn:int4")) if "rtn:int4" in members[0]["asr_by_condition"] else "–",
            _cell(members, asr("bnb:nf4")) if "bnb:nf4" in members[0]["asr_by_condition"] else "–",
            "–" if method == "none" else f"{change:+.0%}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
