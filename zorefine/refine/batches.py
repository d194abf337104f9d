"""The training pairs refinement scores and the per-step batches drawn from them."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from zorefine.distributed.processes import Processes
from zorefine.models.loading import write_json_atomic
from zorefine.models.objectives import encode_batch
from zorefine.refine.targets import TrainingPairs, training_pairs
from zorefine.run import TARGETS_FILE, Run

log = logging.getLogger(__name__)


@dataclass
class StepBatch:
    """One step's training pairs and the weight of each in the objective."""

    pairs: list[tuple[str, str]]
    weights: list[float]

    def shard(self, processes: Processes) -> "StepBatch":
        """This process's share of the batch (data-parallel ZO: each process scores its share)."""
        return StepBatch(processes.shard(self.pairs), processes.shard(self.weights))

    def micro_batches(self, tokenizer, max_length: int, grad_accum: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        """``grad_accum`` encoded micro-batches with their example weights (None: all weigh 1)."""
        chunk = max(1, -(-len(self.pairs) // grad_accum))
        uniform = all(w == 1.0 for w in self.weights)
        return [
            (
                encode_batch(tokenizer, self.pairs[i : i + chunk], max_length),
                None if uniform else torch.tensor(self.weights[i : i + chunk]),
            )
            for i in range(0, len(self.pairs), chunk)
        ]


def reference_pairs(run: Run) -> TrainingPairs:
    """The ``train`` split's harmful->refusal and benign->answer pairs, as the data gives them."""
    harmful = [(e.prompt, e.response) for e in run.split("train", "harmful")]
    benign = [(e.prompt, e.response) for e in run.split("train", "benign")]
    return TrainingPairs(harmful, benign)


def refinement_pairs(run: Run, model, tokenizer) -> TrainingPairs:
    """The pairs of ``refine.targets``: the data's responses, or the starting model's own."""
    cfg = run.cfg.refine
    reference = reference_pairs(run)
    if cfg.targets == "reference":
        return reference
    started = time.perf_counter()
    pairs = training_pairs(model, tokenizer, reference.harmful, reference.benign, cfg.targets, cfg.target_tokens)
    log.info("[refine] %s targets: the start model's greedy responses in %.1f s", cfg.targets, time.perf_counter() - started)
    if run.processes.is_main:
        # What the objective asked for, to read next to the trajectory.
        write_json_atomic(run.run_dir / TARGETS_FILE, {"targets": cfg.targets, "harmful": pairs.harmful, "benign": pairs.benign})
    return pairs


def batch_sampler(run: Run, pairs: TrainingPairs | None = None) -> Callable[[int], StepBatch]:
    """Per-step training batches: half harmful->refusal, half benign->answer, seeded by step.

    Benign pairs weigh ``refine.benign_weight`` in the objective (1: every token counts the same).
    ``pairs`` defaults to the data's own (reference) responses.
    """
    pairs = pairs if pairs is not None else reference_pairs(run)
    harmful, benign = pairs.harmful, pairs.benign
    size = run.cfg.refine.batch_size
    seed = run.cfg.refine.seed
    benign_weight = float(run.cfg.refine.benign_weight)

    def sample(step: int) -> StepBatch:
        rng = random.Random(f"{seed}:{step}")
        n_harmful = (size + 1) // 2
        chosen_harmful = rng.sample(harmful, min(n_harmful, len(harmful)))
        chosen_benign = rng.sample(benign, min(size - n_harmful, len(benign)))
        return StepBatch(chosen_harmful + chosen_benign, [1.0] * len(chosen_harmful) + [benign_weight] * len(chosen_benign))

    return sample
