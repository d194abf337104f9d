"""Compare runs: one table and plots from several run directories or a Hydra multirun.

``zorefine-compare DIR [DIR ...] [--out OUT]``. Each DIR is a run directory (it holds
``metrics.json``) or a directory of them (a Hydra multirun sweep). Every run contributes the
model it refined ("after"); the first-order-aligned model it started from ("before") appears
once per distinct set of measurements as the ``none`` row, the no-refinement baseline. Rows carry the
forward-pass budget each method spent, so a budget sweep reads as gain against cost.

Writes ``comparison.md``, ``comparison.html`` (self-contained), ``comparison.json``,
``gain_vs_forwards.png`` and ``refusal_curves.png`` into OUT (default: the first DIR).
Multiruns get this at the end of the sweep from
:class:`zorefine.evaluate.sweep_callback.CompareCallback` (set in conf/config.yaml).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from zorefine.evaluate.document import Bullets, Document, Heading, Image, Paragraph, Table
from zorefine.errors import ZorefineError
from zorefine.files import write_json_atomic
from zorefine.evaluate.compare_paired import paired_blocks, paired_records
from zorefine.evaluate.compare_plots import plot_gain_vs_forwards, plot_refusal_curves
from zorefine.evaluate.compare_runs import Entry, refusal_area, find_runs, load_entries
from zorefine.evaluate.report import format_interval
from zorefine.stats import mean_interval

log = logging.getLogger(__name__)


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
    header = ["model", "forward passes (all)", "steps", "refine s", "clean refusal ↑", "refusal area ↑ (95% CI)", "gain vs none",
              "robust σ ↑", "ASR under noise ↓", *(f"refusal, {q} ↑" for q in quantized),
              "over-refusal ↓", "utility loss ↓"]
    rows, records = [], []
    for entry in entries:
        summary = entry.result["summary"]
        area = refusal_area(entry.result)
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
        "Forward passes count everything a method spent, the analysis its selection came from and the "
        "decoding of self targets included; a backward counts as two forwards."
    ))
    doc.add(Table(header, rows))
    pooled_header, pooled_table, pooled = pooled_rows(records, pool) if pool else ([], [], [])
    if pooled:
        doc.add(Heading(f"Pooled over {pool}"), Paragraph(
            f"Runs that differ only in {pool}, one row per setting: mean and 95% interval over the runs "
            "(the refinement's own randomness), each run itself averaged over noise seeds."
        ), Table(pooled_header, pooled_table))
    paired = paired_records(entries, pool)
    doc.add(*paired_blocks(paired))
    doc.add(Heading("Gain against cost"), Image(gain_plot, "gain in refusal area against forward passes, per method"))
    doc.add(Heading("Refusal curves"), Image(curves_plot, "refusal rate against σ per model"))
    markdown_path, html_path = doc.write(out_dir, "comparison")
    json_path = out_dir / "comparison.json"
    write_json_atomic(json_path, {"runs": [str(r) for r in run_dirs], "rows": records, "pooled": pooled, "paired": paired})
    return {"markdown": markdown_path, "html": html_path, "json": json_path, "gain_plot": gain_plot, "curves_plot": curves_plot}


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
