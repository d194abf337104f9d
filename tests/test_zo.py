"""The ZO engine: exact restore, per-tensor seeds, skipped steps, unbiased direction."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny_models import tiny_model
from zorefine.models.layers import find_decoder_layers
from zorefine.perturb import gaussian_direction, tensor_seed
from zorefine.zo import ZOEngine, step_seed


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _layer_params(model, index=0):
    return find_decoder_layers(model).parameters(index)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_lr_step_restores_every_weight_bitwise(arch):
    model = tiny_model(arch)
    before = _snapshot(model)
    engine = ZOEngine(_layer_params(model), eps=1e-2)
    ids = torch.arange(12).unsqueeze(0)
    record = engine.step(0, seed=123, lr=0.0, loss_fn=lambda: model(input_ids=ids).logits.float().pow(2).mean())
    assert not record.skipped
    assert record.loss_plus != record.loss_minus  # the perturbation really changed the model
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_step_only_touches_selected_parameters():
    model = tiny_model("llama")
    before = _snapshot(model)
    selected = _layer_params(model, 1)
    engine = ZOEngine(selected, eps=1e-2)
    ids = torch.arange(10).unsqueeze(0)
    engine.step(0, seed=7, lr=1e-2, loss_fn=lambda: model(input_ids=ids).logits.float().mean())
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and changed <= set(selected)


def test_update_follows_the_regenerated_direction():
    model = tiny_model("llama")
    params = _layer_params(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    engine = ZOEngine(params, eps=1e-3)
    ids = torch.arange(10).unsqueeze(0)
    record = engine.step(0, seed=99, lr=0.5, loss_fn=lambda: model(input_ids=ids).logits.float().mean())
    for name, param in params.items():
        z = gaussian_direction(param, tensor_seed(99, name))
        expected = before[name] - 0.5 * record.projected_grad * z
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-6)


def test_tensors_get_independent_directions():
    weight = torch.zeros(64, 64)
    a = gaussian_direction(weight, tensor_seed(5, "layers.0.q.weight"))
    b = gaussian_direction(weight, tensor_seed(5, "layers.0.k.weight"))
    assert not torch.equal(a, b)
    correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert abs(float(correlation)) < 0.05
    assert torch.equal(a, gaussian_direction(weight, tensor_seed(5, "layers.0.q.weight")))
    assert step_seed(0, 1) != step_seed(0, 2)


def test_non_finite_loss_skips_and_leaves_weights_untouched():
    model = tiny_model("llama")
    params = _layer_params(model)
    before = _snapshot(model)
    engine = ZOEngine(params, eps=1e-2)
    record = engine.step(0, seed=3, lr=1.0, loss_fn=lambda: float("nan"))
    assert record.skipped and math.isnan(record.projected_grad)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_same_seed_gives_the_same_step_twice():
    ids = torch.arange(10).unsqueeze(0)
    results = []
    for _ in range(2):
        model = tiny_model("gpt2")
        engine = ZOEngine(_layer_params(model), eps=1e-3)
        for step in range(3):
            engine.step(step, step_seed(11, step), 1e-2, lambda: model(input_ids=ids).logits.float().pow(2).mean())
        results.append(_snapshot(model))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_spsa_estimate_agrees_with_the_true_gradient_in_expectation():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 6))
    data = torch.randn(32, 6)
    target = torch.randn(32, 8)

    def loss() -> torch.Tensor:
        return ((data @ weight.T - target) ** 2).mean()

    true_grad = torch.autograd.grad(loss(), weight)[0]
    engine = ZOEngine({"w": weight}, eps=1e-3)
    estimate = torch.zeros_like(weight)
    directions = 600
    with torch.no_grad():
        for i in range(directions):
            record = engine.step(i, seed=1000 + i, lr=0.0, loss_fn=loss)
            estimate += record.projected_grad * gaussian_direction(weight, tensor_seed(1000 + i, "w"))
    estimate /= directions
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(), true_grad.flatten(), dim=0)
    assert cosine > 0.8
