"""The runs a comparison reads: one :class:`Entry` per evaluated model, found under run or sweep folders."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from zorefine.errors import DataError
from zorefine.run import METRICS_FILE
from zorefine.stats import mean_interval


@dataclass
class Entry:
    """One evaluated model of one run: a row of the comparison."""

    label: str
    method: str
    run_dir: Path
    forward_passes: int
    steps: int
    layers: list[int]
    result: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    before_area: float | None = None  # the area of the model this one was refined from
    seconds: float | None = None  # wall time of the refine stage
    before: dict[str, Any] | None = None  # the evaluation of the model this one was refined from


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run directories under ``paths``: each path itself, or its sub-directories (two levels) with metrics."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path} does not exist")
        if (path / METRICS_FILE).is_file():
            runs.append(path)
            continue
        found = sorted({p.parent for p in list(path.glob(f"*/{METRICS_FILE}")) + list(path.glob(f"*/*/{METRICS_FILE}"))}, key=_natural_key)
        if not found:
            raise DataError(f"{path}: no {METRICS_FILE} in it or in its sub-directories (did the evaluate stage run?)")
        runs.extend(found)
    return runs


def _natural_key(path: Path) -> tuple:
    """Hydra job directories 0, 1, ..., 10 in numeric order."""
    return tuple(int(part) if part.isdigit() else part for part in path.parts)


def _overrides(run_dir: Path) -> list[str]:
    """The command-line overrides of a Hydra job (what distinguishes sweep members)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    lines = [line.strip() for line in path.read_text().splitlines()]
    # Hydra escapes ':' in the saved overrides; labels read better without the backslashes.
    return [line[2:].replace("\\:", ":") for line in lines if line.startswith("- ")]


def load_entries(run_dirs: Sequence[Path]) -> list[Entry]:
    """The comparison rows: one ``none`` row per distinct starting checkpoint, then every refined model."""
    entries: list[Entry] = []
    befores: dict[str, Entry] = {}
    for run_dir in run_dirs:
        try:
            metrics = json.loads((run_dir / METRICS_FILE).read_text())
            models = metrics["models"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise DataError(f"{run_dir / METRICS_FILE} is not a zorefine metrics file ({exc})") from None
        refine_summary = _stage_summary(run_dir, "refine")
        overrides = _overrides(run_dir)
        before = models.get("before") or models.get("model")
        # Sweep jobs each hold their own copy of the same aligned model: one row per distinct
        # set of measurements, not per path.
        key = json.dumps(before["summary"], sort_keys=True) if before is not None else None
        if before is not None and key not in befores:
            befores[key] = Entry("none (alignment only)", "none", run_dir, 0, 0, [], before)
        if "after" in models:
            method = refine_summary.get("method") or metrics["config"]["refine"].get("method", "zo")
            label = method + (f" [{', '.join(overrides)}]" if overrides else f" ({run_dir.name})")
            entries.append(Entry(
                # Every pass the method spent (analysis and decoding included); older runs: their steps'.
                label, method, run_dir, int(refine_summary.get("total_forward_passes", refine_summary.get("forward_passes", 0))),
                int(refine_summary.get("steps", 0)),
                list(refine_summary.get("layers", [])), models["after"], overrides,
                before_area=refusal_area(before)["mean"] if before is not None else None,
                seconds=refine_summary.get("seconds"), before=before,
            ))
    if not entries and not befores:
        raise DataError("no evaluated models in the given runs")
    _label_by_differences(entries)
    return list(befores.values()) + entries


def _label_by_differences(entries: list[Entry]) -> None:
    """Label sweep members by the overrides that tell them apart (not the ones they all share)."""
    if len(entries) < 2:
        return
    shared = set(entries[0].overrides).intersection(*(set(e.overrides) for e in entries[1:]))
    for entry in entries:
        distinct = [o for o in entry.overrides if o not in shared and not o.startswith("refine.method=")]
        if entry.overrides:
            entry.label = entry.method + (f" [{', '.join(distinct)}]" if distinct else "")


def _stage_summary(run_dir: Path, stage: str) -> dict[str, Any]:
    path = run_dir / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def refusal_area(result: dict[str, Any]) -> dict[str, float]:
    """The refusal-curve area of one evaluated model, with its interval over noise seeds when it has one."""
    return result.get("refusal_curve_area_interval") or mean_interval([result["refusal_curve_area"]])
