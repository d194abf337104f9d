"""The refinement budget: forward-pass equivalents per step of each method, and the steps a budget buys."""

from __future__ import annotations

import json
from pathlib import Path

from zorefine.refine.first_order import FIRST_ORDER_METHODS, FORWARD_COST
from zorefine.run import SENSITIVITY_FILE, Run


def _zo_step_cost(cfg) -> int:
    """Forward passes of one ZO step: 2 per direction (+1 for L(θ) under the curvature schedule)."""
    return (2 * cfg.zo.num_directions + (cfg.unit_schedule == "curvature")) * cfg.grad_accum


def step_cost(cfg) -> int:
    """Forward-pass equivalents one step of ``cfg.method`` spends (a backward counts as two)."""
    if cfg.method in FIRST_ORDER_METHODS:
        return FORWARD_COST[cfg.method] * cfg.grad_accum
    return _zo_step_cost(cfg)


def analysis_forward_passes(run: Run) -> int:
    """What the analysis behind this run's selection cost, when the method uses its ranking (``zo``).

    Explicit ``refine.layers`` and the controls (``zo_random`` uses only the selection's size,
    ``zo_full`` and first-order methods none) spend no analysis.
    """
    cfg = run.cfg.refine
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
