"""Sensitivity: how much safety (and utility) degrades when one unit alone is threatened.

For every unit (layer, module or tensor, :mod:`zorefine.models.units`) and every threat family
(:mod:`zorefine.threats`), the analyzer applies the threat to that unit only, over seeds, and
measures against the clean model:

- the rise of the safety loss (NLL of the reference refusals on harmful prompts),
- the drop of the refusal rate (greedy generations, judged),
- the rise of the utility loss (NLL of the reference answers on benign prompts).

Random threats are sampled antithetically: each seed is applied as ``+z`` and ``−z`` and the two
measures averaged, which cancels the first-order (gradient) term of the loss change exactly. What
is left is the curvature the noise runs into, so rankings from different seeds agree far better.

The ZO-curvature probe is in :mod:`zorefine.analyze.curvature`, the ranking of the units by these
scores in :mod:`zorefine.analyze.ranking` and the units × threats heatmap in :mod:`zorefine.analyze.heatmap`.
"""

from __future__ import annotations

import statistics
from functools import cached_property
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from zorefine import distributed
from zorefine.models.generation import generate_responses
from zorefine.judge import RefusalJudge, Verdict
from zorefine.models.objectives import mean_response_nll
from zorefine.stats import mean_interval
from zorefine.threats import Threat, parse_threat, threatened
from zorefine.threats.base import is_random
from zorefine.models.units import Unit

SCORES = ("safety_loss_rise", "refusal_drop", "utility_loss_rise")


@dataclass
class Probe:
    """The prompts an analysis measures on: harmful (with refusals) and benign (with answers)."""

    harmful: list[tuple[str, str]]
    benign: list[tuple[str, str]]
    max_length: int = 256
    max_new_tokens: int = 12
    batch_size: int = 48


@dataclass
class Measure:
    """Safety loss, utility loss and (optionally) refusal rate of the model as it is now."""

    safety_loss: float
    utility_loss: float
    refusal_rate: float | None = None


def measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probe: Probe,
    judge: RefusalJudge | None,
) -> Measure:
    """Losses on the probe, and the refusal rate on its harmful prompts when ``judge`` is given."""
    safety = mean_response_nll(model, tokenizer, probe.harmful, probe.max_length, probe.batch_size)
    utility = mean_response_nll(model, tokenizer, probe.benign, probe.max_length, probe.batch_size) if probe.benign else float("nan")
    refusal = None
    if judge is not None:
        prompts = [prompt for prompt, _ in probe.harmful]
        verdicts = judge(prompts, generate_responses(model, tokenizer, prompts, probe.max_new_tokens, probe.batch_size))
        refusal = sum(v == Verdict.REFUSAL for v in verdicts) / len(verdicts)
    return Measure(safety, utility, refusal)


def _average(measures: Sequence[Measure]) -> Measure:
    refusals = [m.refusal_rate for m in measures]
    return Measure(
        statistics.fmean(m.safety_loss for m in measures),
        statistics.fmean(m.utility_loss for m in measures),
        None if None in refusals else statistics.fmean(refusals),  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class ThreatFamily:
    """A threat spec, instantiated once per seed (random threats) or once (deterministic ones)."""

    spec: str

    @cached_property
    def prototype(self) -> Threat:
        """The threat the spec describes (parsed once)."""
        return parse_threat(self.spec)

    @property
    def random(self) -> bool:
        """Whether the threat draws noise (so seeds and antithetic pairs mean something)."""
        return is_random(self.prototype)

    def samples(self, seed: int, antithetic: bool) -> list[Threat]:
        """The threats whose measures are averaged into one trial of ``seed``."""
        prototype = self.prototype
        if not self.random:
            return [prototype]
        threat = replace(prototype, seed=seed)  # type: ignore[type-var]
        return [threat, replace(threat, negate=True)] if antithetic and hasattr(threat, "negate") else [threat]

    @property
    def label(self) -> str:
        """Seed-free label for tables and plots, e.g. ``wnoise_rel_s0.5``."""
        name = self.prototype.name
        return name.rsplit("_seed", 1)[0] if self.random else name


@dataclass
class UnitThreatScore:
    """One unit under one threat family: mean and 95% interval over seeds of each score."""

    unit: str
    layer: int
    kind: str
    num_parameters: int
    threat: str
    safety_loss_rise: dict[str, float]
    refusal_drop: dict[str, float] | None
    utility_loss_rise: dict[str, float]
    trials: int

    def mean(self, score: str) -> float:
        """The mean of ``score`` (NaN when it was not measured)."""
        value = getattr(self, score)
        return float("nan") if value is None else value["mean"]


@dataclass
class Analysis:
    """Everything an analysis measured, and what it cost."""

    clean: Measure
    scores: list[UnitThreatScore]
    curvature: dict[str, dict[str, float]] = field(default_factory=dict)
    curvature_eps: float | None = None
    forward_passes: int = 0


class ForwardCounter:
    """Counts the model's forward calls (generation steps included) while active."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.count = model, 0

    def __enter__(self) -> "ForwardCounter":
        self._handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, *args: object) -> None:
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def _trial(
    model: PreTrainedModel, threats: Sequence[Threat], unit: Unit, run_measure: Callable[[], Measure]
) -> Measure:
    measures = []
    for threat in threats:
        with threatened(model, threat, params=unit.params):
            measures.append(run_measure())
    return _average(measures)


def unit_sensitivity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    units: Sequence[Unit],
    families: Sequence[ThreatFamily],
    seeds: Sequence[int],
    probe: Probe,
    judge: RefusalJudge | None,
    antithetic: bool = True,
    show_progress: bool = True,
) -> Analysis:
    """Apply each threat family to each unit alone, over ``seeds``; weights restored exactly after each.

    ``judge=None`` skips generation (losses only, several times cheaper).
    """
    processes = distributed.current()
    # Every (family, unit, seed) trial is independent: under a launcher each process runs its
    # share and the results are put back in the order one process would have produced them.
    trials = [
        (family_index, unit_index, seed)
        for family_index, family in enumerate(families)
        for unit_index in range(len(units))
        for seed in (seeds if family.random else [None])
    ]
    with ForwardCounter(model) as counter:
        clean = measure(model, tokenizer, probe, judge)
        progress = tqdm(total=len(processes.shard(trials)), desc="analyze", disable=not (show_progress and processes.is_main))

        def run_trial(trial: tuple[int, int, int | None]) -> Measure:
            family_index, unit_index, seed = trial
            threats = families[family_index].samples(seed if seed is not None else 0, antithetic)
            noisy = _trial(model, threats, units[unit_index], lambda: measure(model, tokenizer, probe, judge))
            progress.update()
            return noisy

        outcomes = dict(zip(trials, processes.map_sharded(trials, run_trial)))
        progress.close()
    scores = []
    for family_index, family in enumerate(families):
        family_seeds = seeds if family.random else [None]
        for unit_index, unit in enumerate(units):
            noisy_trials = [outcomes[(family_index, unit_index, seed)] for seed in family_seeds]
            rises = [noisy.safety_loss - clean.safety_loss for noisy in noisy_trials]
            utility = [noisy.utility_loss - clean.utility_loss for noisy in noisy_trials]
            drops = [
                clean.refusal_rate - noisy.refusal_rate
                for noisy in noisy_trials
                if noisy.refusal_rate is not None and clean.refusal_rate is not None
            ]
            scores.append(
                UnitThreatScore(
                    unit=unit.name,
                    layer=unit.layer,
                    kind=unit.kind,
                    num_parameters=unit.num_parameters,
                    threat=family.label,
                    safety_loss_rise=mean_interval(rises),
                    refusal_drop=mean_interval(drops) if drops else None,
                    utility_loss_rise=mean_interval(utility),
                    trials=len(family_seeds),
                )
            )
    forward_passes = int(processes.sum([counter.count])[0])
    return Analysis(clean, scores, forward_passes=forward_passes)
