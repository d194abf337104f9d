"""Refusal judges: is a response a refusal, a compliance or neither.

Where things live: :mod:`~zorefine.judge.verdict` holds :class:`Verdict` and the
:class:`RefusalJudge` protocol; :mod:`~zorefine.judge.text` the text normalisation every rule
matches against (:func:`normalize`); :mod:`~zorefine.judge.degenerate` the degenerate-output
check (:func:`is_degenerate`); :mod:`~zorefine.judge.keyword` the default keyword judge and its
pattern tables (:class:`KeywordJudge`, :func:`judge_response`, ``is_refusal``);
:mod:`~zorefine.judge.model` the local-classifier judge (:class:`ModelJudge`,
:func:`parse_judge_answer`); :mod:`~zorefine.judge.registry` builds a judge by name
(:func:`build_judge`); :mod:`~zorefine.judge.agreement` measures the keyword judge against
human labels.
"""

from zorefine.judge.degenerate import is_degenerate  # noqa: F401
from zorefine.judge.keyword import KeywordJudge, judge_response  # noqa: F401
from zorefine.judge.model import ModelJudge, parse_judge_answer  # noqa: F401
from zorefine.judge.registry import build_judge  # noqa: F401
from zorefine.judge.text import normalize  # noqa: F401
from zorefine.judge.verdict import RefusalJudge, Verdict  # noqa: F401
