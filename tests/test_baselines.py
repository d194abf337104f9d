"""Refine baselines: each method runs in the same harness and spends the same forward budget."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_cfg
from tests.tiny_models import tiny_model
from zorefine.config import validate
from zorefine.errors import ConfigError
from zorefine.refine.first_order import FirstOrderSettings, FirstOrderTrainer
from zorefine.run import Run
from zorefine.analyze import stage as analyze
from zorefine.refine import stage as refine
from zorefine.refine import selection as refine_selection
from zorefine.refine.budget import step_cost, steps_for


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _changed(base_dir, run_dir) -> set[str]:
    base, refined = _weights(base_dir), _weights(run_dir / "checkpoints" / "refined")
    return {k for k in base if not torch.equal(base[k], refined[k])}


def _llama_and_batch():
    """A tiny Llama, one 12-token batch, its parameters and a copy of their starting values."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    return model, torch.arange(12).unsqueeze(0), params, start


@pytest.mark.parametrize(
    "method, budget, expected_steps",
    [("zo", None, 6), ("zo_full", None, 6), ("sft", None, 4), ("rwp", None, 4), ("sam", None, 2), ("sam", 13, 2), ("zo", 13, 6)],
)
def test_every_method_gets_the_same_forward_budget(method, budget, expected_steps):
    cfg = make_cfg(None, **{"refine.method": method, "refine.steps": 6, "refine.budget": budget})
    assert steps_for(cfg.refine) == expected_steps
    # A step never costs more than the budget allows.
    assert steps_for(cfg.refine) * step_cost(cfg.refine) <= (budget if budget is not None else 12)


def test_budget_counts_directions_and_micro_batches():
    cfg = make_cfg(None, **{"refine.zo.num_directions": 2, "refine.grad_accum": 2, "refine.steps": 5})
    assert step_cost(cfg.refine) == 8 and steps_for(cfg.refine) == 5
    sft = make_cfg(None, **{"refine.method": "sft", "refine.zo.num_directions": 2, "refine.grad_accum": 2, "refine.steps": 5})
    assert step_cost(sft.refine) == 6 and steps_for(sft.refine) == 40 // 6


@pytest.mark.parametrize("method", ["sft", "sam", "rwp"])
def test_first_order_baselines_train_every_parameter_within_budget(micro_checkpoint, tmp_path, method):
    cfg = make_cfg(micro_checkpoint, **{"refine.method": method, "refine.fo_lr": 1e-2, "refine.steps": 3})
    summary = refine.run(Run(cfg, tmp_path))
    assert summary["method"] == method and summary["steps"] == steps_for(cfg.refine)
    assert summary["forward_passes"] <= 6  # what 3 ZO steps cost
    assert summary["skipped_steps"] == 0 and summary["last_loss"] is not None
    changed = _changed(micro_checkpoint, tmp_path)
    assert any(".0." in k for k in changed) and any(".2." in k for k in changed)  # first and last layer


def test_zo_full_refines_every_layer_and_needs_no_analysis(micro_checkpoint, tmp_path):
    cfg = make_cfg(micro_checkpoint, **{"refine.method": "zo_full", "refine.lr": 1e-2, "refine.steps": 2, "stages": "[analyze,refine]"})
    validate(cfg)  # no selection needed
    assert analyze.run(Run(cfg, tmp_path))["skipped"]
    summary = refine.run(Run(cfg, tmp_path))
    assert summary["layers"] == [0, 1, 2] and summary["forward_passes"] == 4
    assert {k.split(".")[2] for k in _changed(micro_checkpoint, tmp_path) if ".layers." in k or ".h." in k} == {"0", "1", "2"}


def test_zo_random_refines_as_many_units_as_the_analyzer_chose_but_others(micro_checkpoint, tmp_path):
    cfg = make_cfg(micro_checkpoint, **{"analyze.top_k": 1, "refine.lr": 1e-2})
    run = Run(cfg, tmp_path)
    analyze.run(run)
    chosen = json.loads((tmp_path / "selection.json").read_text())["units"]
    layers = set()
    for seed in range(6):
        random_cfg = make_cfg(micro_checkpoint, **{"analyze.top_k": 1, "refine.method": "zo_random", "refine.seed": seed})
        random_run = Run(random_cfg, tmp_path / f"random{seed}")
        (tmp_path / f"random{seed}" / "selection.json").write_text((tmp_path / "selection.json").read_text())
        model, _ = random_run.load_model(micro_checkpoint)
        selection = refine_selection.selection_for_method(random_run, model)
        assert len(selection.units) == len(chosen) and selection.rank_by == "random"
        layers.update(selection.layers)
    assert len(layers) > 1  # the seed, not the analyzer, decides


def test_unknown_method_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="refine.method must be one of"):
        validate(make_cfg(None, **{"refine.method": "adamw"}))


def test_sam_gradient_is_taken_at_the_ascent_point_and_weights_return():
    model, ids, params, start = _llama_and_batch()
    trainer = FirstOrderTrainer(model, params, FirstOrderSettings("sam", lr=0.0, sam_rho=0.5))

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    trainer.step(0, [loss])
    # lr=0: AdamW leaves the weights; the ascent move is undone up to rounding.
    for name, param in params.items():
        torch.testing.assert_close(param.detach(), start[name], rtol=0, atol=1e-6)
    trainer.release()
    assert all(not p.requires_grad for p in model.parameters())


def test_non_finite_first_order_step_changes_nothing():
    model, ids, params, start = _llama_and_batch()
    trainer = FirstOrderTrainer(model, params, FirstOrderSettings("sft", lr=1.0))
    result = trainer.step(0, [lambda: model(input_ids=ids, labels=ids).loss * float("nan")])
    assert result != result
    assert all(torch.equal(p, start[n]) for n, p in params.items())


def _quadratic(values: torch.Tensor, curvature: torch.Tensor):
    """A one-parameter model whose loss ½Σ c·θ² has the gradient c·θ: SAM's points are known."""
    model = torch.nn.Module()
    model.theta = torch.nn.Parameter(values.clone())
    return model, (lambda: 0.5 * (curvature * model.theta**2).sum())


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_sam_ascent_point_follows_its_radius_mode(mode):
    values, curvature, rho = torch.tensor([0.0, 1.0, -2.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 0.5]), 0.1
    model, loss = _quadratic(values, curvature)
    trainer = FirstOrderTrainer(model, dict(model.named_parameters()), FirstOrderSettings("sam", lr=0.0, sam_rho=rho, sam_rho_mode=mode))
    trainer._sam_gradient([loss])
    grad = curvature * values
    if mode == "absolute":
        move = rho * grad / grad.norm()
    else:
        # Adaptive SAM: the ball is stretched by |θ| entry-wise (an entry at zero does not move).
        move = rho * values.abs() ** 2 * grad / (values.abs() * grad).norm()
    torch.testing.assert_close(model.theta.grad, curvature * (values + move))


def test_threat_aware_first_order_takes_the_gradient_at_the_quantized_weights():
    model, ids, params, start = _llama_and_batch()

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    def grads_under(threat) -> dict[str, torch.Tensor]:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        from zorefine.threats import threatened

        with threatened(model, threat):
            loss().backward()
        out = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
        for p in params.values():
            p.grad = None
        return out

    at_quantized, at_clean = grads_under("rtn:int4"), grads_under([])
    trainer = FirstOrderTrainer(model, params, FirstOrderSettings("fo_threat", lr=1e-3, threat="rtn:int4"))
    trainer.step(0, [loss])
    trainer.release()
    name = "model.layers.0.mlp.down_proj.weight"
    moved = (params[name].detach() - start[name]).sign()
    # AdamW's first step moves every entry by -lr·sign(g): the sign is the quantized point's.
    significant = at_quantized[name].abs() > 1e-6
    assert torch.equal(moved[significant], -at_quantized[name].sign()[significant])
    assert not torch.equal(at_quantized[name].sign(), at_clean[name].sign())  # the threat mattered


def test_a_first_order_method_on_a_unit_set_moves_only_those_entries():
    model, ids, params, start = _llama_and_batch()
    name = "model.layers.1.mlp.down_proj.weight"
    mask = torch.zeros_like(params[name], dtype=torch.bool)
    mask[:, :3] = True  # three MLP neurons' output columns
    trainer = FirstOrderTrainer(model, params, FirstOrderSettings("sam", lr=1e-2), trainable={name: mask})
    trainer.step(0, [lambda: model(input_ids=ids, labels=ids).loss])
    trainer.release()
    changed = params[name].detach() != start[name]
    assert bool(changed[mask].all()) and not bool(changed[~mask].any())
    assert all(torch.equal(p, start[n]) for n, p in params.items() if n != name)
    with pytest.raises(ConfigError, match="weight decay"):
        FirstOrderTrainer(model, params, FirstOrderSettings("sft", weight_decay=0.1), trainable={name: mask})


def test_fo_threat_and_unit_sets_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="fo_threat trains under refine.objective_threat"):
        validate(make_cfg(None, **{"refine.method": "fo_threat"}))
    with pytest.raises(ConfigError, match="sam_rho_mode"):
        validate(make_cfg(None, **{"refine.sam_rho_mode": "scaled"}))
    with pytest.raises(ConfigError, match="chooses its own units"):
        validate(make_cfg(None, **{"refine.method": "zo_full", "refine.units_file": "analyze"}))


def test_fo_threat_refines_on_a_unit_set_and_charges_the_attribution(micro_checkpoint, tmp_path):
    from zorefine.models.param_masks import save_masks
    from zorefine.refine.budget import analysis_forward_passes

    base = _weights(micro_checkpoint)
    target = next(k for k in base if ".1." in k and k.endswith("weight") and base[k].dim() == 2)
    mask = torch.zeros_like(base[target], dtype=torch.bool)
    mask[:2] = True
    units = tmp_path / "units" / "units.safetensors"
    units.parent.mkdir()
    save_masks(units, {"scu": {target: mask}})
    (units.parent / "units.json").write_text(json.dumps({"cost": {"attribution": {"forward": 8, "backward": 8}}}))
    cfg = make_cfg(micro_checkpoint, **{"refine.method": "fo_threat", "refine.objective_threat": "rtn:int4",
                                        "refine.fo_lr": 1e-2, "refine.units_file": str(units)})
    validate(cfg)
    run = Run(cfg, tmp_path / "run")
    summary = refine.run(run)
    assert summary["num_parameters"] == int(mask.sum()) and summary["layers"] == [1]
    assert _changed(micro_checkpoint, tmp_path / "run") == {target}
    assert analysis_forward_passes(run) == 8 + 2 * 8 == summary["analysis_forward_passes"]


def test_first_order_steps_of_bf16_weights_accumulate_in_an_fp32_master():
    # A gradient of 1 per entry and Adam's unit-size step: lr 1e-4 moves a weight of 1.0 by far
    # less than bf16's spacing there (2^-7), so only an fp32 master adds the 20 steps up.
    model = torch.nn.Module()
    model.theta = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    trainer = FirstOrderTrainer(model, {"theta": model.theta}, FirstOrderSettings("sft", lr=1e-4, weight_decay=0.0))
    for step in range(20):
        trainer.step(step, [lambda: model.theta.float().sum()])
    assert trainer.masters["theta"].dtype == torch.float32
    torch.testing.assert_close(trainer.masters["theta"], torch.full((64,), 1 - 20e-4), rtol=0, atol=1e-5)
    assert model.theta.dtype == torch.bfloat16
    assert torch.equal(model.theta.detach(), trainer.masters["theta"].to(torch.bfloat16))
    assert float(model.theta[0].detach()) < 1.0  # 0.998 rounds to bf16's 0.99609375, below 1
