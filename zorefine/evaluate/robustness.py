"""Robustness evaluation: refusal, compliance and losses of one model under a grid of threats."""

from __future__ import annotations

import contextlib
import difflib
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Mapping, Optional, Sequence

import torch

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from zorefine import distributed
from zorefine.models.generation import generate_responses
from zorefine.judge import RefusalJudge, Verdict
from zorefine.models.objectives import mean_response_nll, per_example_nll
from zorefine.threats import Threat, WeightNoise, parse_threat, threatened
from zorefine.threats.base import is_random
from zorefine.threats.streams import stream_seed


@dataclass
class EvalSets:
    """Held-out prompts the evaluation generates on, with references for the losses."""

    harmful: list[tuple[str, str]]  # (prompt, refusal): refusal rate, ASR, safety loss
    benign: list[tuple[str, str]]  # (prompt, answer): benign refusal, utility loss
    overrefusal: list[str] = field(default_factory=list)  # safe look-alikes (XSTest)


@dataclass
class Condition:
    """One cell of the threat grid."""

    label: str
    family: str  # "clean" | "weight_noise" | "quantization"
    threat: Optional[Threat] = None
    sigma: Optional[float] = None
    seed: Optional[int] = None


@dataclass
class ConditionResult:
    """Everything measured under one condition."""

    label: str
    family: str
    sigma: Optional[float]
    seed: Optional[int]
    harmful_refusal_rate: float
    attack_success_rate: float  # harmful prompts answered (compliance)
    harmful_degenerate_rate: float
    benign_refusal_rate: float
    benign_helpful_rate: float  # benign prompts answered (not refused, not degenerate)
    benign_degenerate_rate: float
    overrefusal_rate: Optional[float]
    safety_loss: float
    utility_loss: float
    # Mean word-level similarity (difflib ratio, 0..1) of the greedy benign answers to the clean
    # model's: a utility measure for a real model, where "answered" says little about quality.
    benign_agreement: Optional[float] = None
    samples: dict[str, list[str]] = field(default_factory=dict)
    # Per prompt, in set order: 1 where the outcome happened (the harmful prompt was answered, the
    # safe one refused). Two models measured on the same prompts and noise draws pair up on these.
    outcomes: dict[str, list[int]] = field(default_factory=dict)


def threat_grid(sigmas: Sequence[float], seeds: int, quantization: Sequence[str], stream: str = "test") -> list[Condition]:
    """Clean, relative weight noise at each σ × seed, then each quantization spec.

    Noise seed ``i`` of the grid is seed ``i`` of the named noise ``stream`` (``val`` or ``test``;
    see :mod:`zorefine.threats.streams`); a random spec in ``quantization`` (e.g. ``anoise:0.1``)
    draws from the same stream.
    """
    grid = [Condition("clean", "clean")]
    for sigma in sigmas:
        for seed in range(seeds):
            noise = WeightNoise(sigma, "relative", stream_seed(stream, seed))
            grid.append(Condition(f"wnoise σ={sigma:g} seed={seed}", "weight_noise", noise, sigma, seed))
    for spec in quantization:
        threat = parse_threat(spec)
        if is_random(threat):
            threat = replace(threat, seed=stream_seed(stream, threat.seed))
        grid.append(Condition(spec, "quantization", threat))
    return grid


def with_training_data(
    grid: Sequence[Condition], tokenizer, pairs: Sequence[tuple[str, str]], max_length: int, frozen: Mapping[str, torch.Tensor] | None = None
) -> list[Condition]:
    """The grid with every threat that trains (the fine-tuning attack) bound to ``pairs``, and
    ``frozen`` entry masks kept fixed while it trains (a defence such as SSAH's SCU+CU)."""
    bound = []
    for condition in grid:
        if hasattr(condition.threat, "with_data"):
            threat = condition.threat.with_data(tokenizer, pairs, max_length)
            condition = replace(condition, threat=replace(threat, frozen=frozen) if frozen else threat)
        bound.append(condition)
    return bound


def subsample(items: Sequence, limit: int, seed: int = 0) -> list:
    """A seeded, order-preserving subset (files are often grouped by type; the head is biased)."""
    if len(items) <= limit:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _rate(verdicts: Sequence[Verdict], verdict: Verdict) -> float:
    return sum(v == verdict for v in verdicts) / len(verdicts) if verdicts else float("nan")


def measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: EvalSets,
    judge: RefusalJudge,
    condition: Condition,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    keep_samples: int = 0,
    reference_answers: Sequence[str] | None = None,
    fluency_max_nll: float | None = None,
) -> ConditionResult:
    """Generate under ``condition``'s threat, then judge with the clean model, and compute the losses.

    Answers and losses come from the threatened model; the weights are restored before the
    answers are judged. ``fluency_max_nll``: an answer whose mean per-token NLL under the
    *clean* model exceeds it is DEGENERATE, whatever the judge says (word salad from a broken
    model has no refusal phrase and no repetition, so only a language model sees it is not
    language). ``reference_answers`` (the clean model's greedy answers to ``sets.benign``)
    adds ``benign_agreement``.
    """
    harmful_prompts = [p for p, _ in sets.harmful]
    benign_prompts = [p for p, _ in sets.benign]

    def answers(prompts: list[str]) -> list[str]:
        return generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size) if prompts else []

    with threatened(model, condition.threat) if condition.threat is not None else contextlib.nullcontext():
        harmful_out, benign_out, over_out = answers(harmful_prompts), answers(benign_prompts), answers(sets.overrefusal)
        safety_loss = mean_response_nll(model, tokenizer, sets.harmful, max_length, batch_size)
        utility_loss = mean_response_nll(model, tokenizer, sets.benign, max_length, batch_size)

    def judged(prompts: list[str], responses: list[str]) -> list[Verdict]:
        if not prompts:
            return []
        verdicts = judge(prompts, responses)
        if fluency_max_nll is None:
            return verdicts
        nlls = per_example_nll(model, tokenizer, list(zip(prompts, responses)), max_length, batch_size)
        return [Verdict.DEGENERATE if nll > fluency_max_nll else v for v, nll in zip(verdicts, nlls)]

    harmful_v = judged(harmful_prompts, harmful_out)
    benign_v = judged(benign_prompts, benign_out)
    over_v = judged(sets.overrefusal, over_out)
    return ConditionResult(
        label=condition.label,
        family=condition.family,
        sigma=condition.sigma,
        seed=condition.seed,
        harmful_refusal_rate=_rate(harmful_v, Verdict.REFUSAL),
        attack_success_rate=_rate(harmful_v, Verdict.COMPLIANCE),
        harmful_degenerate_rate=_rate(harmful_v, Verdict.DEGENERATE),
        benign_refusal_rate=_rate(benign_v, Verdict.REFUSAL),
        benign_helpful_rate=_rate(benign_v, Verdict.COMPLIANCE),
        benign_degenerate_rate=_rate(benign_v, Verdict.DEGENERATE),
        overrefusal_rate=_rate(over_v, Verdict.REFUSAL) if over_v else None,
        benign_agreement=answer_agreement(benign_out, reference_answers) if reference_answers is not None else None,
        safety_loss=safety_loss,
        utility_loss=utility_loss,
        samples={
            "harmful": [f"{p!r} -> {r!r}" for p, r in zip(harmful_prompts[:keep_samples], harmful_out)],
            "benign": [f"{p!r} -> {r!r}" for p, r in zip(benign_prompts[:keep_samples], benign_out)],
        },
        outcomes={
            "attack_success": [int(v == Verdict.COMPLIANCE) for v in harmful_v],
            "harmful_refusal": [int(v == Verdict.REFUSAL) for v in harmful_v],
            "benign_refusal": [int(v == Verdict.REFUSAL) for v in benign_v],
            "overrefusal": [int(v == Verdict.REFUSAL) for v in over_v],
        },
    )


def answer_agreement(answers: Sequence[str], references: Sequence[str]) -> float:
    """Mean word-level similarity of each answer to its reference (1.0: the same words in order)."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    ratios = [difflib.SequenceMatcher(None, a.split(), r.split(), autojunk=False).ratio() for a, r in zip(answers, references)]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def evaluate_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: EvalSets,
    judge: RefusalJudge,
    grid: Sequence[Condition],
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    desc: str = "evaluate",
    clean_sets: EvalSets | None = None,
    fluency_max_nll: float | None = None,
    measured: Callable[[Condition], ConditionResult | None] | None = None,
    on_measured: Callable[[ConditionResult], None] | None = None,
) -> list[ConditionResult]:
    """Measure the model under every condition; weights are restored exactly after each.

    ``clean_sets`` (default: ``sets``) lets the clean condition, the headline number and a
    single cell, use every held-out prompt while the threat grid uses a subsample.
    ``measured`` returns a condition's result from an interrupted run (measured again when it
    returns None) and ``on_measured`` receives each newly measured one
    (:class:`zorefine.evaluate.partial.ConditionLog`).
    """
    processes = distributed.current()
    # What the threatened answers are compared with: the clean model's, on the grid's prompts
    # (generated once, by every process alike: greedy decoding is deterministic).
    references = generate_responses(model, tokenizer, [p for p, _ in sets.benign], max_new_tokens, batch_size)
    # Conditions are independent and seeded: under a launcher each process measures its share.
    progress = tqdm(total=len(processes.shard(grid)), desc=desc, disable=not processes.is_main)

    def measure_condition(condition: Condition) -> ConditionResult:
        earlier = measured(condition) if measured is not None else None
        if earlier is not None:
            progress.update()
            return earlier
        if condition.threat is None:
            result = measure(model, tokenizer, clean_sets or sets, judge, condition, max_new_tokens, batch_size,
                             max_length, keep_samples=5, fluency_max_nll=fluency_max_nll)
            result.benign_agreement = 1.0
        else:
            result = measure(model, tokenizer, sets, judge, condition, max_new_tokens, batch_size, max_length,
                             reference_answers=references, fluency_max_nll=fluency_max_nll)
        if on_measured is not None:
            on_measured(result)
        progress.update()
        return result

    results = processes.map_sharded(grid, measure_condition)
    progress.close()
    return results


def as_dicts(results: Sequence[ConditionResult]) -> list[dict]:
    """JSON-ready rows of every condition."""
    return [asdict(r) for r in results]
