"""Build the datasets that ship in ``zorefine/data/builtin/`` from the raw public copies.

Run::

    python -m zorefine.data.build_builtin --raw /work/shared/data --out zorefine/data/builtin

Outputs (see ``builtin/SOURCES.md`` for attribution and licenses):

* ``safety.jsonl`` — harmful AdvBench goals paired with refusals from
  :mod:`zorefine.data.refusals`, plus benign Self-Instruct tasks and GSM8K problems with
  their reference answers; split train/val/test by a sha256 of the prompt, near-duplicate
  prompts kept together (:mod:`zorefine.data.near_duplicates`).
* ``xstest_safe.jsonl`` / ``xstest_unsafe.jsonl`` — XSTest prompts for evaluation only
  (empty response, split ``test``).

The build is a pure function of the raw files: running it twice gives byte-identical
output (no timestamps, no set/dict iteration order, no Python ``hash``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
import sys
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path

from zorefine.data.records import BUILTIN_DIR, KINDS, SPLITS, Example, load_examples, read_json_objects, write_examples
from zorefine.data.near_duplicates import cluster_splits
from zorefine.data.refusals import write_refusal
from zorefine.errors import DataError, ZorefineError

# Raw file names, as in the shared raw-data folder (see its SOURCES.md).
ADVBENCH_FILE = "advbench_harmful_behaviors.csv"
XSTEST_FILE = "xstest_prompts.csv"
SELFINSTRUCT_SEED_FILE = "selfinstruct_seed_tasks.jsonl"
SELFINSTRUCT_USER_FILE = "selfinstruct_user_oriented_instructions.jsonl"
GSM8K_FILE = "gsm8k_train_first1500.jsonl"

#: How many GSM8K problems (from the start of the raw file) go into safety.jsonl. Enough
#: for a utility signal without letting arithmetic dominate the benign half.
GSM8K_LIMIT = 300

#: Cumulative split boundaries on the prompt-hash value in [0, 1): 70% / 10% / 20%.
SPLIT_BOUNDS: tuple[tuple[float, str], ...] = ((0.70, "train"), (0.80, "val"), (1.0, "test"))

_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
_FINAL_ANSWER = re.compile(r"^####\s*(\S.*?)\s*$")


#: XSTest is never trained on, but tuning reads over-refusal too: about 30% of its prompts
#: (by the same prompt hash) are the `val` share, the rest stay `test`.
XSTEST_SPLIT_BOUNDS: tuple[tuple[float, str], ...] = ((0.30, "val"), (1.0, "test"))


def split_for(prompt: str, bounds: tuple[tuple[float, str], ...] = SPLIT_BOUNDS) -> str:
    """Return ``"train"``, ``"val"`` or ``"test"`` for a prompt, from a sha256 of its text.

    A prompt's split depends on its text alone — not on which other rows exist — so
    adding or removing data never moves an existing prompt into another split (no
    train/test leakage between dataset versions), and anyone can recompute it.
    """
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    for bound, name in bounds:
        if u < bound:
            return name
    return bounds[-1][1]  # unreachable: u < 1.0


def _require(raw_dir: Path, name: str) -> Path:
    path = raw_dir / name
    if not path.is_file():
        raise DataError(f"raw data file not found: {path}")
    return path


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column {missing[0]!r}")
        return list(reader)


def gsm8k_response(answer: str) -> str:
    """Turn a GSM8K worked answer into a plain response.

    Calculator annotations (``<<48/2=24>>``) are tool-use markup, not text a chat model
    should produce, so they are removed; the final ``#### N`` line becomes
    ``The answer is N.``.
    """
    lines = _CALCULATOR_ANNOTATION.sub("", answer).strip().split("\n")
    match = _FINAL_ANSWER.match(lines[-1].strip())
    if match is None:
        raise DataError(f"GSM8K answer does not end with a '#### N' line: {lines[-1][:60]!r}")
    body = [line.rstrip() for line in lines[:-1]]
    return "\n".join(body + [f"The answer is {match.group(1)}."]).strip()


def harmful_rows(raw_dir: Path) -> list[tuple[str, str, str]]:
    """AdvBench goals as ``(prompt, refusal, source)`` triples, in file order."""
    rows = _read_csv(_require(raw_dir, ADVBENCH_FILE), ["goal"])
    out = []
    for row in rows:
        prompt = row["goal"].strip()
        if prompt:
            out.append((prompt, write_refusal(prompt), "advbench"))
    return out


def selfinstruct_rows(path: Path, source: str) -> list[tuple[str, str, str]]:
    """Self-Instruct tasks as ``(prompt, response, source)``: instruction [+ input] -> first output."""
    out = []
    for lineno, row in enumerate(read_json_objects(path), start=1):
        instruction = row.get("instruction")
        instances = row.get("instances")
        if not isinstance(instruction, str) or not isinstance(instances, list):
            raise DataError(f"{path}: task {lineno} lacks 'instruction' or 'instances'")
        if not instances or not isinstance(instances[0], dict):
            continue
        first = instances[0]
        task_input = str(first.get("input") or "").strip()
        output = str(first.get("output") or "").strip()
        if not output:  # nothing to learn from; also the loader rejects it outside 'test'
            continue
        prompt = instruction.strip()
        if task_input:
            prompt = f"{prompt}\n\n{task_input}"
        if prompt:
            out.append((prompt, output, source))
    return out


def gsm8k_rows(path: Path, limit: int = GSM8K_LIMIT) -> list[tuple[str, str, str]]:
    """The first ``limit`` GSM8K problems as ``(question, cleaned answer, "gsm8k")``."""
    out = []
    for row in read_json_objects(path)[:limit]:
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise DataError(f"{path}: row without string 'question' and 'answer'")
        out.append((question.strip(), gsm8k_response(answer), "gsm8k"))
    return out


def build_safety(raw_dir: Path) -> list[Example]:
    """Build the rows of ``safety.jsonl`` (deduplicated, split, sorted)."""
    candidates: list[tuple[str, str, str, str]] = []  # (kind, prompt, response, source)
    candidates += [("harmful", *row) for row in harmful_rows(raw_dir)]
    benign = (selfinstruct_rows(_require(raw_dir, SELFINSTRUCT_SEED_FILE), "selfinstruct:seed")
              + selfinstruct_rows(_require(raw_dir, SELFINSTRUCT_USER_FILE), "selfinstruct:user")
              + gsm8k_rows(_require(raw_dir, GSM8K_FILE)))
    candidates += [("benign", *row) for row in benign]

    # Dedupe on the prompt across kinds too: one prompt must have one target and one split.
    seen: set[str] = set()
    unique: list[tuple[str, str, str, str]] = []
    for kind, prompt, response, source in candidates:
        if prompt in seen:
            continue
        seen.add(prompt)
        unique.append((kind, prompt, response, source))
    splits, _ = cluster_splits([prompt for _, prompt, _, _ in unique], split_for)
    examples = [Example(prompt=prompt, response=response, kind=kind, split=split, source=source)
                for (kind, prompt, response, source), split in zip(unique, splits)]
    # Total order on the content, so the file never depends on input order quirks.
    examples.sort(key=lambda ex: (SPLITS.index(ex.split), KINDS.index(ex.kind), ex.source, ex.prompt))
    return examples


def build_xstest(raw_dir: Path) -> tuple[list[Example], list[Example]]:
    """XSTest prompts as evaluation rows: ``(safe, unsafe)``, each in the upstream id order."""
    rows = _read_csv(_require(raw_dir, XSTEST_FILE), ["id", "prompt", "type", "label"])
    safe: list[Example] = []
    unsafe: list[Example] = []
    seen: set[str] = set()
    for row in rows:
        prompt = row["prompt"].strip()
        if not prompt or prompt in seen:
            continue
        seen.add(prompt)
        label = row["label"].strip()
        if label == "safe":
            target, kind = safe, "benign"
        elif label == "unsafe":
            target, kind = unsafe, "harmful"
        else:
            raise DataError(f"{raw_dir / XSTEST_FILE}: id {row['id']}: unknown label {label!r}")
        target.append(Example(prompt=prompt, response="", kind=kind, split="test", source=f"xstest:{row['type'].strip()}"))
    return _clustered_xstest(safe), _clustered_xstest(unsafe)


def _clustered_xstest(rows: list[Example]) -> list[Example]:
    # XSTest is templated ("How do I kill a Python process?" / "... a process in Linux?"):
    # near-duplicates share the val/test split like the safety rows do.
    splits, _ = cluster_splits([e.prompt for e in rows], lambda p: split_for(p, XSTEST_SPLIT_BOUNDS))
    return [replace(example, split=split) for example, split in zip(rows, splits)]


def build(raw_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Build every shipped dataset from ``raw_dir`` into ``out_dir``.

    Returns:
        Mapping from dataset name (e.g. ``"safety"``) to the written path.

    Raises:
        DataError: if a raw file is missing or malformed.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise DataError(f"raw data folder not found: {raw_dir}")
    safe, unsafe = build_xstest(raw_dir)
    datasets = {"safety": build_safety(raw_dir), "xstest_safe": safe, "xstest_unsafe": unsafe}
    written: dict[str, Path] = {}
    for name, examples in datasets.items():
        path = out_dir / f"{name}.jsonl"
        write_examples(path, examples)
        written[name] = path
    return written


def _summary(name: str, path: Path) -> str:
    examples = load_examples(path)  # re-load: report what ships, validated by the real loader
    cells = []
    for kind in KINDS:
        for split in SPLITS:
            n = sum(1 for ex in examples if ex.kind == kind and ex.split == split)
            if n:
                cells.append(f"{kind}/{split}={n}")
    bounds = SPLIT_BOUNDS if name == "safety" else XSTEST_SPLIT_BOUNDS
    moved = sum(ex.split != split_for(ex.prompt, bounds) for ex in examples)
    return (f"{name}: {len(examples)} rows ({', '.join(cells)}), {moved} moved to keep near-duplicates together, "
            f"{path.stat().st_size} bytes -> {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", required=True, type=Path, help="folder with the raw public data copies")
    parser.add_argument("--out", type=Path, default=BUILTIN_DIR,
                        help=f"output folder (default: {BUILTIN_DIR})")
    args = parser.parse_args(argv)
    try:
        written = build(args.raw, args.out)
        for name, path in written.items():
            print(_summary(name, path))
    except ZorefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
