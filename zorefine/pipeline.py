"""The pipeline: the configured stages in order, each skipped only when its recorded result is current.

A stage is skipped on resume when its done-marker records the same identity (config fields,
input checkpoints and data, zorefine version; see :mod:`zorefine.stage_identity`) and its
outputs are still there. Otherwise it runs again, and so does every stage after it.
``resume=strict`` stops instead of re-running a stage whose settings changed; ``resume=false``
runs every requested stage afresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from zorefine.config.schema import STAGE_ORDER, Stage
from zorefine.config.validate import analyze_needed, resume_mode
from zorefine.errors import ConfigError
from zorefine.run import Run
from zorefine.stage_identity import identity_changes, missing_outputs, stage_identity

log = logging.getLogger(__name__)

StageFn = Callable[[Run], dict[str, Any]]


def stage_functions() -> dict[Stage, StageFn]:
    """The entry function of each stage (imported lazily: each pulls in heavy modules)."""
    from zorefine.align import stage as align
    from zorefine.analyze import stage as analyze
    from zorefine.evaluate import stage as evaluate
    from zorefine.refine import stage as refine

    return {Stage.align: align.run, Stage.analyze: analyze.run, Stage.refine: refine.run, Stage.evaluate: evaluate.run}


def stale_reason(run: Run, stage: Stage, mode: str) -> str | None:
    """Why a finished stage must run again (None: its recorded result is current)."""
    summary = run.stage_summary(stage)
    missing = missing_outputs(run, stage, summary)
    if missing:
        return "its outputs are missing: " + ", ".join(missing)
    if stage is Stage.analyze and summary.get("skipped") and analyze_needed(run.cfg):
        return "it was skipped before, and this run's refine needs a selection"
    changes = identity_changes(summary.get("identity"), stage_identity(run, stage))
    if not changes:
        return None
    if mode == "strict":
        raise ConfigError(
            f"resume=strict: {stage.value} in {run.run_dir} was computed differently ({'; '.join(changes)}); "
            "use another hydra.run.dir, or resume=true to compute it again"
        )
    return "it was computed differently: " + "; ".join(changes)


def check_upstream(run: Run, requested: list[Stage]) -> None:
    """A finished stage that is not requested but feeds a requested one must still be current."""
    first = min(STAGE_ORDER.index(s.value) for s in requested)
    for name in STAGE_ORDER[:first]:
        stage = Stage(name)
        if stage in requested or not run.is_done(stage):
            continue
        changes = identity_changes(run.stage_summary(stage).get("identity"), stage_identity(run, stage))
        if changes:
            raise ConfigError(
                f"{stage.value} in {run.run_dir} was computed differently ({'; '.join(changes)}) and is not in stages: "
                f"add {stage.value} to stages to compute it again, or use another hydra.run.dir"
            )


def run_pipeline(cfg: DictConfig, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Run the configured stages in pipeline order, skipping the ones whose recorded result is current."""
    run = Run(cfg, Path(run_dir))
    mode = resume_mode(cfg.resume)
    requested = [Stage(name) for name in STAGE_ORDER if name in {Stage(s).value for s in cfg.stages}]
    run.preflight(requested)
    run.remove_stale_staging()
    if mode != "false":
        check_upstream(run, requested)
    functions = stage_functions()
    earlier_ran = False
    for stage in requested:
        reason = "resume=false" if mode == "false" else "it has not run yet"
        if mode != "false" and run.is_done(stage):
            reason = "an earlier stage ran again" if earlier_ran else stale_reason(run, stage, mode)
            reason = run.processes.broadcast(reason)
            if reason is None:
                log.info("[%s] already done in %s with the same settings and inputs, skipping", stage.value, run.run_dir)
                continue
            log.warning("[%s] running again: %s", stage.value, reason)
        run.forget(stage)
        log.info("[%s] starting", stage.value)
        identity = stage_identity(run, stage)
        run.finish(stage, {**functions[stage](run), "identity": identity})
        earlier_ran = True
        log.info("[%s] done", stage.value)
    return run.summaries
