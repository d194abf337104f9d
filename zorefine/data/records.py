"""The JSONL example format shared by every zorefine stage, and its strict loader.

One example per line, a JSON object with exactly these keys::

    {"prompt": "...", "response": "...", "kind": "harmful", "split": "train", "source": "advbench"}

``prompt``, ``response``, ``kind`` and ``split`` are required; ``source`` is optional.
Anything else is rejected: a typo such as ``"respones"`` must fail loudly instead of
silently producing an example with an empty target. Blank lines are skipped.

The loader only ever calls :func:`json.loads`; nothing in a data file is evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from zorefine.errors import DataError
from zorefine.files import write_atomic

KINDS: tuple[str, ...] = ("harmful", "benign")
SPLITS: tuple[str, ...] = ("train", "val", "test")

REQUIRED_KEYS: tuple[str, ...] = ("prompt", "response", "kind", "split")
OPTIONAL_KEYS: tuple[str, ...] = ("source",)
_ALL_KEYS = frozenset(REQUIRED_KEYS + OPTIONAL_KEYS)

#: Directory holding the datasets that ship inside the package.
BUILTIN_DIR: Path = Path(__file__).resolve().parent / "builtin"


def _problem(prompt: object, response: object, kind: object, split: object, source: object) -> str | None:
    """Return a short description of what is wrong with these field values, or None.

    Shared by :class:`Example` and the loader so that a row that loads is exactly a row
    that can be constructed, and vice versa (write -> load round-trips).
    """
    for key, value in (("prompt", prompt), ("response", response), ("kind", kind),
                       ("split", split), ("source", source)):
        if not isinstance(value, str):
            return f"key {key!r} must be a string, got {type(value).__name__}"
    assert isinstance(prompt, str) and isinstance(response, str)  # for type checkers
    if not prompt.strip():
        return "empty prompt"
    if kind not in KINDS:
        return f"kind must be one of {', '.join(KINDS)}, got {kind!r}"
    if split not in SPLITS:
        return f"split must be one of {', '.join(SPLITS)}, got {split!r}"
    # An empty target would give a response-only loss over zero tokens (NaN) in
    # training or validation; it is only meaningful for prompts we merely generate on.
    if not response and split == "train":
        return "empty response is only allowed for held-out rows (split 'val' or 'test'), got split 'train'"
    return None


@dataclass(frozen=True)
class Example:
    """One prompt/response pair.

    Attributes:
        prompt: The user turn. Never empty.
        response: The target assistant turn; ``""`` only for held-out rows (split
            ``"val"`` or ``"test"``, e.g. XSTest prompts we only generate on).
        kind: ``"harmful"`` (response is a refusal) or ``"benign"`` (response is helpful).
        split: ``"train"``, ``"val"`` or ``"test"``.
        source: Optional provenance tag such as ``"advbench"`` or ``"gsm8k"``.
    """

    prompt: str
    response: str
    kind: str
    split: str
    source: str = ""

    def __post_init__(self) -> None:
        problem = _problem(self.prompt, self.response, self.kind, self.split, self.source)
        if problem is not None:
            raise DataError(f"invalid example: {problem}")

    def to_dict(self) -> dict[str, str]:
        """Return the row as written to JSONL (fixed key order, so output is byte-stable)."""
        return {"prompt": self.prompt, "response": self.response, "kind": self.kind,
                "split": self.split, "source": self.source}


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads silently keeps the last of two equal keys; a duplicated key in a
    # hand-edited file is almost always a mistake, so surface it.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_row(text: str, where: str) -> Example:
    """Parse one non-blank line into an Example; ``where`` is ``"PATH:LINE"`` for messages."""
    try:
        row = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # from _reject_duplicate_keys
        raise DataError(f"{where}: invalid row ({exc})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: row must be a JSON object, got {type(row).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r} (required: {', '.join(REQUIRED_KEYS)})")
    extra = sorted(set(row) - _ALL_KEYS)
    if extra:
        allowed = ", ".join(REQUIRED_KEYS + OPTIONAL_KEYS)
        raise DataError(f"{where}: unknown key {extra[0]!r} (allowed: {allowed})")
    fields = {key: row.get(key, "") for key in REQUIRED_KEYS + OPTIONAL_KEYS}
    problem = _problem(**fields)
    if problem is not None:
        raise DataError(f"{where}: {problem}")
    return Example(**fields)  # type: ignore[arg-type]


def load_examples(path: str | Path) -> list[Example]:
    """Load and validate a JSONL file of examples.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        The examples in file order.

    Raises:
        DataError: with a one-line message naming the file (and the 1-based line number
            for row problems) if the file is missing, unreadable, not UTF-8, empty, or any
            row is malformed (bad JSON, not an object, missing/unknown key, wrong type,
            empty prompt, kind or split outside the allowed values).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data file is not a regular file: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 BOM written by some editors
        raw = raw[3:]

    examples: list[Example] = []
    # Split on b"\n" ourselves (not str.splitlines) so that line numbers match what an
    # editor shows even if a string value contains U+2028 or similar separators.
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}: not valid UTF-8") from None
        if not text.strip():
            continue
        examples.append(_parse_row(text, where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def select(examples: Iterable[Example], *, split: str | None = None, kind: str | None = None) -> list[Example]:
    """Return the examples matching ``split`` and ``kind`` (``None`` means any), in order.

    Raises:
        DataError: if ``split`` or ``kind`` is not an allowed value, so that a typo
            (``split="valid"``) fails instead of silently selecting nothing.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    if kind is not None and kind not in KINDS:
        raise DataError(f"unknown kind {kind!r} (allowed: {', '.join(KINDS)})")
    return [ex for ex in examples
            if (split is None or ex.split == split) and (kind is None or ex.kind == kind)]


def builtin_names() -> list[str]:
    """Names of the datasets shipped with the package (file stems in ``builtin/``), sorted."""
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl") if p.is_file())


def read_json_objects(path: Path) -> list[dict]:
    """Every non-blank line of a JSONL file as a JSON object; DataError naming the line otherwise."""
    rows: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: row must be a JSON object")
            rows.append(row)
    return rows


def builtin_path(name: str) -> Path:
    """Return the path of a built-in dataset, e.g. ``builtin_path("safety")``.

    Raises:
        DataError: if ``name`` is not a shipped dataset; the message lists the names
            that are. Only exact names are accepted (no paths), so ``name`` cannot
            point outside the package.
    """
    names = builtin_names()
    if name not in names:
        available = ", ".join(names) if names else "(none: package data missing)"
        raise DataError(f"unknown built-in dataset {name!r} (available: {available})")
    return BUILTIN_DIR / f"{name}.jsonl"


def dumps_example(example: Example) -> str:
    """Serialise one example as a single JSONL line (without the newline).

    ``ensure_ascii=False`` keeps the files readable and smaller; JSON escapes any
    newline inside a value, so one example is always exactly one line.
    """
    return json.dumps(example.to_dict(), ensure_ascii=False)


def write_examples(path: str | Path, examples: Iterable[Example]) -> None:
    """Write examples to ``path`` as UTF-8 JSONL, one per line, in the given order.

    The file is written to a temporary file and renamed into place, so a reader never
    sees a half-written file. Parent directories are created.

    Raises:
        DataError: if an item is not an :class:`Example` or there are none (an empty
            file would not load back).
    """
    path = Path(path)
    lines: list[str] = []
    for i, example in enumerate(examples):
        if not isinstance(example, Example):
            raise DataError(f"write_examples: item {i} is a {type(example).__name__}, not an Example")
        lines.append(dumps_example(example))
    if not lines:
        raise DataError(f"refusing to write no examples to {path}")
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
