"""The refinement budget: forward-pass equivalents per step of each method, and the steps a budget buys."""

from __future__ import annotations

import json
from pathlib import Path

from zorefine.refine.first_order import FIRST_ORDER_METHODS, FORWARD_COST
from zorefine.zo.engine import step_cost as engine_step_cost
from zorefine.run import MASKS_FILE, SENSITIVITY_FILE, UNITS_FILE, Run


def _zo_step_cost(cfg) -> int:
    """Forward passes of one ZO step: 2 per direction (+1 for L(θ) under the curvature schedule)."""
    forwards, _ = engine_step_cost(cfg.zo.num_directions, evaluate_clean=cfg.unit_schedule == "curvature")
    return forwards * cfg.grad_accum


def step_cost(cfg) -> int:
    """Forward-pass equivalents one step of ``cfg.method`` spends (a backward counts as two)."""
    if cfg.method in FIRST_ORDER_METHODS:
        return FORWARD_COST[cfg.method] * cfg.grad_accum
    return _zo_step_cost(cfg)


def _units_analysis_passes(run: Run) -> int:
    """Forward-pass equivalents of the attribution behind ``refine.units_file`` (a backward is two).

    The ablation and freezing tables the unit analysis also writes validate the sets; the
    selection does not need them, so they are not charged (they are in ``units.json``).
    """
    cfg = run.cfg.refine
    masks = run.run_dir / MASKS_FILE if cfg.units_file == "analyze" else Path(cfg.units_file)
    report = masks.parent / UNITS_FILE
    if not report.is_file():
        return 0
    attribution = (json.loads(report.read_text()).get("cost") or {}).get("attribution") or {}
    return int(attribution.get("forward", 0)) + 2 * int(attribution.get("backward", 0))


def analysis_forward_passes(run: Run) -> int:
    """What the analysis behind this run's selection cost, when the method uses it.

    A unit set (``refine.units_file``, any method) costs its attribution; the analyzer's layer
    ranking is charged to ``zo``. Explicit ``refine.layers`` and the controls (``zo_random`` uses
    only the selection's size, ``zo_full`` and first-order methods on every parameter none)
    spend no analysis.
    """
    cfg = run.cfg.refine
    if cfg.units_file is not None:
        return _units_analysis_passes(run)
    if cfg.method != "zo" or cfg.layers is not None:
        return 0
    source = Path(cfg.selection_file).parent if cfg.selection_file else run.run_dir
    report = source / SENSITIVITY_FILE
    if not report.is_file():
        return 0
    return int((json.loads(report.read_text()).get("cost") or {}).get("forward_passes", 0))


def steps_for(cfg) -> int:
    """Steps of ``cfg.method`` within the budget: ``refine.budget`` forward passes, else what
    ``refine.steps`` ZO steps of this configuration would spend (so baselines match ZO's cost)."""
    budget = cfg.budget if cfg.budget is not None else cfg.steps * _zo_step_cost(cfg)
    return budget // step_cost(cfg)
