"""Resuming ZO refinement: a logged trajectory is replayed when it belongs to the same refinement."""

from __future__ import annotations

import logging
from typing import Any

from zorefine.zo.engine import ZOEngine
from zorefine.zo.replay import apply_records
from zorefine.zo.trajectory import read_trajectory

log = logging.getLogger(__name__)


# Refine settings that change how a step is computed, not its result.
HOW_NOT_WHAT = ("steps", "budget", "log_every", "prefix_cache", "store", "deepspeed", "targets_cache_dir")


def trajectory_settings(header: dict[str, Any]) -> dict[str, Any]:
    """The refine settings of a trajectory header that decide what its steps compute.

    Settings that change how, not what, is computed (prefix cache, weight store, ZeRO
    partitioning, the step count) are left out, at the top of ``refine`` and in ``refine.zo``.
    """
    refine = header.get("refine", {})
    scheduled = any(refine.get(key, "constant") != "constant" for key in ("lr_schedule", "eps_schedule"))
    # A schedule spreads over the total steps: then the step count decides each step's lr and ε.
    ignored = set(HOW_NOT_WHAT) - ({"steps", "budget"} if scheduled else set())
    kept = {k: v for k, v in refine.items() if k not in ignored}
    if isinstance(kept.get("zo"), dict):
        kept["zo"] = {k: v for k, v in kept["zo"].items() if k not in ignored}
    return kept


def _same_trajectory(previous: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a logged run can be continued: same start, parameters and settings but the step count."""

    def version(header: dict[str, Any]) -> int:
        return header.get("environment", {}).get("directions_version", 1)

    return (
        previous.get("base_checkpoint") == current["base_checkpoint"]
        and previous.get("base_files") == current.get("base_files")
        and previous.get("parameters") == current["parameters"]
        and previous.get("dtype", "float32") == current.get("dtype", "float32")
        and trajectory_settings(previous) == trajectory_settings(current)
        and version(previous) == version(current)
    )


def _length(header: dict[str, Any]) -> tuple[Any, Any]:
    """What decides a run's step count: ``(refine.steps, refine.budget)``."""
    refine = header.get("refine", {})
    return refine.get("steps"), refine.get("budget")


def resume_records(engine: ZOEngine, log_path, header: dict[str, Any], max_steps: int) -> list:
    """Replay the steps a killed run logged (when its settings match) and return them."""
    previous_header, previous_steps = read_trajectory(log_path)
    if previous_header is not None and not _same_trajectory(previous_header, header):
        log.warning("[refine] %s belongs to another configuration; starting over", log_path)
        return []
    if len(previous_steps) > max_steps:
        log.warning("[refine] %s holds %d steps and this run asks for %d: keeping the first %d",
                    log_path, len(previous_steps), max_steps, max_steps)
    elif previous_header is not None and previous_steps and _length(previous_header) != _length(header):
        steps, budget = _length(previous_header)
        log.info("[refine] resuming %d logged steps of a run with steps=%s, budget=%s; this run takes %d steps",
                 len(previous_steps), steps, budget, max_steps)
    previous_steps = previous_steps[:max_steps]
    if previous_steps:
        apply_records(engine, previous_steps, header.get("unit_parameters"))
        log.info("[refine] resumed: replayed %d logged steps", len(previous_steps))
    return previous_steps
