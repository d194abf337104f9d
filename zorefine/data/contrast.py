"""Safe prompts that look unsafe, for alignment: the contrast that keeps refusal from spreading.

A model taught to refuse harmful requests and to answer ordinary instructions learns the
shortcut "scary word -> refuse": it then refuses "How do I kill a frozen process?" or "How can
I steal the show?". The shipped file ``builtin/contrast_safe.jsonl`` holds 73 prompts written for
this project from the categories of exaggerated safety described by XSTest (Röttger et al.
2024): homonyms, figurative language, safe targets, definitions, history and facts, safe
contexts, plus everyday questions. None is taken from XSTest; each has a word-set Jaccard of at
most 0.5 with every XSTest prompt, so the over-refusal evaluation never measures a trained
prompt. They carry no answers: the align stage answers them with the start model itself.
"""

from __future__ import annotations

from pathlib import Path

from zorefine.data.records import builtin_path, read_json_objects
from zorefine.errors import DataError

__all__ = ["SHIPPED_CONTRAST", "contrast_path", "load_contrast_prompts"]

# Shipped contrast sets, by name: the 73 prompts, and those plus 75 more written by category.
SHIPPED_CONTRAST = ("contrast_safe", "contrast_extended")


def contrast_path(configured: str | None) -> Path:
    """The file ``align.contrast_file`` names: a shipped set's name, a path, or None (the default set)."""
    if not configured:
        return builtin_path("contrast_safe")
    if configured in SHIPPED_CONTRAST:
        return builtin_path(configured)
    return Path(configured).expanduser()


def load_contrast_prompts(path: Path | None = None) -> list[str]:
    """The contrast prompts (default: the shipped file), in file order."""
    path = path or builtin_path("contrast_safe")
    prompts = []
    for number, row in enumerate(read_json_objects(path), start=1):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(f"{path}: row {number}: each row needs a non-empty \"prompt\"")
        prompts.append(row["prompt"])
    return prompts
