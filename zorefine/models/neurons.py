"""Structured units inside the decoder layers: MLP neurons and attention output channels.

Layer, module and tensor units (:mod:`zorefine.models.units`) are groups of whole tensors. The
safety-unit methods (SSAH, SafeSeek, Wei et al.'s set difference) go finer:

- an **MLP neuron** ``j`` is row ``j`` of every input projection (gate/up, ``c_fc``, ``fc1``,
  ``dense_h_to_4h``, with its bias entry) and column ``j`` of the output projection
  (down, ``c_proj``, ``fc2``, ``dense_4h_to_h``);
- an **attention channel** ``j`` is input column ``j`` of the attention output projection
  (``o_proj``, ``c_proj``, ``out_proj``, ``dense``); ``head_size`` consecutive channels are a head.

Which Linear plays which role is found by tracing one forward pass, not from a table of names:
inside a layer's attention (or MLP) block, the output projection is the linear map called last,
and the MLP's input projections are those called before it whose outputs have the width of its
input. GPT-2's ``Conv1D`` stores weights as (in, out), so its axes are swapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from zorefine.errors import ModelError
from zorefine.models.layers import find_decoder_layers, parameter_category

__all__ = ["Slice", "UnitGroup", "decoder_linears", "find_unit_groups", "is_linear", "output_projections", "weight_axes"]

KINDS = ("mlp", "attention")


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` (by class name: forks are caught too)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_axes(module: nn.Module) -> tuple[int, int]:
    """(output axis, input axis) of the module's weight."""
    return (1, 0) if type(module).__name__ == "Conv1D" else (0, 1)


def _widths(module: nn.Module) -> tuple[int, int]:
    """(output features, input features)."""
    out_axis, in_axis = weight_axes(module)
    return module.weight.shape[out_axis], module.weight.shape[in_axis]


@dataclass(frozen=True)
class Slice:
    """Where the units of a group live in one parameter: unit ``j`` is index ``j`` along ``axis``."""

    param: str
    axis: int


@dataclass(eq=False)
class UnitGroup:
    """The neurons of one MLP, or the output channels of one attention block."""

    # Module path of the output projection whose input channels are the units.
    output: str
    layer: int
    kind: str
    size: int
    slices: list[Slice]
    # Channels per attention head (None for MLP neurons, or when the width does not divide).
    head_size: int | None = None
    params: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        """Stable name of the group, e.g. ``model.layers.3.mlp.down_proj``."""
        return self.output

    @property
    def parameters_per_unit(self) -> int:
        """Scalar weights one unit holds (the same for every unit of the group)."""
        return sum(self.params[s.param].numel() // self.params[s.param].shape[s.axis] for s in self.slices)

    def unit_entries(self, param: str, units: torch.Tensor) -> torch.Tensor:
        """A boolean mask of ``param``'s shape that is true on the slices of the ``units`` (bool [size])."""
        tensor = self.params[param]
        axis = next(s.axis for s in self.slices if s.param == param)
        shape = [1] * tensor.dim()
        shape[axis] = self.size
        return units.to(tensor.device).reshape(shape).expand_as(tensor)


def _call_order(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """The names of ``modules`` in the order one forward pass first calls them."""
    order: list[str] = []
    handles = []
    for name, module in modules.items():
        def record(_module, _inputs, name=name):
            if name not in order:
                order.append(name)
        handles.append(module.register_forward_pre_hook(record))
    try:
        device = next(model.parameters()).device
        # Four ordinary ids: any vocabulary has them, and one short sequence reaches every block.
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4]], device=device))
    finally:
        for handle in handles:
            handle.remove()
    return order


def _num_heads(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_unit_groups(model: nn.Module) -> list[UnitGroup]:
    """Every MLP-neuron and attention-channel group of the decoder, in layer order (MLP before attention).

    Raises :class:`ModelError` when a layer has no recognisable attention or MLP output projection.
    """
    layers = find_decoder_layers(model)
    named = dict(model.named_parameters())
    linears = _decoder_linears(model)
    order = _call_order(model, {name: module for name, (_, _, module) in linears.items()})
    heads = _num_heads(model)
    groups: list[UnitGroup] = []
    for index in range(len(layers)):
        called = [name for name in order if linears[name][0] == index]
        for kind in KINDS:
            members = [name for name in called if parameter_category(linears[name][1] + ".weight") == kind]
            if not members:
                raise ModelError(f"layer {layers.name(index)} has no {kind} linear map that zorefine can recognise")
            output = members[-1]
            out_module = linears[output][2]
            width = _widths(out_module)[1]
            slices = [Slice(f"{output}.weight", weight_axes(out_module)[1])]
            if kind == "mlp":
                for name in members[:-1]:
                    module = linears[name][2]
                    if _widths(module)[0] == width:
                        slices.append(Slice(f"{name}.weight", weight_axes(module)[0]))
                        if getattr(module, "bias", None) is not None:
                            slices.append(Slice(f"{name}.bias", 0))
            head_size = width // heads if kind == "attention" and heads and width % heads == 0 else None
            params = {s.param: named[s.param] for s in slices}
            groups.append(UnitGroup(output, index, kind, width, slices, head_size, params))
    return groups


def _decoder_linears(model: nn.Module) -> dict[str, tuple[int, str, nn.Module]]:
    """Every linear map of the decoder layers: full module path -> (layer, path in the layer, module)."""
    layers = find_decoder_layers(model)
    found = {}
    for index, layer in enumerate(layers.modules):
        for local, module in layer.named_modules():
            if is_linear(module) and getattr(module, "weight", None) is not None:
                found[f"{layers.name(index)}.{local}"] = (index, local, module)
    return found


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear map of the decoder layers by module path (the weight-entry level of Wei et al.)."""
    return {name: module for name, (_, _, module) in _decoder_linears(model).items()}


def output_projections(model: nn.Module) -> tuple[list[UnitGroup], dict[str, nn.Module]]:
    """The unit groups and, by module path, the output projection of each (whose inputs are the units)."""
    groups = find_unit_groups(model)
    linears = decoder_linears(model)
    return groups, {group.output: linears[group.output] for group in groups}
