"""Tests that fail if the science stops working: the analyzer finds a planted fragile layer, and
refinement lowers its threat-aware objective and makes the model more robust than no refinement."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import make_cfg, save_micro_checkpoint
from zorefine.analyze import stage as analyze
from zorefine.pipeline import run_pipeline
from zorefine.refine import stage as refine
from zorefine.run import Run

FRAGILE = 1


def _plant_fragile_layer(directory: Path, layer: int, factor: float) -> Path:
    """Scale one layer's output projections: relative noise on it then moves the residual stream
    ``factor`` times more than the same relative noise on any other layer."""
    weights = load_file(str(directory / "model.safetensors"))
    for name in list(weights):
        if f"layers.{layer}." in name and name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = weights[name] * factor
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def aligned_micro(tmp_path_factory, micro_tokenizer) -> Path:
    """A micro Llama aligned long enough on the tiny data that noise on its weights matters."""
    root = tmp_path_factory.mktemp("science")
    start = save_micro_checkpoint("llama", micro_tokenizer, root / "start")
    run_pipeline(make_cfg(start, stages="[align]", **{"align.epochs": 40, "align.lr": 1e-2}), root / "align")
    return root / "align" / "checkpoints" / "aligned"


@pytest.mark.parametrize("granularity", ["layer", "module", "tensor"])
def test_the_analyzer_ranks_a_planted_fragile_layer_first(aligned_micro, tmp_path, granularity):
    import shutil

    planted = _plant_fragile_layer(Path(shutil.copytree(aligned_micro, tmp_path / "planted")), FRAGILE, 6.0)
    cfg = make_cfg(planted, stages="[analyze]", **{
        "analyze.granularity": granularity, "analyze.threats": "[wnoise:0.3]", "analyze.seeds": 2,
        "analyze.measure_refusal": False, "analyze.curvature": False, "analyze.num_prompts": 8,
    })
    summary = analyze.run(Run(cfg, tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "sensitivity.json").read_text())
    top = summary["ranking"][0]
    assert f"layers.{FRAGILE}" in top and summary["selected_layers"] == [FRAGILE], (top, report["unit_scores"])


def test_refinement_lowers_its_threat_aware_objective_and_the_loss_under_noise(aligned_micro, tmp_path):
    overrides = {
        "refine.method": "zo_full", "refine.objective_threat": "wnoise:0.3", "refine.targets": "reference",
        "refine.steps": 150, "refine.lr": 0.05, "refine.batch_size": 8,
        "evaluate.sigmas": "[0.3]", "evaluate.seeds": 3, "evaluate.max_prompts": 8, "evaluate.quantization": "[]",
    }
    summaries = run_pipeline(make_cfg(aligned_micro, stages="[refine,evaluate]", **overrides), tmp_path)
    steps = [json.loads(line) for line in (tmp_path / "trajectory.jsonl").read_text().splitlines()[1:]]
    losses = [0.5 * (s["loss_plus"] + s["loss_minus"]) for s in steps]
    assert statistics.fmean(losses[-20:]) < statistics.fmean(losses[:20]) - 0.1
    assert "diverged" not in summaries["refine"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    before, after = (metrics["models"][k]["summary"]["wnoise σ=0.3"]["safety_loss"]["mean"] for k in ("before", "after"))
    # Held-out refusals under fresh noise draws (the test stream): more likely after refinement.
    assert after < before - 0.02, (before, after)


def test_zo_lowers_the_loss_of_the_w4a4_model_directly(aligned_micro, tmp_path):
    # Rounding has no useful gradient; ZO needs none: it reads the quantized model's loss.
    overrides = {
        "refine.method": "zo_full", "refine.objective_threat": "w4a4:g16", "refine.targets": "reference",
        "refine.steps": 100, "refine.lr": 0.05, "refine.batch_size": 8,
    }
    refine.run(Run(make_cfg(aligned_micro, stages="[refine]", **overrides), tmp_path))
    steps = [json.loads(line) for line in (tmp_path / "trajectory.jsonl").read_text().splitlines()[1:]]
    losses = [0.5 * (s["loss_plus"] + s["loss_minus"]) for s in steps]
    assert statistics.fmean(losses[-20:]) < statistics.fmean(losses[:20]) - 0.1
