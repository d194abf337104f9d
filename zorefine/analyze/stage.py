"""analyze: score every unit's fragility under the threats and choose the units to refine."""

from __future__ import annotations

import logging
import time
from typing import Any

from zorefine.analyze.curvature import zo_curvature
from zorefine.analyze.heatmap import plot_heatmap
from zorefine.analyze.ranking import as_rows, rank_units, unit_scores
from zorefine.analyze.unit_methods import run_unit_method
from zorefine.analyze.sensitivity import Analysis, Probe, ThreatFamily, unit_sensitivity
from zorefine.config.validate import analyze_needed
from zorefine.judge.registry import configured_judge
from zorefine.files import write_json_atomic
from zorefine.models.selection import Selection, SelectionPolicy, select_units
from zorefine.models.units import Unit, discover_units
from zorefine.run import SELECTION_FILE, SENSITIVITY_FILE, Run
from zorefine.stats import spearman
from zorefine.threats.streams import stream_seed

log = logging.getLogger(__name__)


def probe_for(run: Run) -> Probe:
    """The validation prompts the analysis measures on (harmful with refusals, benign with answers)."""
    cfg = run.cfg.analyze
    # Validation split: the ranking steers training decisions, so it must not see test prompts.
    harmful = run.split("val", "harmful", limit=cfg.num_prompts)
    benign = run.split("val", "benign", limit=cfg.num_benign) if cfg.num_benign else []
    return Probe(
        harmful=[(e.prompt, e.response) for e in harmful],
        benign=[(e.prompt, e.response) for e in benign],
        max_length=run.cfg.data.max_length,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
    )


def measure_units(run: Run, model, tokenizer, units: list[Unit], probe: Probe, seeds: list[int]) -> Analysis:
    """Every unit's fragility under every configured threat (and its ZO curvature), over ``seeds``."""
    cfg = run.cfg.analyze
    judge = configured_judge(run.cfg.evaluate.judge, run.cfg.evaluate.judge_path) if cfg.measure_refusal else None
    families = [ThreatFamily(spec) for spec in cfg.threats]
    analysis = unit_sensitivity(model, tokenizer, units, families, seeds, probe, judge, antithetic=cfg.antithetic)
    if cfg.curvature:
        analysis.curvature, passes = zo_curvature(model, tokenizer, units, seeds, probe, cfg.curvature_eps)
        analysis.curvature_eps = cfg.curvature_eps
        analysis.forward_passes += passes
    return analysis


def choose_units(run: Run, units: list[Unit], scores: dict[str, float], ranking: list[str]) -> Selection:
    """The units the policy picks from the ranking, written to ``selection.json``."""
    cfg = run.cfg.analyze
    policy = SelectionPolicy(cfg.policy, cfg.top_k, cfg.budget, cfg.threshold, list(cfg.names))
    chosen = select_units(ranking, scores, {u.name: u.num_parameters for u in units}, policy)
    by_name = {u.name: u for u in units}
    selection = Selection.of([by_name[name] for name in chosen], cfg.granularity, policy, cfg.rank_by)
    if run.processes.is_main:
        selection.save(run.run_dir / SELECTION_FILE)
    return selection


def write_sensitivity(run: Run, report: dict[str, Any], analysis: Analysis, chosen: list[str]) -> None:
    """``sensitivity.json`` and its heat map ``sensitivity.png`` (by the main process)."""
    if not run.processes.is_main:
        return
    write_json_atomic(run.run_dir / SENSITIVITY_FILE, report)
    metric = "refusal_drop" if run.cfg.analyze.rank_by == "refusal_drop" else "safety_loss_rise"
    plot_heatmap(analysis, metric, chosen, run.run_dir / "sensitivity.png")


def run(run: Run) -> dict[str, Any]:
    """Write ``sensitivity.json``, the heatmap ``sensitivity.png`` and ``selection.json``."""
    cfg = run.cfg.analyze
    method = run.cfg.refine.method
    if not analyze_needed(run.cfg):
        log.info("[analyze] skipped: refine.method=%s does not use a layer selection", method)
        return {"skipped": f"refine.method={method} uses no selection"}
    if cfg.method != "perturbation":
        return run_unit_method(run)
    started = time.perf_counter()
    checkpoint = run.aligned_checkpoint
    model, tokenizer = run.load_model(checkpoint)
    probe = probe_for(run)
    units = discover_units(model, cfg.granularity)
    # The analysis has its own noise stream: the draws it ranks units by are never evaluation draws.
    seeds = [stream_seed("analyze", run.cfg.seed * 1000 + s) for s in range(cfg.seeds)]
    analysis = measure_units(run, model, tokenizer, units, probe, seeds)
    scores = unit_scores(analysis, cfg.rank_by)
    ranking = rank_units(scores, [u.name for u in units])
    selection = choose_units(run, units, scores, ranking)
    chosen = selection.units
    agreement = None
    if analysis.curvature and cfg.rank_by != "curvature":
        agreement = spearman(scores, unit_scores(analysis, "curvature"))
    seconds = round(time.perf_counter() - started, 1)
    log.info("[analyze] ranking (most fragile first): %s", ranking)
    log.info("[analyze] selected %s (%s); cost %d forward passes, %.0f s", chosen, cfg.policy, analysis.forward_passes, seconds)
    if agreement is not None:
        log.info("[analyze] Spearman(%s, curvature) = %.3f", cfg.rank_by, agreement)
    report = {
        "checkpoint": str(checkpoint),
        "granularity": cfg.granularity,
        "threats": list(cfg.threats),
        "seeds": seeds,
        "antithetic": cfg.antithetic,
        "num_prompts": {"harmful": len(probe.harmful), "benign": len(probe.benign)},
        "clean": vars(analysis.clean),
        "scores": as_rows(analysis),
        "curvature": {"eps": analysis.curvature_eps, "units": analysis.curvature} if analysis.curvature else None,
        "rank_by": cfg.rank_by,
        "unit_scores": scores,
        "ranking": ranking,
        "spearman_with_curvature": agreement,
        "selected": chosen,
        "selected_layers": selection.layers,
        "cost": {"forward_passes": analysis.forward_passes, "seconds": seconds},
    }
    write_sensitivity(run, report, analysis, chosen)
    return {
        "checkpoint": str(checkpoint),
        "ranking": ranking,
        "selected": chosen,
        "selected_layers": selection.layers,
        "forward_passes": analysis.forward_passes,
        "sensitivity": str(run.run_dir / SENSITIVITY_FILE),
        "seconds": seconds,
    }
