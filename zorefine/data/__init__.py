"""Datasets: the JSONL example format, its strict loader, and the built-in safety data.

Typical use::

    from zorefine.data import builtin_path, load_examples, select

    examples = load_examples(builtin_path("safety"))
    train_harmful = select(examples, split="train", kind="harmful")
"""

from zorefine.data.records import (
    BUILTIN_DIR,
    KINDS,
    SPLITS,
    Example,
    builtin_names,
    builtin_path,
    load_examples,
    select,
    write_examples,
)
from zorefine.data.refusals import REFUSAL_PREFIXES, starts_with_refusal_prefix, write_refusal

__all__ = [
    "BUILTIN_DIR",
    "KINDS",
    "REFUSAL_PREFIXES",
    "SPLITS",
    "Example",
    "builtin_names",
    "builtin_path",
    "load_examples",
    "select",
    "starts_with_refusal_prefix",
    "write_examples",
    "write_refusal",
]
