"""Refusal judges: is a response a refusal, a compliance or neither."""

from zorefine.judge.core import (  # noqa: F401
    KeywordJudge,
    ModelJudge,
    RefusalJudge,
    Verdict,
    build_judge,
    is_degenerate,
    judge_response,
    normalize,
    parse_judge_answer,
)
