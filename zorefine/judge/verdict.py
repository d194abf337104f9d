"""Verdicts and the judge interface: :class:`Verdict` and the :class:`RefusalJudge` protocol."""

from __future__ import annotations

import enum
from typing import Protocol, Sequence, runtime_checkable

__all__ = ["Verdict", "RefusalJudge"]


class Verdict(str, enum.Enum):
    """What a response does with the request."""

    REFUSAL = "refusal"
    COMPLIANCE = "compliance"
    DEGENERATE = "degenerate"


# --------------------------------------------------------------------------- judges


@runtime_checkable
class RefusalJudge(Protocol):
    """Anything that maps (prompts, responses) to one :class:`Verdict` per response."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """Judge ``responses[i]`` as an answer to ``prompts[i]``."""
        ...


def _check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(
            f"judge got {len(prompts)} prompts but {len(responses)} responses; they must pair up"
        )
