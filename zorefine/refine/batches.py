"""The training pairs refinement scores and the per-step batches drawn from them."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import zorefine
from zorefine.distributed.processes import Processes
from zorefine.models.fingerprint import checkpoint_fingerprint, content_key
from zorefine.files import in_turn, write_json_atomic
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


def targets_key(run: Run, reference: TrainingPairs) -> str:
    """A hash of everything the start model's greedy targets depend on."""
    cfg = run.cfg.refine
    return content_key({
        "zorefine": zorefine.__version__,
        "checkpoint": checkpoint_fingerprint(run.aligned_checkpoint),
        "targets": cfg.targets,
        "target_tokens": cfg.target_tokens,
        "prompts": [prompt for prompt, *_ in reference.harmful + reference.benign],
        "model": {k: run.cfg.model[k] for k in ("dtype", "device")},
        "torch": torch.__version__,
    })


def _cached_pairs(path: Path | None) -> TrainingPairs | None:
    if path is None or not path.is_file():
        return None
    data = json.loads(path.read_text())
    return TrainingPairs([tuple(p) for p in data["harmful"]], [tuple(p) for p in data["benign"]], data["generation_forward_passes"])


def refinement_pairs(run: Run, model, tokenizer) -> TrainingPairs:
    """The pairs of ``refine.targets``: the data's responses, or the starting model's own.

    With ``refine.targets_cache_dir`` the start model's responses are decoded once per model and
    setting and read back by every later run (a sweep's methods and seeds). Their decoding cost
    is charged to every run all the same: a user refining once would spend it.
    """
    cfg = run.cfg.refine
    reference = reference_pairs(run)
    if cfg.targets == "reference":
        return reference
    cached = Path(cfg.targets_cache_dir) / f"{targets_key(run, reference)}.json" if cfg.targets_cache_dir else None
    if cached is None:
        pairs = _decoded_or_read_back(run, model, tokenizer, reference, None)
    else:
        # Jobs of a sweep side by side start from one model: one decodes, the others wait and read back.
        pairs = in_turn(cached, cached.is_file, lambda: _decoded_or_read_back(run, model, tokenizer, reference, cached),
                        alone=not run.processes.distributed)
    if run.processes.is_main:
        # What the objective asked for, to read next to the trajectory.
        write_json_atomic(run.run_dir / TARGETS_FILE, {"targets": cfg.targets, "harmful": pairs.harmful, "benign": pairs.benign})
    return pairs


def _decoded_or_read_back(run: Run, model, tokenizer, reference: TrainingPairs, cached: Path | None) -> TrainingPairs:
    cfg = run.cfg.refine
    pairs = _cached_pairs(cached)
    if pairs is not None:
        log.info("[refine] %s targets: read back from %s", cfg.targets, cached)
        return pairs
    started = time.perf_counter()
    pairs = training_pairs(model, tokenizer, reference.harmful, reference.benign, cfg.targets, cfg.target_tokens)
    log.info("[refine] %s targets: the start model's greedy responses in %.1f s", cfg.targets, time.perf_counter() - started)
    if cached is not None and run.processes.is_main:
        write_json_atomic(cached, {"harmful": pairs.harmful, "benign": pairs.benign,
                                   "generation_forward_passes": pairs.generation_forward_passes})
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
