"""The comparison's paired tables: every setting against no refinement, and against a reference setting.

Runs that differ only in the pooled override (``refine.seed``) are one setting; their paired
differences are pooled with the refinement seeds as the outermost bootstrap level (see
:mod:`zorefine.evaluate.paired`). Against the reference, seed ``r`` of a setting pairs with seed
``r`` of the reference: independent draws, paired on prompts and noise draws.
"""

from __future__ import annotations

from typing import Any, Sequence

from zorefine.evaluate.compare_runs import Entry
from zorefine.evaluate.document import Heading, Paragraph, Table
from zorefine.evaluate.paired import format_paired, paired_differences


def settings(entries: Sequence[Entry], pool: str | None) -> dict[str, list[Entry]]:
    """Refined entries grouped into settings: the same overrides but the pooled one."""
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        if entry.method == "none":
            continue
        kept = [o for o in entry.overrides if not (pool and o.startswith(pool + "="))]
        groups.setdefault(" ".join([entry.method, *kept]), []).append(entry)
    return groups


def _labels(groups: dict[str, list[Entry]], pool: str | None) -> dict[str, str]:
    """Short labels: the method and the overrides that tell settings apart, and the seeds pooled."""
    overrides = {name: set(o for o in members[0].overrides if not (pool and o.startswith(pool + "="))) for name, members in groups.items()}
    shared = set.intersection(*overrides.values()) if overrides else set()
    labels = {}
    for name, members in groups.items():
        distinct = [o for o in members[0].overrides if o in overrides[name] - shared and not o.startswith("refine.method=")]
        label = members[0].method + (f" [{', '.join(distinct)}]" if distinct else "")
        labels[name] = label + (f" ({len(members)} × {pool})" if len(members) > 1 else "")
    return labels


def paired_records(entries: Sequence[Entry], pool: str | None) -> dict[str, Any]:
    """Paired differences of every setting vs none and vs the reference (the first ``zo`` setting)."""
    groups = settings(entries, pool)
    labels = _labels(groups, pool)
    reference = next((name for name, members in groups.items() if members[0].method == "zo"), None)
    records: dict[str, Any] = {"reference": labels.get(reference), "vs_none": {}, "vs_reference": {}}
    for name, members in groups.items():
        befores = [m.before for m in members if m.before is not None]
        if len(befores) == len(members):
            records["vs_none"][name] = {
                "label": labels[name],
                "attack_success": paired_differences([m.result for m in members], befores, "attack_success"),
                "overrefusal": paired_differences([m.result for m in members], befores, "overrefusal"),
            }
        if reference is not None and name != reference:
            ref = [m.result for m in groups[reference]]
            records["vs_reference"][name] = {
                "label": labels[name],
                "attack_success": paired_differences([m.result for m in members], ref, "attack_success"),
                "overrefusal": paired_differences([m.result for m in members], ref, "overrefusal"),
            }
    return records


def _table(rows: dict[str, Any]) -> Table | None:
    groups = list(dict.fromkeys(g for row in rows.values() for g in row["attack_success"]))
    if not groups:
        return None
    header = ["setting", *(f"Δ ASR, {g} ↓" for g in groups), "Δ over-refusal, clean ↓"]
    cells = [
        [row["label"], *(format_paired(row["attack_success"].get(g)) for g in groups), format_paired(row["overrefusal"].get("clean"))]
        for row in rows.values()
    ]
    return Table(header, cells)


def paired_blocks(records: dict[str, Any]) -> list:
    """Document blocks for the paired tables (empty when the runs hold no per-prompt outcomes)."""
    blocks: list = []
    note = ("Paired on the same prompts and noise draws; mean and 95% hierarchical-bootstrap interval over "
            "refinement seeds, noise draws and prompts. 'better' or 'worse' only where the interval excludes zero.")
    vs_none = _table(records["vs_none"]) if records["vs_none"] else None
    if vs_none is not None:
        blocks += [Heading("Paired: each setting − no refinement"), Paragraph(note), vs_none]
    vs_reference = _table(records["vs_reference"]) if records["vs_reference"] else None
    if vs_reference is not None:
        blocks += [Heading(f"Paired: each setting − {records['reference']}"), Paragraph(note), vs_reference]
    return blocks
