"""Activation quantization and WxAy: per-token levels, clipping, where the hooks go, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.tiny_models import tiny_input_ids, tiny_model
from zorefine.errors import ConfigError
from zorefine.models.layers import find_decoder_layers
from zorefine.threats import (
    ActivationQuantization,
    RTNQuantization,
    WeightActivationQuantization,
    parse_threat,
    threatened,
)
from zorefine.threats.activation_quantization import fake_quantize_per_token, linear_modules


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_each_token_lands_on_its_own_symmetric_grid(bits: int) -> None:
    x = torch.randn(3, 5, 64) * torch.logspace(-2, 2, 5).view(1, 5, 1)  # tokens of very different scale
    q = fake_quantize_per_token(x, bits)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True) / qmax
    steps = q / scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert steps.abs().max() <= qmax + 1e-3
    # Absmax scaling keeps each token's largest value exactly, and errors are at most half a step.
    assert torch.allclose(q.abs().amax(dim=-1), x.abs().amax(dim=-1), rtol=1e-5)
    assert ((q - x).abs() <= scale / 2 + 1e-6).all()


def test_fewer_bits_mean_larger_error_and_clipping_saturates_outliers() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 256)
    x[:, 0] = 50.0  # one outlier channel, as in real LLM activations
    errors = {bits: (fake_quantize_per_token(x, bits) - x).pow(2).mean().item() for bits in (4, 6, 8)}
    assert errors[4] > errors[6] > errors[8] > 0
    clipped = fake_quantize_per_token(x, 4, clip=99.0)
    assert clipped[:, 0].max() < 50.0  # the outlier saturates at the percentile
    # ... and the other channels get a finer grid than absmax scaling gives them.
    rest = (clipped[:, 1:] - x[:, 1:]).pow(2).mean()
    assert rest < (fake_quantize_per_token(x, 4)[:, 1:] - x[:, 1:]).pow(2).mean()


def test_zero_tokens_stay_zero_and_the_gradient_is_straight_through() -> None:
    x = torch.zeros(2, 8)
    assert torch.equal(fake_quantize_per_token(x, 4), x)
    y = torch.randn(2, 8, requires_grad=True)
    fake_quantize_per_token(y, 4).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooks_go_on_the_linear_maps_of_the_given_parameters_only(arch: str) -> None:
    model = tiny_model(arch)
    layers = find_decoder_layers(model)
    everything = linear_modules(model, dict(model.named_parameters()))
    # q/k/v/o + three MLP maps (Llama) or c_attn/c_proj + c_fc/c_proj (GPT-2 Conv1D) per layer.
    assert len(everything) == len(layers) * (7 if arch == "llama" else 4)
    last = layers.parameters(len(layers) - 1)
    chosen = linear_modules(model, last)
    assert chosen and all(name.startswith(layers.name(len(layers) - 1) + ".") for name, _ in chosen)
    ids = tiny_input_ids()
    clean = _logits(model, ids)
    with threatened(model, ActivationQuantization(4), params=last):
        assert not torch.equal(_logits(model, ids), clean)
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) == len(chosen)
    assert torch.equal(_logits(model, ids), clean)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wxay_is_rtn_weights_then_quantized_activations(arch: str) -> None:
    model = tiny_model(arch)
    ids = tiny_input_ids()
    with threatened(model, [RTNQuantization(4, group_size=16), ActivationQuantization(4, clip=99.0)]):
        composed = _logits(model, ids)
    with threatened(model, WeightActivationQuantization(4, 4, group_size=16, clip=99.0)):
        one = _logits(model, ids)
    assert torch.equal(one, composed)
    # Fewer bits hurt more: W4A4 moves the logits further than W8A8.
    clean = _logits(model, ids)
    with threatened(model, "w8a8"):
        w8a8 = (_logits(model, ids) - clean).norm()
    with threatened(model, "w4a4"):
        w4a4 = (_logits(model, ids) - clean).norm()
    assert w4a4 > w8a8 > 0


def test_specs_round_trip_and_bad_specs_fail_clearly() -> None:
    for spec in ["aquant:a8", "aquant:a6:p99.9", "w8a8", "w4a8:g64", "w4a4:g32:p99"]:
        threat = parse_threat(spec)
        assert threat.spec == spec and parse_threat(threat.spec) == threat
    assert parse_threat("aquant:4:clip=99") == ActivationQuantization(4, 99.0)
    for bad, message in [("aquant:a5", "bits"), ("aquant:a8:p100", "percentile"), ("w2a4", "bits"),
                         ("w4a4:g0", "group_size"), ("w4a4:seed=1", "unknown option")]:
        with pytest.raises(ConfigError, match=message):
            parse_threat(bad)
