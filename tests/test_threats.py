"""Threat models: exact restore, seeding, the size of each perturbation, hooks, spec language."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tests.tiny_models import tiny_input_ids, tiny_model
from zorefine.errors import ConfigError
from zorefine.models.layers import decoder_parameters, find_decoder_layers
from zorefine.zo.directions import gaussian_direction, tensor_rms, tensor_seed
from zorefine.threats import (
    ActivationNoise,
    ActivationQuantization,
    BnbQuantization,
    RTNQuantization,
    Threat,
    WeightActivationQuantization,
    WeightNoise,
    parse_threat,
    threatened,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # On small CPU boxes torch's threaded GEMM can cost ~16 ms per tiny matmul; one thread is
    # ~100x faster for these 32-wide models. Restored afterwards for the rest of the session.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ALL_THREATS: list[Threat] = [
    WeightNoise(0.05, "absolute"),
    WeightNoise(0.05, "relative", seed=3),
    WeightNoise(0.05, "multiplicative"),
    RTNQuantization(8),
    RTNQuantization(4),
    RTNQuantization(8, group_size=16),
    RTNQuantization(4, group_size=16),
    ActivationNoise(0.1),
    BnbQuantization("int8"),
    BnbQuantization("nf4"),
    BnbQuantization("fp4"),
    BnbQuantization("nf4", blocksize=128, double_quant=True),
    ActivationQuantization(8),
    ActivationQuantization(4, clip=99.0),
    WeightActivationQuantization(8, 8),
    WeightActivationQuantization(4, 4, group_size=16, clip=99.9),
]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor: equality here is bit-identity (-0.0 != 0.0, NaN == NaN)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: _bits(value) for name, value in model.state_dict().items()}


def _assert_identical(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = _snapshot(model)
    assert now.keys() == snapshot.keys()
    changed = [name for name in now if not torch.equal(now[name], snapshot[name])]
    assert not changed, f"not restored bit-identically: {changed[:5]}"


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _weights(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


# --------------------------------------------------------------------------- exact restore


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("threat", ALL_THREATS, ids=lambda t: t.name)
def test_every_threat_changes_output_and_restores_exactly(arch: str, threat: Threat) -> None:
    model = tiny_model(arch)
    ids = tiny_input_ids()
    before = _snapshot(model)
    clean = _logits(model, ids)
    hooks = _hook_count(model)
    with threatened(model, threat):
        perturbed = _logits(model, ids)
    assert not torch.equal(perturbed, clean), f"{threat.name} did not change the output"
    _assert_identical(model, before)
    assert _hook_count(model) == hooks
    assert torch.equal(_logits(model, ids), clean)


def test_composed_threats_restore_and_compose_in_order() -> None:
    model = tiny_model("gpt2")
    params = decoder_parameters(model)
    before = _snapshot(model)
    noise, quant = WeightNoise(0.1, seed=1), RTNQuantization(4)
    with threatened(model, noise):
        with threatened(model, quant):
            nested = _weights(params)
    with threatened(model, [noise, quant, ActivationNoise(0.1)]):
        composed = _weights(params)
        assert _hook_count(model) == len(find_decoder_layers(model))
    assert all(torch.equal(nested[n], composed[n]) for n in params)
    _assert_identical(model, before)
    assert _hook_count(model) == 0


def test_restore_when_body_raises() -> None:
    model = tiny_model("llama")
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with threatened(model, [WeightNoise(0.2), RTNQuantization(4), ActivationNoise(0.5)]):
            name = "model.layers.0.mlp.up_proj.weight"
            assert not torch.equal(_snapshot(model)[name], before[name])
            raise RuntimeError("boom")
    _assert_identical(model, before)
    assert _hook_count(model) == 0


def test_restore_when_a_later_threat_fails_to_apply() -> None:
    model = tiny_model("llama")
    before = _snapshot(model)
    # Weight noise is applied first, then RTN rejects a group size that divides no input dim.
    with pytest.raises(ConfigError, match="does not divide the input dimension"):
        with threatened(model, [WeightNoise(0.2), RTNQuantization(4, group_size=5)]):
            pass
    _assert_identical(model, before)


def test_only_given_params_are_touched() -> None:
    model = tiny_model("llama")
    layer1 = find_decoder_layers(model).parameters(1)
    others = {n: p for n, p in model.named_parameters() if n not in layer1}
    other_before = _weights(others)
    layer_before = _weights(layer1)
    with threatened(model, [WeightNoise(0.1), RTNQuantization(4)], params=layer1):
        assert all(torch.equal(others[n], other_before[n]) for n in others)
        assert not any(torch.equal(layer1[n], layer_before[n]) for n in layer1)


def test_spec_strings_are_accepted() -> None:
    model = tiny_model("gpt2")
    before = _snapshot(model)
    with threatened(model, ["wnoise:0.1", "rtn:int4"]):
        name = "transformer.h.0.attn.c_attn.weight"
        assert not torch.equal(_snapshot(model)[name], before[name])
    _assert_identical(model, before)


# --------------------------------------------------------------------------- weight noise


def test_weight_noise_is_seeded_per_tensor() -> None:
    model = tiny_model("llama")
    params = decoder_parameters(model)
    base = _weights(params)

    def perturbed(threat: Threat) -> dict[str, torch.Tensor]:
        with threatened(model, threat):
            return _weights(params)

    first, again = perturbed(WeightNoise(0.1, "absolute", seed=1)), perturbed(WeightNoise(0.1, "absolute", seed=1))
    other = perturbed(WeightNoise(0.1, "absolute", seed=2))
    assert all(torch.equal(first[n], again[n]) for n in params)
    assert not any(torch.equal(first[n], other[n]) for n in params)
    # Each tensor's noise is its own seeded direction, regenerable from (seed, name) alone.
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = 0.1 * gaussian_direction(params[name], tensor_seed(1, name))
    torch.testing.assert_close(first[name] - base[name], expected, rtol=0, atol=1e-6)
    # Two tensors of the same shape get uncorrelated directions (not one shared seed).
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    assert params[q].shape == params[o].shape
    dq, do = (first[q] - base[q]).flatten(), (first[o] - base[o]).flatten()
    correlation = float(torch.corrcoef(torch.stack([dq, do]))[0, 1])
    assert abs(correlation) < 0.15  # 1024 entries: independent draws give |r| ~ 0.03


def test_relative_noise_has_requested_rms_ratio() -> None:
    model = tiny_model("gpt2")
    params = decoder_parameters(model)
    base = _weights(params)
    sigma = 0.05
    with threatened(model, WeightNoise(sigma, "relative", seed=7)):
        checked = 0
        for name, param in params.items():
            if param.numel() >= 1024 and tensor_rms(base[name]) > 0:
                ratio = tensor_rms(param.detach() - base[name]) / tensor_rms(base[name])
                assert ratio == pytest.approx(sigma, rel=0.1), name
                checked += 1
    assert checked >= 6


def test_multiplicative_noise_keeps_zeros_and_scales_with_weight() -> None:
    layer = nn.Linear(64, 64)
    with torch.no_grad():
        layer.weight[3].zero_()
    params = dict(layer.named_parameters())
    base = _weights(params)
    with threatened(layer, WeightNoise(0.1, "multiplicative", seed=4), params=params):
        assert torch.equal(layer.weight[3], torch.zeros(64))
        relative = (layer.weight.detach() - base["weight"]) / base["weight"]
        relative = relative[base["weight"] != 0]
        assert float(relative.std()) == pytest.approx(0.1, rel=0.1)


def test_zero_sigma_is_a_no_op() -> None:
    model = tiny_model("gpt2")
    ids = tiny_input_ids()
    clean = _logits(model, ids)
    with threatened(model, [WeightNoise(0.0), ActivationNoise(0.0)]):
        assert torch.equal(_logits(model, ids), clean)
        assert _hook_count(model) == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: WeightNoise(-0.1),
        lambda: WeightNoise(float("nan")),
        lambda: WeightNoise(0.1, "sideways"),
        lambda: WeightNoise(0.1, seed=1.5),  # type: ignore[arg-type]
        lambda: ActivationNoise(0.1, target="attention"),
        lambda: RTNQuantization(3),
        lambda: RTNQuantization(4, group_size=0),
        lambda: BnbQuantization("int2"),
        lambda: BnbQuantization("nf4", blocksize=100),
        lambda: BnbQuantization("int8", blocksize=64),
    ],
)
def test_invalid_arguments_are_config_errors(make: object) -> None:
    with pytest.raises(ConfigError):
        make()  # type: ignore[operator]


# --------------------------------------------------------------------------- round-to-nearest


def _quant_error(model: nn.Module, threat: Threat) -> float:
    """Mean relative RMS error that ``threat`` introduces into the weight matrices."""
    params = {n: p for n, p in decoder_parameters(model).items() if p.dim() == 2}
    base = _weights(params)
    with threatened(model, threat):
        errors = [tensor_rms(p.detach() - base[n]) / tensor_rms(base[n]) for n, p in params.items()]
    return sum(errors) / len(errors)


def test_rtn_error_small_at_int8_larger_at_int4() -> None:
    model = tiny_model("llama")
    int8, int4 = _quant_error(model, RTNQuantization(8)), _quant_error(model, RTNQuantization(4))
    assert 0 < int8 < 0.01
    assert int4 > 10 * int8
    assert int4 < 0.25
    # Smaller groups fit their scales better.
    assert _quant_error(model, RTNQuantization(4, group_size=8)) < int4


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_levels_per_output_channel_and_group(bits: int) -> None:
    model = tiny_model("llama")
    params = decoder_parameters(model)
    name = "model.layers.0.mlp.down_proj.weight"  # (out 32, in 64)
    with threatened(model, RTNQuantization(bits)):
        weight = params[name].detach().clone()
    assert all(row.unique().numel() <= 2**bits for row in weight)
    with threatened(model, RTNQuantization(bits, group_size=16)):
        grouped = params[name].detach().clone()
    assert all(group.unique().numel() <= 2**bits for group in grouped.reshape(-1, 16))
    # 1-D norms are never quantized.
    norm = "model.layers.0.input_layernorm.weight"
    before = params[norm].detach().clone()
    with threatened(model, RTNQuantization(bits)):
        assert torch.equal(params[norm], before)


def test_rtn_on_gpt2_conv1d_quantizes_per_output_feature() -> None:
    model = tiny_model("gpt2")
    params = decoder_parameters(model)
    name = "transformer.h.0.mlp.c_fc.weight"  # Conv1D: stored (in 32, out 128)
    bias = "transformer.h.0.mlp.c_fc.bias"
    bias_before = params[bias].detach().clone()
    with threatened(model, RTNQuantization(4)):
        weight = params[name].detach().clone()
        assert torch.equal(params[bias], bias_before)
    # Columns are output features: each has <= 16 levels; rows mix 128 scales, so have many more.
    assert max(col.unique().numel() for col in weight.t()) <= 16
    assert min(row.unique().numel() for row in weight) > 16
    # Groups run along the input dimension of each output feature.
    with threatened(model, RTNQuantization(4, group_size=8)):
        grouped = params[name].detach().clone()
    assert all(g.unique().numel() <= 16 for g in grouped.t().reshape(-1, 8))


@pytest.mark.parametrize(
    "threat", [RTNQuantization(4), BnbQuantization("int8"), BnbQuantization("nf4")], ids=lambda t: t.name
)
def test_zero_rows_stay_zero_without_nan(threat: Threat) -> None:
    layer = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        layer.weight[5].zero_()
    params = dict(layer.named_parameters())
    with threatened(layer, threat, params=params):
        assert torch.isfinite(layer.weight).all()
        assert torch.equal(layer.weight[5], torch.zeros(64))


# --------------------------------------------------------------------------- bitsandbytes


def _reference_4bit(matrix: torch.Tensor, scheme: str, blocksize: int) -> torch.Tensor:
    """Plain-torch 4-bit blockwise absmax quantization over the row-major flattening."""
    import bitsandbytes.functional as functional

    code = functional.get_4bit_type(scheme, device="cpu")
    flat = matrix.float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    index = (blocks / absmax).unsqueeze(-1).sub(code).abs().argmin(dim=-1)
    return (code[index] * absmax).reshape(-1)[: flat.numel()].reshape(matrix.shape)


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
def test_bnb_4bit_matches_reference_even_when_blocks_span_rows(scheme: str) -> None:
    # 16x16 weight, blocksize 64 > row length 16: bitsandbytes 0.50's native CPU
    # dequantize_4bit gets 2-D inputs of this kind wrong; the flat layout must not.
    layer = nn.Linear(16, 16, bias=False)
    params = dict(layer.named_parameters())
    expected = _reference_4bit(layer.weight.detach(), scheme, 64)
    with threatened(layer, BnbQuantization(scheme, blocksize=64), params=params):
        torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-6)
        assert all(block.unique().numel() <= 16 for block in layer.weight.detach().reshape(-1, 64))


def test_bnb_errors_ordered_and_int8_rowwise() -> None:
    model = tiny_model("gpt2")
    int8 = _quant_error(model, BnbQuantization("int8"))
    nf4 = _quant_error(model, BnbQuantization("nf4"))
    assert 0 < int8 < 0.01 < nf4 < 0.2
    params = decoder_parameters(model)
    name = "transformer.h.1.attn.c_proj.weight"
    with threatened(model, BnbQuantization("int8")):
        weight = params[name].detach().clone()
    # Row-wise absmax per output feature (a Conv1D column): each feature's largest entry survives.
    torch.testing.assert_close(weight.abs().amax(dim=0), params[name].detach().abs().amax(dim=0).half().float())
    assert max(col.unique().numel() for col in weight.t()) <= 255


# --------------------------------------------------------------------------- activation noise


def test_activation_noise_seeded_fresh_per_forward_and_removed() -> None:
    model = tiny_model("llama")
    ids = tiny_input_ids()
    clean = _logits(model, ids)
    with threatened(model, ActivationNoise(0.1, seed=1)):
        assert _hook_count(model) == len(find_decoder_layers(model))
        first = _logits(model, ids)
        second = _logits(model, ids)
    with threatened(model, ActivationNoise(0.1, seed=1)):
        replay = _logits(model, ids)
    with threatened(model, ActivationNoise(0.1, seed=2)):
        other = _logits(model, ids)
    assert not torch.equal(first, clean)
    assert torch.equal(first, replay)  # same seed, same sequence of forwards: same noise
    assert not torch.equal(first, second)  # each forward draws fresh noise
    assert not torch.equal(first, other)
    assert _hook_count(model) == 0
    assert torch.equal(_logits(model, ids), clean)


def test_activation_noise_relative_to_token_rms_on_selected_layers() -> None:
    model = tiny_model("gpt2")
    ids = tiny_input_ids(batch=4, length=16)
    layers = find_decoder_layers(model)
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, inputs: object, output: object) -> None:
        captured.append(output if isinstance(output, torch.Tensor) else output[0])  # type: ignore[index]

    handle = layers.modules[0].register_forward_hook(capture)
    _logits(model, ids)
    handle.remove()
    sigma = 0.2
    with threatened(model, ActivationNoise(sigma, "relative", seed=5), params=layers.parameters(0)):
        assert _hook_count(model) == 1  # only the layer holding the given params
        # Registered after the noise hook, so it sees the noised output.
        handle = layers.modules[0].register_forward_hook(capture)
        _logits(model, ids)
        handle.remove()
    clean, noisy = captured
    token_rms = clean.pow(2).mean(dim=-1).sqrt()
    noise_rms = (noisy - clean).pow(2).mean(dim=-1).sqrt()
    assert float((noise_rms / token_rms).mean()) == pytest.approx(sigma, rel=0.1)


class _Stack(nn.Module):
    """Identity layers in a ModuleList: the hidden states are exactly what the test feeds in."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(torch.eye(width))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def test_relative_activation_noise_scales_with_each_token() -> None:
    # Tokens whose norms differ 1000-fold (like attention sinks) each get noise at sigma x their own RMS.
    stack = _Stack(width=256, depth=1)
    hidden = torch.ones(1, 2, 256)
    hidden[0, 1] *= 1000.0
    sigma = 0.1
    with threatened(stack, ActivationNoise(sigma, "relative"), params=dict(stack.named_parameters())):
        with torch.no_grad():
            noisy = stack(hidden)
    ratio = (noisy - hidden).pow(2).mean(dim=-1).sqrt() / hidden.pow(2).mean(dim=-1).sqrt()
    torch.testing.assert_close(ratio, torch.full_like(ratio, sigma), rtol=0.15, atol=0)


# --------------------------------------------------------------------------- spec language


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("wnoise:0.05", WeightNoise(0.05)),
        ("wnoise:0.05:relative:seed=2", WeightNoise(0.05, "relative", 2)),
        ("wnoise:1e-3:abs", WeightNoise(0.001, "absolute")),
        ("WNOISE:0.1:multiplicative:seed=9", WeightNoise(0.1, "multiplicative", 9)),
        ("anoise:0.1", ActivationNoise(0.1)),
        ("anoise:0.1:absolute:seed=3", ActivationNoise(0.1, "absolute", 3)),
        ("rtn:int8", RTNQuantization(8)),
        ("rtn:int4:g128", RTNQuantization(4, 128)),
        ("rtn:bits=4:group=64", RTNQuantization(4, 64)),
        ("bnb:nf4", BnbQuantization("nf4", 64)),
        ("bnb:fp4:b128:dq", BnbQuantization("fp4", 128, True)),
        ("bnb:int8", BnbQuantization("int8")),
    ],
)
def test_parse_threat(spec: str, expected: Threat) -> None:
    threat = parse_threat(spec)
    assert threat == expected
    assert parse_threat(threat.spec) == threat  # type: ignore[attr-defined]
    assert parse_threat(threat.spec).spec == threat.spec  # type: ignore[attr-defined]


def test_names_for_reports() -> None:
    assert WeightNoise(0.05, seed=1).name == "wnoise_rel_s0.05_seed1"
    assert RTNQuantization(4, 128).name == "rtn_int4_g128"
    assert RTNQuantization(8).name == "rtn_int8"
    assert ActivationNoise(0.1, "absolute").name == "anoise_abs_s0.1_seed0"
    assert BnbQuantization("nf4").name == "bnb_nf4_b64"
    assert len({t.name for t in ALL_THREATS}) == len(ALL_THREATS)
    assert all(isinstance(t, Threat) for t in ALL_THREATS)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "wnoise",
        "wnoise:",
        "wnoise:abc",
        "wnoise:-0.1",
        "wnoise:0.1:sideways",
        "wnoise:0.1:seed=x",
        "wnoise:0.1:color=red",
        "wnoise:0.1:relative:absolute",
        "noise:0.1",
        "rtn:int3",
        "rtn:int4:g0",
        "rtn:int4:x",
        "bnb:nf3",
        "bnb:int8:b64",
        "bnb:nf4:b100",
        "bnb:nf4:double_quant=maybe",
        "anoise:0.1:target=mlp",
    ],
)
def test_parse_threat_errors_list_valid_forms(spec: str) -> None:
    with pytest.raises(ConfigError, match="valid threat specs") as info:
        parse_threat(spec)
    assert repr(spec) in str(info.value)
