"""Judges by name: :func:`build_judge` maps a config's judge name to its judge (``JUDGE_NAMES``)."""

from __future__ import annotations

from typing import Any

from zorefine.errors import ConfigError
from zorefine.judge.keyword import KeywordJudge
from zorefine.judge.model import ModelJudge
from zorefine.judge.verdict import RefusalJudge

__all__ = ["build_judge", "configured_judge", "JUDGE_NAMES"]


JUDGE_NAMES: tuple[str, ...] = ("keyword", "model")


def configured_judge(judge: str, judge_path: str | None = None) -> RefusalJudge:
    """The judge an ``evaluate`` config names: ``keyword``, or ``model`` loaded from ``judge_path``."""
    return build_judge(judge, path=judge_path) if str(judge).strip().lower() == "model" else build_judge(judge)


def build_judge(name: str = "keyword", **kwargs: Any) -> RefusalJudge:
    """Build a judge by name: ``"keyword"`` (default, no arguments) or ``"model"``.

    ``"model"`` needs ``path=`` (a local checkpoint directory) and passes the other keyword
    arguments to :class:`ModelJudge`. Raises ConfigError for an unknown name or arguments
    the judge does not take.
    """
    key = str(name).strip().lower()
    if key == "keyword":
        if kwargs:
            raise ConfigError(f"the keyword judge takes no options, got {sorted(kwargs)}")
        return KeywordJudge()
    if key == "model":
        if not kwargs.get("path"):
            raise ConfigError("the model judge needs path= (a local judge checkpoint directory)")
        try:
            return ModelJudge(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"bad option for the model judge: {exc}") from exc
    raise ConfigError(f"unknown judge {name!r}; choose one of {', '.join(JUDGE_NAMES)}")
