"""The loss one refinement step optimises: its batch's response NLL, clean or under a threat."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import torch

from zorefine.distributed.processes import current
from zorefine.models.objectives import response_nll_terms
from zorefine.refine.batches import StepBatch
from zorefine.run import Run
from zorefine.threats import parse_threat, threatened
from zorefine.threats.base import is_random
from zorefine.threats.streams import stream_seed
from zorefine.zo.engine import step_seed
from zorefine.zo.prefix_cache import PrefixCache


def step_objective(
    run: Run, model, tokenizer, batch: StepBatch, step: int, cache: PrefixCache | None = None
) -> Callable[[], float]:
    """The alignment loss of one step's batch, over ``grad_accum`` micro-batches.

    The loss is the weighted mean over every response token of the batch. Under a launcher
    each process scores its share and only the two sums behind the mean are added across
    processes, so every process gets the same loss as one process scoring the whole batch.

    With ``refine.objective_threat`` the loss is that of the threatened model; the threat's
    seed is fixed for the step, so the + and − passes see the same noise sample. With an
    active ``cache`` (no layer below its first layer is refined) the unperturbed prefix is
    computed once here and every evaluation of the returned closure runs only the rest.
    """
    cfg = run.cfg.refine
    processes = current()
    micro = batch.shard(processes).micro_batches(tokenizer, run.cfg.data.max_length, cfg.grad_accum)
    threat = None
    if cfg.objective_threat:
        threat = parse_threat(cfg.objective_threat)
        if is_random(threat):
            threat = dataclasses.replace(threat, seed=stream_seed("train", step_seed(cfg.seed + 7919, step)))

    # A threat on every decoder layer changes the prefix too: nothing to cache then.
    use_cache = cache is not None and cache.active and threat is None
    if use_cache:
        cache.capture_prefix([functools.partial(_forward, model, b) for b, _ in micro])

    def loss() -> float:
        with threatened(model, threat) if threat is not None else contextlib.nullcontext():
            with cache.replay() if use_cache else contextlib.nullcontext():
                terms = [response_nll_terms(model, b, w) for b, w in micro]
                total, weight = processes.sum([sum(float(t) for t, _ in terms), sum(float(w) for _, w in terms)])
                return total / max(weight, 1e-12)

    return loss


def _forward(model, batch: dict[str, torch.Tensor]) -> None:
    model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device))
