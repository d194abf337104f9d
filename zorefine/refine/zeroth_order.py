"""ZO refinement of a selection, step by step, logged to the trajectory (a killed run resumes)."""

from __future__ import annotations

import json
from dataclasses import asdict
import logging
import time
from typing import Any

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from zorefine.config.refine import zo_settings
from zorefine.distributed.partitions import is_partitioned
from zorefine.refine.batches import batch_sampler
from zorefine.refine.budget import steps_for
from zorefine.errors import ZorefineError
from zorefine.models.fingerprint import checkpoint_fingerprint
from zorefine.refine.curvature import CurvatureTracker
from zorefine.refine.divergence import Divergence, DivergenceGuard, roll_back
from zorefine.zo.replay import header_entries
from zorefine.refine.objective import step_objective
from zorefine.refine.resume import resume_records
from zorefine.refine.selection import selection_for_method
from zorefine.refine.targets import TrainingPairs
from zorefine.run import SENSITIVITY_FILE, TRAJECTORY_FILE, Run
from zorefine.zo.engine import ZOEngine, step_seed
from zorefine.zo.schedule import scheduled
from zorefine.zo.prefix_cache import PrefixCache
from zorefine.zo.trajectory import TrajectoryWriter, environment

log = logging.getLogger(__name__)


# Keeps the stream that picks units apart from the one that draws directions.
_UNIT_SEED_OFFSET = 104729


def analyzer_curvature(run: Run) -> dict[str, float]:
    """The analyze stage's ZO-curvature per unit, when this run has one (the tracker's prior)."""
    path = run.run_dir / SENSITIVITY_FILE
    if not path.is_file():
        return {}
    curvature = (json.loads(path.read_text()).get("curvature") or {}).get("units", {})
    return {unit: value["mean"] for unit, value in curvature.items() if value.get("mean") is not None}


def _observe(tracker: CurvatureTracker, record) -> None:
    if record.unit is not None and not record.skipped and record.loss_clean is not None:
        tracker.observe(record.unit, record.loss_plus, record.loss_minus, record.loss_clean, record.eps)


def _per_step(total: float, steps: int) -> float | None:
    return round(total / steps, 6) if steps else None


def refine_zeroth_order(run: Run, model, tokenizer, pairs: TrainingPairs) -> dict[str, Any]:
    """ZO refinement of the method's selection, logged step by step (a killed run resumes)."""
    cfg = run.cfg.refine
    steps = steps_for(cfg)
    checkpoint = run.aligned_checkpoint
    selection = selection_for_method(run, model)
    layers, params = selection.layers, selection.resolve(model)
    unit_parameters = {unit.name: list(unit.params) for unit in selection.unit_objects(model)}
    tracker = None
    if cfg.unit_schedule == "curvature":
        tracker = CurvatureTracker(list(unit_parameters), prior=analyzer_curvature(run))
    refine_cfg = OmegaConf.to_container(cfg, resolve=True)
    entries = selection.entry_indices()
    engine = ZOEngine(params, settings=zo_settings(refine_cfg), entries=entries)
    # Layers below the first selected one are never perturbed: their output can be cached
    # (not with ZeRO-3, whose own hooks gather each layer's weights as it runs).
    partitioned = any(is_partitioned(p) for p in params.values())
    cache = PrefixCache(model, min(layers), keep_all=False) if cfg.prefix_cache and not partitioned else None
    header = {
        "base_checkpoint": str(checkpoint),
        # The path alone would let a re-aligned model (same folder, new weights) replay old steps.
        "base_files": checkpoint_fingerprint(checkpoint),
        "layers": layers,
        "units": selection.units,
        "parameters": list(params),
        # Replay loads the base in this dtype: bf16 arithmetic is what makes a bf16 run's weights.
        "dtype": run.cfg.model.dtype,
        "unit_parameters": unit_parameters,
        # A unit set: replay reads the same entries from the same (unchanged) file.
        **({"entries": {"file": selection.entries_file, "set": selection.entries_set, "digest": selection.entries_digest}} if entries else {}),
        "refine": refine_cfg,
        "environment": environment(),
    }
    log_path = run.run_dir / TRAJECTORY_FILE
    records = resume_records(engine, log_path, header, steps)
    # Every process has read the log before the main process rewrites its tail.
    run.processes.barrier()
    if tracker is not None:
        for record in records:
            _observe(tracker, record)
    # Whole copies only: a ZeRO-3 partition's RMS is not the tensor's (the loss check still runs).
    # θ as the engine holds it: a step leaves its update for the next one to write. Reading it
    # applies that update to θ early (one pass), so refine keeps only the saved weight write of
    # the deferred update, not the saved read of θ (bench/zo_step.py's defer_gain has no guard).
    guard = DivergenceGuard({} if partitioned else engine.weights(), cfg.divergence_loss_factor, cfg.divergence_weight_factor)
    guard.prime(records)
    diverged: Divergence | None = None
    sample = batch_sampler(run, pairs)
    resumed_steps, loop_started, sent_before = len(records), time.perf_counter(), run.processes.bytes_communicated
    progress = tqdm(range(len(records), steps), desc="refine", initial=len(records), total=steps, disable=not run.processes.is_main)
    # Every process takes the same steps; the log is written once.
    try:
        with TrajectoryWriter(log_path, header, len(records), enabled=run.processes.is_main) as writer:
            for step in progress:
                loss_fn = step_objective(run, model, tokenizer, sample(step), step, cache)
                lr = scheduled(cfg.lr, step, steps, cfg.lr_schedule)
                eps = scheduled(cfg.zo.eps, step, steps, cfg.eps_schedule, final_fraction=0.1)
                unit = tracker.choose(step_seed(cfg.seed + _UNIT_SEED_OFFSET, step)) if tracker is not None else None
                names = unit_parameters[unit] if unit is not None else None
                record = engine.step(
                    step, step_seed(cfg.seed, step), lr, loss_fn, eps=eps, names=names, evaluate_clean=unit is not None, settle=False
                )
                record.unit = unit
                if tracker is not None:
                    _observe(tracker, record)
                writer.append(record)
                records.append(record)
                progress.set_postfix(loss=f"{record.loss:.4f}", g=f"{record.projected_grad:+.3f}")
                diverged = diverged or guard.observe(record)
                if diverged is not None and cfg.on_divergence == "stop":
                    break
    finally:
        # The model leaves refine at θ (also when interrupted): the last update may be pending.
        engine.restore()
    if diverged is not None:
        records = handle_divergence(run, diverged, params, header, records, log_path)
    losses = [r.loss for r in records if not r.skipped]
    return {
        "layers": layers,
        "units": selection.units,
        "num_parameters": engine.num_parameters,
        "steps": len(records),
        "skipped_steps": sum(r.skipped for r in records),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "trajectory": str(log_path),
        # What this run's own steps cost (replayed steps excluded): time, and what each
        # process sent to the others (two float64 sums per forward pass when distributed).
        "step_seconds": _per_step(time.perf_counter() - loop_started, len(records) - resumed_steps),
        "processes": run.processes.world_size,
        "bytes_sent_per_step": _per_step(run.processes.bytes_communicated - sent_before, len(records) - resumed_steps),
        **({"curvature": tracker.as_dict(), "reranked": tracker.ranking()} if tracker is not None else {}),
        **({"diverged": asdict(diverged)} if diverged is not None else {}),
    }


def handle_divergence(run: Run, diverged: Divergence, params, header: dict[str, Any], records: list, log_path) -> list:
    """Say so; under ``on_divergence=stop`` rebuild the last good weights and cut the log to them."""
    cfg = run.cfg.refine
    if cfg.on_divergence == "continue":
        log.warning("[refine] diverged at step %d (%s); continuing (refine.on_divergence=continue)", diverged.step, diverged.reason)
        return records
    if any(is_partitioned(p) for p in params.values()):
        raise ZorefineError(
            f"refine diverged at step {diverged.step} ({diverged.reason}); ZeRO-3 partitions cannot be rolled back: "
            "rerun with a smaller refine.lr"
        )
    kept = records[: diverged.kept_steps]
    base, _ = run.load_model(run.aligned_checkpoint)
    start_values = {name: param for name, param in base.named_parameters() if name in params}
    roll_back(params, start_values, zo_settings(header["refine"]), kept, header.get("unit_parameters"), header_entries(header))
    del base, start_values
    with TrajectoryWriter(log_path, header, len(kept), enabled=run.processes.is_main):
        pass  # cuts the log to the kept steps, so a resume or a replay rebuilds these weights
    log.error(
        "[refine] diverged at step %d (%s): stopped, kept the weights after %d steps (set refine.on_divergence=continue to go on)",
        diverged.step, diverged.reason, len(kept),
    )
    return kept
