"""refine: MeZO-style ZO-SGD on the selected layers, forward passes only."""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from zorefine.errors import ConfigError
from zorefine.models.layers import find_decoder_layers
from zorefine.models.loading import save_checkpoint
from zorefine.objectives import encode_batch, response_nll
from zorefine.pipeline import REFINED_DIR, Run
from zorefine.stages.analyze import SELECTION_FILE
from zorefine.trajectory import TrajectoryWriter, environment, iter_steps, read_trajectory
from zorefine.zo import ZOEngine, step_seed

log = logging.getLogger(__name__)

TRAJECTORY_FILE = "trajectory.jsonl"


def selected_layers(run: Run) -> list[int]:
    """``refine.layers`` when given, else the analyze stage's choice."""
    if run.cfg.refine.layers is not None:
        return list(run.cfg.refine.layers)
    selection = run.run_dir / SELECTION_FILE
    if not selection.is_file():
        raise ConfigError(f"no layer selection: {selection} is missing; run analyze or set refine.layers")
    return list(json.loads(selection.read_text())["layers"])


def selected_parameters(model: torch.nn.Module, layers: list[int]) -> dict[str, torch.nn.Parameter]:
    """All parameters of the chosen decoder layers, by full name."""
    decoder = find_decoder_layers(model)
    bad = [i for i in layers if not 0 <= i < len(decoder)]
    if bad:
        raise ConfigError(f"refine.layers {bad} out of range: the model has {len(decoder)} decoder layers")
    params: dict[str, torch.nn.Parameter] = {}
    for index in layers:
        params.update(decoder.parameters(index))
    return params


def batch_sampler(run: Run):
    """Per-step training batches: half harmful->refusal, half benign->answer, seeded by step."""
    harmful = [(e.prompt, e.response) for e in run.split("train", "harmful")]
    benign = [(e.prompt, e.response) for e in run.split("train", "benign")]
    size = run.cfg.refine.batch_size
    seed = run.cfg.refine.seed

    def sample(step: int) -> list[tuple[str, str]]:
        rng = random.Random(f"{seed}:{step}")
        n_harmful = (size + 1) // 2
        return rng.sample(harmful, min(n_harmful, len(harmful))) + rng.sample(benign, min(size - n_harmful, len(benign)))

    return sample


def _same_trajectory(previous: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a logged run can be continued: same start, layers and settings but the step count."""

    def settings(header: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in header.get("refine", {}).items() if k not in ("steps", "log_every")}

    return (
        previous.get("base_checkpoint") == current["base_checkpoint"]
        and previous.get("parameters") == current["parameters"]
        and settings(previous) == settings(current)
    )


def run(run: Run) -> dict[str, Any]:
    """Refine, append each step to ``trajectory.jsonl``, write the refined checkpoint."""
    cfg = run.cfg.refine
    started = time.perf_counter()
    checkpoint = run.aligned_checkpoint
    model, tokenizer = run.load_model(checkpoint)
    layers = selected_layers(run)
    params = selected_parameters(model, layers)
    engine = ZOEngine(params, cfg.eps)
    header = {
        "base_checkpoint": str(checkpoint),
        "layers": layers,
        "parameters": sorted(params),
        "refine": OmegaConf.to_container(cfg, resolve=True),
        "environment": environment(),
    }
    log_path = run.run_dir / TRAJECTORY_FILE
    previous_header, previous_steps = read_trajectory(log_path)
    if previous_header is not None and not _same_trajectory(previous_header, header):
        log.warning("[refine] %s belongs to another configuration; starting over", log_path)
        previous_steps = []
    previous_steps = previous_steps[: cfg.steps]
    for record in iter_steps(previous_steps):
        engine.apply_update(record.seed, record.projected_grad, record.lr)
    if previous_steps:
        log.info("[refine] resumed: replayed %d logged steps", len(previous_steps))
    sample = batch_sampler(run)
    max_length = run.cfg.data.max_length
    records = list(previous_steps)
    progress = tqdm(range(len(previous_steps), cfg.steps), desc="refine", initial=len(previous_steps), total=cfg.steps)
    with TrajectoryWriter(log_path, header, len(previous_steps)) as writer:
        for step in progress:
            batch = encode_batch(tokenizer, sample(step), max_length)
            record = engine.step(step, step_seed(cfg.seed, step), cfg.lr, lambda: response_nll(model, batch))
            writer.append(record)
            records.append(record)
            progress.set_postfix(loss=f"{record.loss:.4f}", g=f"{record.projected_grad:+.3f}")
    out_dir = run.run_dir / REFINED_DIR
    info = {"stage": "refine", "base": str(checkpoint), "layers": layers, "trajectory": str(log_path)}
    save_checkpoint(model, tokenizer, out_dir, info)
    losses = [r.loss for r in records if not r.skipped]
    return {
        "checkpoint": str(out_dir),
        "base": str(checkpoint),
        "layers": layers,
        "num_parameters": engine.num_parameters,
        "steps": len(records),
        "skipped_steps": sum(r.skipped for r in records),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "trajectory": str(log_path),
        "forward_passes": 2 * len(records),
        "seconds": round(time.perf_counter() - started, 1),
    }
