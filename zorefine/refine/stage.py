"""refine: MeZO-style zeroth-order refinement of the selected layers, forward passes only."""

from __future__ import annotations

import logging
import time
from typing import Any

from zorefine.distributed.partitions import gathered, partition_model
from zorefine.errors import ConfigError
from zorefine.refine.batches import refinement_pairs
from zorefine.refine.budget import analysis_forward_passes, step_cost
from zorefine.refine.first_order import FIRST_ORDER_METHODS
from zorefine.refine.first_order_loop import refine_first_order
from zorefine.refine.zeroth_order import refine_zeroth_order
from zorefine.run import REFINED_DIR, Run

log = logging.getLogger(__name__)


def check_processes(run: Run) -> None:
    """Under a launcher: a ZO batch must cover every process; first-order baselines are not split."""
    processes, method, batch_size = run.processes, run.cfg.refine.method, run.cfg.refine.batch_size
    if processes.distributed and method not in FIRST_ORDER_METHODS and batch_size < processes.world_size:
        raise ConfigError(
            f"refine.batch_size={batch_size} is smaller than the {processes.world_size} processes "
            "sharing each step's batch: raise it to at least the number of processes"
        )
    if processes.distributed and method in FIRST_ORDER_METHODS:
        log.warning("[refine] %s is not split across processes: each of the %d runs the whole batch", method, processes.world_size)


def run(run: Run) -> dict[str, Any]:
    """Refine with ``refine.method`` and write the refined checkpoint.

    ZO methods append each step to ``trajectory.jsonl`` (and resume from it); first-order
    baselines train every parameter by backprop on the same per-step batches.
    """
    started = time.perf_counter()
    checkpoint = run.aligned_checkpoint
    method = run.cfg.refine.method
    check_processes(run)
    model, tokenizer = run.load_model(checkpoint)
    # Self targets are decoded from the whole model, before ZeRO-3 splits it.
    pairs = refinement_pairs(run, model, tokenizer)
    if run.cfg.refine.deepspeed and method not in FIRST_ORDER_METHODS:
        model = partition_model(model, run.cfg.refine.deepspeed)
    refine = refine_first_order if method in FIRST_ORDER_METHODS else refine_zeroth_order
    summary = refine(run, model, tokenizer, pairs)
    out_dir = run.run_dir / REFINED_DIR
    info = {"stage": "refine", "method": method, "base": str(checkpoint), "layers": summary["layers"]}
    with gathered(model):
        run.save_checkpoint(model, tokenizer, out_dir, info)
    forward_passes = step_cost(run.cfg.refine) * summary["steps"]
    analysis = analysis_forward_passes(run)
    return {
        "method": method,
        "checkpoint": str(out_dir),
        "base": str(checkpoint),
        **summary,
        "forward_passes": forward_passes,
        # Self targets cost greedy decoding once, before the first step (batched decode calls).
        "target_decode_calls": pairs.generation_forward_passes,
        # Everything this method spent: its steps, the analysis its selection came from, the decoding.
        "analysis_forward_passes": analysis,
        "total_forward_passes": forward_passes + analysis + pairs.generation_forward_passes,
        "seconds": round(time.perf_counter() - started, 1),
    }
