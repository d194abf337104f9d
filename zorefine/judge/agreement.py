"""Agreement of the keyword refusal judge with human labels on real chat-model completions.

Usage::

    python -m zorefine.judge.agreement [FILES...]
    python -m zorefine.judge.agreement --lomo [FILES...]

Each FILE is an XSTest v2 labeled-completions CSV (columns ``prompt``, ``completion``,
``final_label`` among others; ``final_label`` is ``1_full_compliance``, ``2_full_refusal``
or ``3_partial_refusal``). Without arguments the two files in
``$ZOREFINE_XSTEST_COMPLETIONS_DIR`` (default: ``shared/data/xstest_completions`` beside the
repository checkout) are read. For each file it prints the agreement, the confusion counts, and finally one JSON line
``{"<file name>": agreement, ...}``. A missing or malformed file is one error line and exit
code 2.

``--lomo`` validates leave-one-model-out: for each file, the judge's two knobs (the window of
characters its phrase rules read, and whether the refusal styles are on) are chosen on the
*other* files, the held-out file is judged with that choice, and one JSON line per held-out file
is printed with the chosen knobs and both agreements.

Mapping: judge REFUSAL -> refusal, COMPLIANCE and DEGENERATE -> compliance; human labels 2
(full refusal) and 3 (partial refusal) -> refusal, 1 -> compliance. A partial refusal
declines at least part of the request, which is what a safety metric counts as a refusal.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from zorefine.errors import DataError
from zorefine.judge.keyword import KeywordJudge
from zorefine.judge.verdict import Verdict

# The labeled files are kept beside the checkout (never shipped in the package): ../shared/data.
_BESIDE_CHECKOUT = Path(__file__).resolve().parents[3] / "shared" / "data" / "xstest_completions"
DEFAULT_DIR = Path(os.environ.get("ZOREFINE_XSTEST_COMPLETIONS_DIR", str(_BESIDE_CHECKOUT)))
DEFAULT_FILES: tuple[Path, ...] = (
    DEFAULT_DIR / "xstest_v2_completions_gpt4_labeled.csv",
    DEFAULT_DIR / "xstest_v2_completions_llama2orig_labeled.csv",
)

_HUMAN_LABELS = {
    "1_full_compliance": "compliance",
    "2_full_refusal": "refusal",
    "3_partial_refusal": "refusal",
}
_REQUIRED_COLUMNS = ("completion", "final_label")


@dataclass
class Agreement:
    """Judge-vs-human comparison on one file. ``confusion[(human, judge)]`` counts rows."""

    file: str
    n: int = 0
    agree: int = 0
    confusion: dict[tuple[str, str], int] = field(default_factory=dict)
    degenerate: int = 0

    @property
    def agreement(self) -> float:
        """Share of rows where the judge's binary label equals the human one."""
        return self.agree / self.n if self.n else 0.0


def judge_binary(verdict: Verdict) -> str:
    """Map a verdict to the binary label compared with humans (DEGENERATE is not a refusal)."""
    return "refusal" if verdict is Verdict.REFUSAL else "compliance"


def human_binary(label: str) -> str:
    """Map an XSTest ``final_label`` to ``refusal``/``compliance``; DataError if unknown."""
    key = label.strip()
    if key in _HUMAN_LABELS:
        return _HUMAN_LABELS[key]
    # Tolerate the bare numeric form ("1", "2", "3").
    for full, binary in _HUMAN_LABELS.items():
        if key and full.startswith(key + "_"):
            return binary
    raise DataError(f"unknown final_label {label!r}")


def read_labeled(path: Path) -> list[dict[str, str]]:
    """Read a labeled-completions CSV; DataError (one line) if missing, empty or malformed."""
    if not path.is_file():
        raise DataError(f"labeled completions file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = list(reader)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def evaluate_file(path: Path, judge: KeywordJudge | None = None) -> Agreement:
    """Judge every completion in ``path`` (default judge unless ``judge``) and compare with ``final_label``."""
    judge = judge or KeywordJudge()
    result = Agreement(file=path.name)
    for lineno, row in enumerate(read_labeled(path), start=2):
        try:
            human = human_binary(row["final_label"] or "")
        except DataError as exc:
            raise DataError(f"{path}:{lineno}: {exc}") from None
        verdict = judge.judge(row["completion"] or "")
        judged = judge_binary(verdict)
        result.n += 1
        result.agree += int(judged == human)
        result.degenerate += int(verdict is Verdict.DEGENERATE)
        result.confusion[(human, judged)] = result.confusion.get((human, judged), 0) + 1
    return result


def format_report(result: Agreement) -> str:
    """Human-readable block: agreement and a 2x2 confusion table (rows: human)."""
    c = result.confusion
    lines = [
        f"{result.file}: agreement {result.agreement:.4f} ({result.agree}/{result.n}),"
        f" degenerate {result.degenerate}",
        f"  {'human/judge':<16}{'refusal':>10}{'compliance':>12}",
    ]
    for human in ("refusal", "compliance"):
        lines.append(
            f"  {human:<16}{c.get((human, 'refusal'), 0):>10}{c.get((human, 'compliance'), 0):>12}"
        )
    return "\n".join(lines)


# The knob grid --lomo searches: 7 windows x styles on/off. Ties go to the earlier entry
# (shorter window, styles off): the simpler judge wins unless the other is better.
LOMO_WINDOWS: tuple[int, ...] = (120, 160, 200, 240, 320, 400, 600)
LOMO_GRID: tuple[tuple[int, bool], ...] = tuple((w, s) for s in (False, True) for w in LOMO_WINDOWS)


def leave_one_model_out(paths: Sequence[Path], grid: Sequence[tuple[int, bool]] = LOMO_GRID) -> list[dict]:
    """Per held-out file: the knobs that agree best on the other files, and the held-out agreement."""
    if len(paths) < 2:
        raise DataError("--lomo needs at least two labeled files (one to tune on, one held out)")
    scores = {(path, knobs): evaluate_file(path, KeywordJudge(*knobs)) for path in paths for knobs in grid}
    rows = []
    for held_out in paths:
        tuning = [p for p in paths if p != held_out]

        def tuned(knobs: tuple[int, bool]) -> float:
            return sum(scores[(p, knobs)].agree for p in tuning) / sum(scores[(p, knobs)].n for p in tuning)

        best = max(grid, key=tuned)  # max keeps the first of equal scores
        rows.append({
            "held_out": held_out.name,
            "tuned_on": [p.name for p in tuning],
            "window_chars": best[0],
            "styles": best[1],
            "tuning_agreement": round(tuned(best), 4),
            "held_out_agreement": round(scores[(held_out, best)].agreement, 4),
        })
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print per-file agreement and a final JSON line; 2 on a data error."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    lomo = "--lomo" in args
    args = [a for a in args if a != "--lomo"]
    paths = [Path(a) for a in args] if args else list(DEFAULT_FILES)
    if lomo:
        try:
            for row in leave_one_model_out(paths):
                print(json.dumps(row))
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        results = [evaluate_file(p) for p in paths]
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(format_report(r))
    print(json.dumps({r.file: round(r.agreement, 4) for r in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
