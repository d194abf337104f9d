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

The ZO-curvature score is the same mechanism at a small relative radius ε: per unit,
``(L(θ+εz) + L(θ−εz) − 2L(θ)) / ε²`` (with ``z`` scaled by each tensor's RMS) is a Hutchinson
estimate of the curvature of the safety loss along that unit's weights.
"""

from __future__ import annotations

import math
import statistics
from functools import cached_property
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from zorefine.distributed import processes as distributed
from zorefine.models.generation import generate_responses
from zorefine.judge import RefusalJudge, Verdict
from zorefine.models.objectives import mean_response_nll
from zorefine.evaluate.robustness import mean_interval
from zorefine.threats import Threat, WeightNoise, parse_threat, threatened
from zorefine.models.units import Unit

SCORES = ("safety_loss_rise", "refusal_drop", "utility_loss_rise")
RANK_BY = ("safety_loss_rise", "refusal_drop", "curvature")


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
        return hasattr(self.prototype, "seed")

    def samples(self, seed: int, antithetic: bool) -> list[Threat]:
        """The threats whose measures are averaged into one trial of ``seed``."""
        prototype = self.prototype
        if not self.random:
            return [prototype]
        threat = replace(prototype, seed=seed)  # type: ignore[type-var]
        return [threat, replace(threat, negate=True)] if antithetic else [threat]

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


def zo_curvature(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    units: Sequence[Unit],
    seeds: Sequence[int],
    probe: Probe,
    eps: float,
    show_progress: bool = True,
) -> tuple[dict[str, dict[str, float]], int]:
    """Per unit, ``(L(θ+εz) + L(θ−εz) − 2L(θ)) / ε²`` on the safety loss, over ``seeds``.

    ``z`` is relative to each tensor's RMS (the refiner's ``eps_mode=relative``), drawn by the
    same seeded mechanism as weight noise. Costs 2 loss evaluations per unit and seed plus one
    clean one. Returns the mean and interval per unit, and the forward passes spent.
    """
    losses_only = replace(probe, benign=[])
    processes = distributed.current()
    trials = [(unit_index, seed) for unit_index in range(len(units)) for seed in seeds]
    with ForwardCounter(model) as counter:
        clean = measure(model, tokenizer, losses_only, None).safety_loss
        progress = tqdm(total=len(processes.shard(trials)), desc="curvature", disable=not (show_progress and processes.is_main))

        def run_trial(trial: tuple[int, int]) -> float:
            unit_index, seed = trial
            noise = WeightNoise(sigma=eps, mode="relative", seed=seed)
            pair = [noise, replace(noise, negate=True)]
            averaged = _trial(model, pair, units[unit_index], lambda: measure(model, tokenizer, losses_only, None))
            progress.update()
            return 2.0 * (averaged.safety_loss - clean) / eps**2

        values = dict(zip(trials, processes.map_sharded(trials, run_trial)))
        progress.close()
    curvature = {unit.name: mean_interval([values[(i, seed)] for seed in seeds]) for i, unit in enumerate(units)}
    forward_passes = int(processes.sum([counter.count])[0])
    return curvature, forward_passes


def unit_scores(analysis: Analysis, rank_by: str) -> dict[str, float]:
    """One fragility score per unit: ``rank_by`` averaged over threat families.

    Each family's scores are divided by that family's largest absolute score first, so a threat
    whose losses run larger does not drown the others.
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    if rank_by == "curvature":
        if not analysis.curvature:
            raise ValueError("rank_by=curvature needs the curvature analysis (analyze.curvature=true)")
        return {unit: value["mean"] for unit, value in analysis.curvature.items()}
    by_family: dict[str, dict[str, float]] = {}
    for score in analysis.scores:
        by_family.setdefault(score.threat, {})[score.unit] = score.mean(rank_by)
    combined: dict[str, list[float]] = {}
    for values in by_family.values():
        finite = [abs(v) for v in values.values() if math.isfinite(v)]
        scale = max(finite) if finite and max(finite) > 0 else 1.0
        for unit, value in values.items():
            combined.setdefault(unit, []).append(value / scale if math.isfinite(value) else 0.0)
    return {unit: statistics.fmean(values) for unit, values in combined.items()}


def rank_units(scores: dict[str, float], order: Sequence[str]) -> list[str]:
    """Unit names, most fragile first; ties keep ``order`` (the model's layer order)."""
    position = {name: i for i, name in enumerate(order)}
    return sorted(scores, key=lambda unit: (-scores[unit], position.get(unit, len(position))))


def spearman(first: dict[str, float], second: dict[str, float]) -> float:
    """Spearman rank correlation between two scorings of the same units (average ranks for ties)."""
    units = sorted(set(first) & set(second))
    if len(units) < 2:
        return float("nan")

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2.0
            i = j + 1
        return result

    a, b = ranks([first[u] for u in units]), ranks([second[u] for u in units])
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    norm = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return cov / norm if norm > 0 else float("nan")


def as_rows(analysis: Analysis) -> list[dict]:
    """JSON-ready rows, one per (unit, threat), NaN turned into None."""

    def clean(value: object) -> object:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return [{k: clean(v) for k, v in asdict(score).items()} for score in analysis.scores]


def plot_heatmap(analysis: Analysis, metric: str, selected: Sequence[str], path) -> None:
    """Units × threats heatmap of ``metric`` (plus the curvature column); selected units in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = list(dict.fromkeys(score.unit for score in analysis.scores))
    threats = list(dict.fromkeys(score.threat for score in analysis.scores))
    cell = {(s.unit, s.threat): s.mean(metric) for s in analysis.scores}
    columns = [[cell.get((u, t), float("nan")) for t in threats] for u in units]
    labels = [f"{t}\n{metric}" for t in threats]
    if analysis.curvature:
        for row, unit in zip(columns, units):
            row.append(analysis.curvature.get(unit, {}).get("mean", float("nan")))
        labels.append(f"ZO curvature\nε={analysis.curvature_eps:g}")
    matrix = torch.tensor(columns, dtype=torch.float32)
    # Each column on its own scale: threats differ by orders of magnitude.
    scale = matrix.abs().nan_to_num(0).amax(dim=0).clamp_min(1e-12)
    fig, axis = plt.subplots(figsize=(1.6 + 1.9 * len(labels), 1.2 + 0.32 * len(units)))
    image = axis.imshow((matrix / scale).numpy(), aspect="auto", cmap="magma_r", vmin=0, vmax=1)
    for i in range(len(units)):
        for j in range(len(labels)):
            value = float(matrix[i, j])
            axis.text(j, i, "–" if math.isnan(value) else f"{value:.3g}", ha="center", va="center", fontsize=7, color="tab:blue")
    axis.set_xticks(range(len(labels)), labels, fontsize=8)
    axis.set_yticks(range(len(units)), units, fontsize=7)
    for tick, unit in zip(axis.get_yticklabels(), units):
        if unit in selected:
            tick.set_color("tab:red")
            tick.set_fontweight("bold")
    fig.colorbar(image, ax=axis, label="fraction of the column's largest value")
    axis.set_title("Fragility per unit (mean over seeds); red = selected for refinement", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
