"""Compare runs: one table and plots from several run directories or a Hydra multirun.

``zorefine-compare DIR [DIR ...] [--out OUT]``. Each DIR is a run directory (it holds
``metrics.json``) or a directory of them (a Hydra multirun sweep). Every run contributes the
model it refined ("after"); the first-order-aligned model it started from ("before") appears
once per distinct set of measurements as the ``none`` row, the no-refinement baseline. Rows carry the
forward-pass budget each method spent, so a budget sweep reads as gain against cost.

Writes ``comparison.md``, ``comparison.html`` (self-contained), ``comparison.json``,
``gain_vs_forwards.png`` and ``refusal_curves.png`` into OUT (default: the first DIR).
Multiruns get this at the end of the sweep from :class:`CompareCallback` (set in conf/config.yaml).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from zorefine.evaluate.document import Bullets, Document, Heading, Image, Paragraph, Table
from zorefine.errors import DataError, ZorefineError
from zorefine.models.loading import write_json_atomic
from zorefine.run import METRICS_FILE
from zorefine.evaluate.report import format_interval, save_figure
from zorefine.evaluate.robustness import noise_curve
from zorefine.stats import mean_interval

log = logging.getLogger(__name__)



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
                label, method, run_dir, int(refine_summary.get("forward_passes", 0)), int(refine_summary.get("steps", 0)),
                list(refine_summary.get("layers", [])), models["after"], overrides,
                before_area=_area(before)["mean"] if before is not None else None,
                seconds=refine_summary.get("seconds"),
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


def _area(result: dict[str, Any]) -> dict[str, float]:
    return result.get("refusal_curve_area_interval") or mean_interval([result["refusal_curve_area"]])


def _noise_mean(result: dict[str, Any], metric: str) -> float:
    """``metric`` averaged over every noise level of the grid."""
    values = [v[metric]["mean"] for v in result["summary"].values() if v["family"] == "weight_noise"]
    return sum(values) / len(values) if values else float("nan")


def _quantization_labels(entries: Sequence[Entry]) -> list[str]:
    labels: list[str] = []
    for entry in entries:
        for key, value in entry.result["summary"].items():
            if value["family"] == "quantization" and key not in labels:
                labels.append(key)
    return labels


def comparison_rows(entries: Sequence[Entry]) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """Table header, table cells and the JSON records of every entry."""
    quantized = _quantization_labels(entries)
    header = ["model", "forward passes", "steps", "refine s", "clean refusal ↑", "refusal area ↑ (95% CI)", "gain vs none",
              "robust σ ↑", "ASR under noise ↓", *(f"refusal, {q} ↑" for q in quantized),
              "over-refusal ↓", "utility loss ↓"]
    rows, records = [], []
    for entry in entries:
        summary = entry.result["summary"]
        area = _area(entry.result)
        gain = None if entry.before_area is None else area["mean"] - entry.before_area
        robust = entry.result.get("robust_sigma")
        quant = {q: summary[q]["harmful_refusal_rate"] if q in summary else None for q in quantized}
        record = {
            "label": entry.label, "method": entry.method, "run_dir": str(entry.run_dir), "overrides": entry.overrides,
            "forward_passes": entry.forward_passes, "steps": entry.steps, "layers": entry.layers, "seconds": entry.seconds,
            "clean_refusal": summary["clean"]["harmful_refusal_rate"]["mean"],
            "refusal_area": area, "gain": gain, "robust_sigma": robust,
            "asr_under_noise": _noise_mean(entry.result, "attack_success_rate"),
            "quantized_refusal": {q: (c["mean"] if c else None) for q, c in quant.items()},
            "asr_by_condition": {key: value["attack_success_rate"] for key, value in summary.items()},
            "overrefusal": summary["clean"]["overrefusal_rate"]["mean"],
            "utility_loss": summary["clean"]["utility_loss"]["mean"],
        }
        records.append(record)
        rows.append([
            entry.label, str(entry.forward_passes), str(entry.steps), "–" if entry.seconds is None else f"{entry.seconds:g}",
            f"{record['clean_refusal']:.3f}", format_interval(area),
            "–" if gain is None else f"{gain:+.3f}", "–" if robust is None else f"{robust:g}",
            f"{record['asr_under_noise']:.3f}", *(format_interval(c) if c else "–" for c in quant.values()),
            format_interval(summary["clean"]["overrefusal_rate"]), f"{record['utility_loss']:.3f}",
        ])
    return header, rows, records


POOLED_METRICS = ("gain", "asr_under_noise", "clean_refusal", "overrefusal", "utility_loss")


def pooled_rows(records: Sequence[dict[str, Any]], key: str) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """Rows that differ only in the override ``key`` (e.g. ``refine.seed``), pooled into one.

    Each pooled metric is the mean and 95% t-interval over the pooled runs: the spread of the
    refinement's own randomness, which a single-seed row hides. Settings run once are left out.
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for record in records:
        if not any(o.startswith(key + "=") for o in record["overrides"]):
            continue
        setting = tuple(o for o in record["overrides"] if not o.startswith(key + "="))
        groups.setdefault((record["method"], *setting), []).append(record)
    quantized = sorted({q for r in records for q in r.get("quantized_refusal", {})})
    header = ["setting", "runs", "gain in refusal area ↑", "ASR under noise ↓", "clean refusal ↑", "over-refusal ↓",
              "utility loss ↓", *(f"refusal, {q} ↑" for q in quantized)]
    rows, pooled = [], []
    for (method, *setting), members in groups.items():
        if len(members) < 2:
            continue
        cells = {metric: mean_interval([m[metric] for m in members]) for metric in POOLED_METRICS}
        cells.update({q: mean_interval([m["quantized_refusal"].get(q) for m in members]) for q in quantized})
        conditions = sorted({c for m in members for c in m.get("asr_by_condition", {})})
        cells["asr_by_condition"] = {
            c: mean_interval([m["asr_by_condition"][c]["mean"] for m in members if c in m.get("asr_by_condition", {})])
            for c in conditions
        }
        cells["forward_passes"] = max(m.get("forward_passes") or 0 for m in members)
        seconds = [m["seconds"] for m in members if m.get("seconds") is not None]
        cells["seconds"] = sum(seconds) / len(seconds) if seconds else None
        distinct = _shortest_distinct(setting, groups)
        label = method + (f" [{', '.join(distinct)}]" if distinct else "")
        pooled.append({"label": label, "method": method, "overrides": list(setting), "pooled_over": key,
                       "runs": len(members), **cells})
        rows.append([label, str(len(members)), *(format_interval(cells[m]) for m in (*POOLED_METRICS, *quantized))])
    return header, rows, pooled


def _shortest_distinct(setting: Sequence[str], groups: dict[tuple[str, ...], list[dict[str, Any]]]) -> list[str]:
    """The overrides of ``setting`` that not every pooled group shares."""
    shared = set.intersection(*(set(g[1:]) for g in groups))
    return [o for o in setting if o not in shared and not o.startswith("refine.method=")]


def plot_gain_vs_forwards(path: Path, entries: Sequence[Entry]) -> None:
    """Robustness gain (refusal-area change vs the unrefined model) against forward passes, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    methods = sorted({e.method for e in entries if e.method != "none"})
    for method in methods:
        points = sorted(
            ((e.forward_passes, _area(e.result), e.before_area) for e in entries if e.method == method and e.before_area is not None),
            key=lambda point: point[0],
        )
        if not points:
            continue
        xs = [x for x, _, _ in points]
        gains = [a["mean"] - b for _, a, b in points]
        errors = [[a["mean"] - a["low"] for _, a, _ in points], [a["high"] - a["mean"] for _, a, _ in points]]
        # A line reads as "more budget"; settings at the same budget are separate points.
        line = "-" if len(set(xs)) == len(xs) else "none"
        axis.errorbar(xs, gains, yerr=errors, marker="o", capsize=3, linestyle=line, label=method)
    axis.axhline(0.0, color="gray", linewidth=0.8)
    axis.set_xlabel("forward-pass equivalents spent (backward = 2 forwards)")
    axis.set_ylabel("gain in refusal-curve area vs no refinement")
    save_figure(fig, axis, path, "Robustness bought per forward pass")


def plot_refusal_curves(path: Path, entries: Sequence[Entry]) -> None:
    """Refusal rate against σ, one line per compared model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7.2, 4.4))
    for entry in entries:
        points = noise_curve(entry.result["summary"])
        style = "k--" if entry.method == "none" else "-"
        axis.plot([s for s, _ in points], [v["harmful_refusal_rate"]["mean"] for _, v in points], style, marker=".", label=entry.label)
    axis.set_xlabel("relative weight noise σ")
    axis.set_ylabel("refusal rate (harmful, held out)")
    axis.set_ylim(-0.02, 1.02)
    save_figure(fig, axis, path, "Refusal under weight noise, per compared model", legend_size=7)


def compare(paths: Sequence[Path], out_dir: Path | None = None, pool: str | None = "refine.seed") -> dict[str, Path]:
    """Write the comparison of the runs under ``paths`` into ``out_dir``; returns the files written.

    Runs that differ only in the override ``pool`` (default ``refine.seed``) also get a pooled
    table, one row per setting with intervals over those runs; None turns that off.
    """
    run_dirs = find_runs(paths)
    entries = load_entries(run_dirs)
    out_dir = Path(out_dir) if out_dir is not None else Path(paths[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows, records = comparison_rows(entries)
    gain_plot, curves_plot = out_dir / "gain_vs_forwards.png", out_dir / "refusal_curves.png"
    plot_gain_vs_forwards(gain_plot, entries)
    plot_refusal_curves(curves_plot, entries)
    doc = Document("zorefine comparison")
    doc.add(Bullets([f"**runs**: {len(run_dirs)} ({', '.join(str(r) for r in run_dirs[:4])}{' ...' if len(run_dirs) > 4 else ''})"]))
    doc.add(Paragraph(
        "Each refined model against the model it was refined from (none). Refusal area: area under the "
        "harmful-refusal rate against relative weight noise σ, per unit σ, mean and 95% interval over noise "
        "seeds; gain is its change vs none. Robust σ: the largest σ at which refusal stays at the robust level. "
        "Forward passes count a backward as two forwards."
    ))
    doc.add(Table(header, rows))
    pooled_header, pooled_table, pooled = pooled_rows(records, pool) if pool else ([], [], [])
    if pooled:
        doc.add(Heading(f"Pooled over {pool}"), Paragraph(
            f"Runs that differ only in {pool}, one row per setting: mean and 95% interval over the runs "
            "(the refinement's own randomness), each run itself averaged over noise seeds."
        ), Table(pooled_header, pooled_table))
    doc.add(Heading("Gain against cost"), Image(gain_plot, "gain in refusal area against forward passes, per method"))
    doc.add(Heading("Refusal curves"), Image(curves_plot, "refusal rate against σ per model"))
    markdown_path, html_path = doc.write(out_dir, "comparison")
    json_path = out_dir / "comparison.json"
    write_json_atomic(json_path, {"runs": [str(r) for r in run_dirs], "rows": records, "pooled": pooled})
    return {"markdown": markdown_path, "html": html_path, "json": json_path, "gain_plot": gain_plot, "curves_plot": curves_plot}


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a core dependency
    _HydraCallback = object


class CompareCallback(_HydraCallback):
    """Hydra callback: at the end of a multirun, compare every job of the sweep."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            written = compare([sweep_dir])
        except ZorefineError as error:
            log.warning("[compare] no comparison for %s: %s", sweep_dir, error)
            return
        log.info("[compare] %s", written["markdown"])
        print(f"comparison: {written['markdown']} (and {written['html'].name})")


def main(argv: Sequence[str] | None = None) -> int:
    """``zorefine-compare DIR [DIR ...] [--out OUT]``."""
    parser = argparse.ArgumentParser(prog="zorefine-compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or directories of runs (Hydra multirun)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the comparison (default: the first DIR)")
    parser.add_argument("--pool", default="refine.seed",
                        help="pool runs that differ only in this override into one row with intervals ('' turns it off)")
    args = parser.parse_args(argv)
    try:
        written = compare(args.runs, args.out, args.pool or None)
    except ZorefineError as error:
        print(f"zorefine-compare: error: {error}", file=sys.stderr)
        return 2
    print(written["markdown"].read_text())
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
