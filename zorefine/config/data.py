"""The ``data`` group: the safety and over-refusal data a run trains and measures on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from zorefine.config.checks import require


@dataclass
class DataConfig:
    """Safety-alignment data in the zorefine JSONL format (see README)."""

    # null = the built-in set shipped inside the package.
    safety_file: Optional[str] = None
    # Safe prompts that must not be refused (over-refusal); null = built-in XSTest, "" = none.
    overrefusal_file: Optional[str] = None
    # Tokens per (prompt + response) in training and loss evaluation; fits the built-in
    # data (short prompts, answers cut to their first sentences). Raise it for long prompts.
    max_length: int = 96


def check_data(cfg: DictConfig) -> None:
    """Ranges the ``data`` group's types cannot express."""
    require(cfg.max_length >= 16, "data.max_length must be >= 16")
