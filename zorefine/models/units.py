"""Units: the named groups of parameters that the analyzer scores and the refiner selects.

Three granularities, discovered generically for any decoder-only causal LM:

- ``layer``: one unit per decoder layer (``model.layers.3``);
- ``module``: attention, MLP and the rest (norms) of each layer (``model.layers.3:attention``);
- ``tensor``: every parameter tensor of every decoder layer, by its full name.

A unit always knows its decoder layer, which is what prefix caching and the heatmap need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from zorefine.errors import ConfigError
from zorefine.models.layers import find_decoder_layers, layer_submodules
from zorefine.distributed.partitions import num_entries

GRANULARITIES = ("layer", "module", "tensor")


@dataclass(eq=False)
class Unit:
    """One scored and selectable group of parameters."""

    name: str
    layer: int
    # "layer", "attention", "mlp", "other" or "tensor".
    kind: str
    params: dict[str, nn.Parameter] = field(repr=False)

    @property
    def num_parameters(self) -> int:
        """How many scalar weights the unit holds."""
        return sum(num_entries(p) for p in self.params.values())


def discover_units(model: nn.Module, granularity: str = "layer") -> list[Unit]:
    """Every unit of ``model`` at ``granularity``, in layer order; empty groups are skipped."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    layers = find_decoder_layers(model)
    units: list[Unit] = []
    for index in range(len(layers)):
        if granularity == "layer":
            units.append(Unit(layers.name(index), index, "layer", layers.parameters(index)))
        elif granularity == "module":
            for kind, params in layer_submodules(model, index).items():
                if params:
                    units.append(Unit(f"{layers.name(index)}:{kind}", index, kind, params))
        else:
            for name, param in layers.parameters(index).items():
                units.append(Unit(name, index, "tensor", {name: param}))
    return units


def units_by_name(model: nn.Module, names: list[str]) -> list[Unit]:
    """The units called ``names`` (at whatever granularity each name belongs to)."""
    known: dict[str, Unit] = {}
    for granularity in GRANULARITIES:
        known.update({unit.name: unit for unit in discover_units(model, granularity)})
    missing = [name for name in names if name not in known]
    if missing:
        raise ConfigError(f"unknown units {missing}: this model's layers are named like {next(iter(known))!r}")
    return [known[name] for name in names]


def union_parameters(units: list[Unit]) -> dict[str, nn.Parameter]:
    """The parameters of all ``units``, by full name, each once."""
    params: dict[str, nn.Parameter] = {}
    for unit in units:
        params.update(unit.params)
    return params
