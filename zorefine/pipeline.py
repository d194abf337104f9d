"""The pipeline: the configured stages in order, each skipped when the run has it done already."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from zorefine.config import STAGE_ORDER, Stage
from zorefine.run import Run

log = logging.getLogger(__name__)

StageFn = Callable[[Run], dict[str, Any]]


def stage_functions() -> dict[Stage, StageFn]:
    """The entry function of each stage (imported lazily: each pulls in heavy modules)."""
    from zorefine.align import stage as align
    from zorefine.analyze import stage as analyze
    from zorefine.evaluate import stage as evaluate
    from zorefine.refine import stage as refine

    return {Stage.align: align.run, Stage.analyze: analyze.run, Stage.refine: refine.run, Stage.evaluate: evaluate.run}


def run_pipeline(cfg: DictConfig, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Run the configured stages in pipeline order, skipping finished ones when resuming."""
    run = Run(cfg, Path(run_dir))
    requested = {Stage(s) for s in cfg.stages}
    if not cfg.resume:
        for stage in requested:
            run.marker(stage).unlink(missing_ok=True)
    run.preflight()
    functions = stage_functions()
    for name in STAGE_ORDER:
        stage = Stage(name)
        if stage not in requested:
            continue
        if run.is_done(stage):
            log.info("[%s] already done in %s, skipping (resume=true)", name, run.run_dir)
            run.summaries[name] = json.loads(run.marker(stage).read_text())
            continue
        log.info("[%s] starting", name)
        run.finish(stage, functions[stage](run))
        log.info("[%s] done", name)
    return run.summaries
