"""evaluate: refusal and utility under a threat grid, before vs after refinement."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from zorefine.judge import build_judge
from zorefine.models.loading import write_json_atomic
from zorefine.pipeline import Run
from zorefine.report import plot_robustness, write_report
from zorefine.robustness import (
    EvalSets,
    as_dicts,
    break_sigma,
    evaluate_grid,
    robustness_curve_area,
    subsample,
    summarize,
    threat_grid,
)
from zorefine.trajectory import environment

log = logging.getLogger(__name__)


def models_to_evaluate(run: Run) -> dict[str, Path]:
    """``after`` and ``before`` when refine ran in this run; else the one current checkpoint."""
    refined = run.refined_checkpoint
    if refined is not None:
        return {"before": run.aligned_checkpoint, "after": refined}
    return {"model": run.aligned_checkpoint}


def eval_sets(run: Run) -> EvalSets:
    """Held-out test prompts (never trained on), subsampled to ``evaluate.max_prompts`` each."""
    limit = run.cfg.evaluate.max_prompts
    harmful = [(e.prompt, e.response) for e in run.split("test", "harmful")]
    benign = [(e.prompt, e.response) for e in run.split("test", "benign")]
    return EvalSets(
        harmful=subsample(harmful, limit, run.cfg.seed),
        benign=subsample(benign, limit, run.cfg.seed),
        overrefusal=subsample(run.overrefusal_prompts, limit, run.cfg.seed),
    )


def evaluate_checkpoint(run: Run, checkpoint: Path, sets: EvalSets, name: str) -> dict[str, Any]:
    """Every metric of one checkpoint under the configured grid, with break points."""
    cfg = run.cfg.evaluate
    model, tokenizer = run.load_model(checkpoint)
    grid = threat_grid(cfg.sigmas, cfg.seeds, cfg.quantization)
    results = evaluate_grid(
        model, tokenizer, sets, build_judge(cfg.judge), grid, cfg.max_new_tokens, cfg.batch_size,
        run.cfg.data.max_length, desc=f"evaluate {name}",
    )
    summary = summarize(results)
    refusal_sigma = break_sigma(summary, "harmful_refusal_rate", cfg.break_fraction)
    benign_sigma = break_sigma(summary, "benign_helpful_rate", cfg.break_fraction)
    safety_first = refusal_sigma is not None and (benign_sigma is None or refusal_sigma <= benign_sigma)
    return {
        "checkpoint": str(checkpoint),
        "summary": summary,
        "conditions": [{k: v for k, v in row.items() if k != "samples"} for row in as_dicts(results)],
        "samples": results[0].samples,
        "breaks": {
            "fraction": cfg.break_fraction,
            "refusal_sigma": refusal_sigma,
            "benign_sigma": benign_sigma,
            "safety_first_or_together": safety_first,
        },
        "refusal_curve_area": robustness_curve_area(summary),
    }


def run(run: Run) -> dict[str, Any]:
    """Write ``metrics.json``, ``report.md`` and ``robustness.png``."""
    started = time.perf_counter()
    sets = eval_sets(run)
    models = {name: evaluate_checkpoint(run, path, sets, name) for name, path in models_to_evaluate(run).items()}
    for name, result in models.items():
        clean = result["summary"]["clean"]
        log.info(
            "[evaluate] %s: clean refusal %.3f (harmful), %.3f (benign); refusal breaks at %s, benign at %s",
            name, clean["harmful_refusal_rate"]["mean"], clean["benign_refusal_rate"]["mean"],
            result["breaks"]["refusal_sigma"], result["breaks"]["benign_sigma"],
        )
    metrics = {
        "models": models,
        "num_prompts": {"harmful": len(sets.harmful), "benign": len(sets.benign), "overrefusal": len(sets.overrefusal)},
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        "environment": environment(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    metrics_path = run.run_dir / "metrics.json"
    write_json_atomic(metrics_path, metrics)
    report_path = run.run_dir / "report.md"
    header = {
        "run directory": str(run.run_dir),
        "held-out prompts": metrics["num_prompts"],
        "threat grid": f"relative weight noise σ ∈ {list(run.cfg.evaluate.sigmas)} × {run.cfg.evaluate.seeds} seeds; "
        f"{', '.join(run.cfg.evaluate.quantization) or 'no quantization'}",
        "judge": run.cfg.evaluate.judge,
    }
    if "refine" in run.summaries:
        refine = run.summaries["refine"]
        header["refinement"] = f"{refine['steps']} ZO steps on layers {refine['layers']} ({refine['num_parameters']:,} parameters)"
    write_report(report_path, models, header)
    plot_robustness(run.run_dir / "robustness.png", models)
    return {
        "metrics": str(metrics_path),
        "report": str(report_path),
        "clean_refusal": {n: m["summary"]["clean"]["harmful_refusal_rate"]["mean"] for n, m in models.items()},
        "seconds": metrics["seconds"],
    }
