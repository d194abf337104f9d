"""Benchmark: the analyzer's cost against the number of layers, and how stable its ranking is.

Prints one JSON object:

- ``stability/<score>``: Spearman correlation between the layer rankings of two analyses of the
  built-in aligned model at the default budget (default ``analyze`` config) that differ only in
  their noise seeds; ``<score>`` is safety_loss_rise, refusal_drop, utility_loss_rise, curvature;
- ``curvature_vs_weight_noise``: Spearman between the ZO-curvature ranking and the direct
  weight-noise ranking (safety-loss rise), for each seed set;
- ``cost/<n>_layers/seconds`` and ``forward_passes`` for random models of the built-in width with
  n layers; ``cost/forward_passes_linearity``: forward passes per layer at the most layers ÷ at
  the fewest (1.0 = exactly linear in the number of layers). Wall time grows faster than the
  count, because each forward pass itself costs more in a deeper model.

Usage: ``python bench/analyze_cost.py --checkpoint RUN/checkpoints/aligned`` (an aligned built-in
model, e.g. from ``zorefine``'s default run); without ``--checkpoint`` the align stage is run
first into a temporary directory (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from transformers import LlamaConfig, LlamaForCausalLM

from zorefine.config import register_configs
from zorefine.judge import build_judge
from zorefine.pipeline import run_pipeline
from zorefine.run import Run
from zorefine.analyze.curvature import zo_curvature
from zorefine.analyze.ranking import unit_scores
from zorefine.analyze.sensitivity import ThreatFamily, unit_sensitivity
from zorefine.stats import spearman
from zorefine.analyze.stage import probe_for
from zorefine.models.units import discover_units

SCORES = ("safety_loss_rise", "refusal_drop", "utility_loss_rise")


def _config(overrides: list[str]):
    register_configs()
    with initialize_config_module(config_module="zorefine.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _aligned_checkpoint(workdir: Path) -> Path:
    cfg = _config(["stages=[align]"])
    run = Run(cfg, workdir)
    run_pipeline(run)
    return run.aligned_checkpoint


def _analysis(run: Run, model, tokenizer, seeds: list[int]):
    cfg = run.cfg.analyze
    units = discover_units(model, cfg.granularity)
    judge = build_judge(run.cfg.evaluate.judge) if cfg.measure_refusal else None
    families = [ThreatFamily(spec) for spec in cfg.threats]
    probe = probe_for(run)
    analysis = unit_sensitivity(model, tokenizer, units, families, seeds, probe, judge, cfg.antithetic, show_progress=False)
    analysis.curvature, _ = zo_curvature(model, tokenizer, units, seeds, probe, cfg.curvature_eps, show_progress=False)
    return analysis


def stability(checkpoint: Path, overrides: list[str]) -> dict[str, float]:
    """Spearman between two analyses with disjoint seeds, per score; and curvature vs noise."""
    run = Run(_config([f"model.path={checkpoint}", *overrides]), Path(tempfile.mkdtemp()))
    model, tokenizer = run.load_model(checkpoint)
    seeds = run.cfg.analyze.seeds
    first = _analysis(run, model, tokenizer, list(range(seeds)))
    second = _analysis(run, model, tokenizer, list(range(1000, 1000 + seeds)))
    results: dict[str, float] = {}
    for score in SCORES:
        by_score = [{s.unit: s.mean(score) for s in a.scores} for a in (first, second)]
        results[f"stability/{score}"] = spearman(*by_score)
    results["stability/curvature"] = spearman(unit_scores(first, "curvature"), unit_scores(second, "curvature"))
    for tag, analysis in (("seeds_a", first), ("seeds_b", second)):
        results[f"curvature_vs_weight_noise/{tag}"] = spearman(
            unit_scores(analysis, "curvature"), unit_scores(analysis, "safety_loss_rise")
        )
    results["analysis/forward_passes"] = first.forward_passes
    return results


def cost_against_layers(checkpoint: Path, layer_counts: list[int]) -> dict[str, float]:
    """Seconds and forward passes of one default analysis on random models of growing depth."""
    run = Run(_config([f"model.path={checkpoint}"]), Path(tempfile.mkdtemp()))
    reference, tokenizer = run.load_model(checkpoint)
    results: dict[str, float] = {}
    passes_per_layer = []
    for count in layer_counts:
        config = LlamaConfig(**{**reference.config.to_dict(), "num_hidden_layers": count})
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        started = time.perf_counter()
        analysis = _analysis(run, model, tokenizer, list(range(run.cfg.analyze.seeds)))
        seconds = time.perf_counter() - started
        results[f"cost/{count}_layers/seconds"] = seconds
        results[f"cost/{count}_layers/forward_passes"] = analysis.forward_passes
        passes_per_layer.append(analysis.forward_passes / count)
    results["cost/forward_passes_linearity"] = passes_per_layer[-1] / passes_per_layer[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="an aligned built-in checkpoint directory")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--override", action="append", default=[], help="a config override for the stability runs, e.g. analyze.antithetic=false")
    parser.add_argument("--skip-cost", action="store_true", help="only the stability part")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    checkpoint = args.checkpoint or _aligned_checkpoint(Path(tempfile.mkdtemp()))
    report: dict[str, object] = {"checkpoint": str(checkpoint), "overrides": args.override}
    report.update(stability(checkpoint, args.override))
    if not args.skip_cost:
        report.update(cost_against_layers(checkpoint, args.layers))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}, indent=2))


if __name__ == "__main__":
    main()
