"""Generic decoder-layer discovery and parameter subsets, on seven tiny architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.tiny_models import ARCHS, num_layers, tiny_model
from zorefine.errors import ConfigError, ModelError
from zorefine.models.layers import (
    DecoderLayers,
    decoder_parameters,
    find_decoder_layers,
    layer_submodules,
    parameter_subset,
)

# Only to check discovery's answer; discovery itself must not know these.
EXPECTED_PATHS = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
    "gemma": "model.layers",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
}


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    # Module scope: these tests only read the model.
    return request.param, tiny_model(request.param)


def test_finds_every_layer(arch_model: tuple[str, nn.Module]) -> None:
    arch, model = arch_model
    layers = find_decoder_layers(model)
    assert isinstance(layers, DecoderLayers)
    assert layers.path == EXPECTED_PATHS[arch]
    assert len(layers) == num_layers(model.config)
    assert layers.modules == list(model.get_submodule(layers.path))
    assert layers.name(1) == f"{layers.path}.1"


def test_layer_parameters_are_disjoint_and_named_as_in_model(arch_model: tuple[str, nn.Module]) -> None:
    _, model = arch_model
    named = dict(model.named_parameters())
    layers = find_decoder_layers(model)
    seen: set[str] = set()
    for index in range(len(layers)):
        params = layers.parameters(index)
        assert params, f"layer {index} has no parameters"
        for name, param in params.items():
            assert name.startswith(layers.name(index) + "."), name
            assert named[name] is param, name
        assert not seen & set(params), "layers share parameter names"
        seen |= set(params)
    # Together the layers cover exactly the parameters under the layer list, nothing else.
    under = {name for name in named if name.startswith(layers.path + ".")}
    assert seen == under
    assert len(seen) < len(named), "embeddings/head must not be counted as layer parameters"
    assert list(decoder_parameters(model)) == [n for i in range(len(layers)) for n in layers.parameters(i)]


def test_layer_submodules_partition_a_layer(arch_model: tuple[str, nn.Module]) -> None:
    _, model = arch_model
    groups = layer_submodules(model, 0)
    assert set(groups) == {"attention", "mlp", "other"}
    assert groups["attention"] and groups["mlp"] and groups["other"]
    union = {**groups["attention"], **groups["mlp"], **groups["other"]}
    assert sum(len(g) for g in groups.values()) == len(union)
    assert union == find_decoder_layers(model).parameters(0)
    # Norms are neither attention nor MLP, even when named "post_attention_layernorm".
    for group in ("attention", "mlp"):
        for name in groups[group]:
            leaf_module = name.rsplit(".", 2)[-2]
            assert "norm" not in leaf_module and not leaf_module.startswith("ln_"), (group, name)


def test_layer_submodules_known_names() -> None:
    opt = layer_submodules(tiny_model("opt"), 1)
    assert "model.decoder.layers.1.fc1.weight" in opt["mlp"]
    assert "model.decoder.layers.1.self_attn_layer_norm.weight" in opt["other"]
    assert "model.decoder.layers.1.self_attn.out_proj.weight" in opt["attention"]
    llama = layer_submodules(tiny_model("llama"), 0)
    assert "model.layers.0.post_attention_layernorm.weight" in llama["other"]
    assert "model.layers.0.mlp.down_proj.weight" in llama["mlp"]
    gpt2 = layer_submodules(tiny_model("gpt2"), 2)
    assert "transformer.h.2.attn.c_attn.weight" in gpt2["attention"]
    assert "transformer.h.2.mlp.c_fc.bias" in gpt2["mlp"]
    assert "transformer.h.2.ln_1.weight" in gpt2["other"]


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)


class _Toy(nn.Module):
    """Two lists of identical blocks (the bigger must win) and one list of mixed classes."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(_Block(2) for _ in range(8))  # more blocks, fewer parameters
        self.body = nn.Module()
        self.body.blocks = nn.ModuleList(_Block(16) for _ in range(3))
        self.mixed = nn.ModuleList([nn.Linear(64, 64), _Block(4)])  # largest, but not repeated


def test_discovery_is_structural() -> None:
    layers = find_decoder_layers(_Toy())
    assert layers.path == "body.blocks"
    assert len(layers) == 3
    assert set(layers.parameters(2)) == {"body.blocks.2.proj.weight", "body.blocks.2.proj.bias"}


def test_no_layers_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="could not find decoder layers"):
        find_decoder_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(ModelError):
        find_decoder_layers(nn.ModuleDict({"a": nn.ModuleList([nn.ReLU(), nn.ReLU()])}))  # no parameters


def test_layer_index_out_of_range() -> None:
    layers = find_decoder_layers(tiny_model("llama"))
    with pytest.raises(IndexError):
        layers.parameters(len(layers))
    with pytest.raises(IndexError):
        layers.name(-1)


def test_parameter_subset_names_and_patterns() -> None:
    model = tiny_model("llama")
    named = list(dict(model.named_parameters()))
    exact = "model.layers.1.mlp.up_proj.weight"
    subset = parameter_subset(model, [r"model\.layers\.0\.self_attn\..*", exact])
    assert exact in subset
    assert {n for n in subset if n != exact} == {n for n in named if n.startswith("model.layers.0.self_attn.")}
    assert list(subset) == [n for n in named if n in subset]  # model order kept
    assert parameter_subset(model, exact) == {exact: dict(model.named_parameters())[exact]}  # bare string
    # fullmatch, not search: a partial pattern selects nothing, which is an error.
    with pytest.raises(ConfigError, match="matches no parameter"):
        parameter_subset(model, ["self_attn"])
    with pytest.raises(ConfigError, match="invalid parameter pattern"):
        parameter_subset(model, ["model.layers.(0"])
    assert torch.equal(subset[exact], model.get_parameter(exact))
