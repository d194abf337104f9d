"""ZO curvature: per unit, a Hutchinson estimate of the curvature of the safety loss.

It runs the antithetic trials of :mod:`zorefine.analyze.sensitivity` (each seed applied as ``+z``
and ``−z``, the two measures averaged) with a small weight noise.

The ZO-curvature score is the same mechanism at a small relative radius ε: per unit,
``(L(θ+εz) + L(θ−εz) − 2L(θ)) / ε²`` (with ``z`` scaled by each tensor's RMS) is a Hutchinson
estimate of the curvature of the safety loss along that unit's weights.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from zorefine.analyze.sensitivity import ForwardCounter, Probe, _trial, measure
from zorefine import distributed
from zorefine.stats import mean_interval
from zorefine.threats import WeightNoise
from zorefine.models.units import Unit


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
