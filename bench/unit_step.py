"""Benchmark: a ZO step on a unit set against a layer selection of the same number of weights.

Prints one JSON object of ratios measured in one run. The unit set is MLP neurons (a neuron is a
row of gate and up and a column of down: :mod:`zorefine.models.neurons`) drawn at random from
every layer, as many as make up the weights of one decoder layer; the layer selection is the
last decoder layer. Both engines use the same settings, seeds and batch.

- ``engine_unit_over_layer``: seconds of a step's own work (drawing directions, writing weights,
  the update) with a free loss, unit set ÷ layer: what gathering and scattering scattered
  entries costs against streaming whole tensors;
- ``step_unit_over_layer``: seconds per whole step with the real loss (two forward passes of the
  batch, no prefix cache for either), unit set ÷ layer;
- ``engine_tenth_over_full_unit``: a step's own work on a unit set a tenth that size ÷ on the
  full one: the cost follows the selected entries, not the tensors they lie in (1.0 would mean
  whole tensors are touched; 0.1 is exact proportion);
- ``engine_share_unit`` / ``engine_share_layer``: a step's own work ÷ the whole step;
- ``weights_unit`` / ``weights_layer``: the weights each engine holds (equal up to one neuron).

Usage: ``python bench/unit_step.py [--model builtin|100m] [--batch 8] [--seq 96] [--repeats 5]``
"""

from __future__ import annotations

import json
import statistics
import time

import torch

# Run as a script (python bench/unit_step.py): its sibling is importable by name.
from zo_step import batch_for, build, model_arguments
from zorefine.models.layers import find_decoder_layers
from zorefine.models.neurons import find_unit_groups
from zorefine.models.param_masks import units_to_masks
from zorefine.zo.engine import ZOEngine, ZOSettings, step_seed


def unit_engine(model, target_weights: int, seed: int = 0) -> ZOEngine:
    """An engine on random MLP neurons of every layer, ``target_weights`` weights in all."""
    groups = [g for g in find_unit_groups(model) if g.kind == "mlp"]
    per_group = max(1, target_weights // (len(groups) * groups[0].parameters_per_unit))
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for group in groups:
        units = torch.zeros(group.size, dtype=torch.bool)
        units[torch.randperm(group.size, generator=generator)[:per_group]] = True
        chosen[group.key] = units
    masks = units_to_masks(groups, chosen)
    named = dict(model.named_parameters())
    entries = {name: mask.reshape(-1).nonzero().squeeze(1) for name, mask in masks.items()}
    return ZOEngine({name: named[name] for name in masks}, settings=ZOSettings(eps=1e-3), entries=entries)


def layer_engine(model) -> ZOEngine:
    """An engine on the last decoder layer's parameters."""
    layers = find_decoder_layers(model)
    return ZOEngine(layers.parameters(len(layers) - 1), settings=ZOSettings(eps=1e-3))


def seconds_per_step(engine: ZOEngine, loss_fn, repeats: int) -> float:
    """Median seconds of one step over ``repeats`` steps (one warm-up step first)."""
    engine.step(0, step_seed(0, 0), 1e-6, loss_fn)
    times = []
    for step in range(1, repeats + 1):
        started = time.perf_counter()
        engine.step(step, step_seed(0, step), 1e-6, loss_fn)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(model_name: str, batch: int, seq: int, repeats: int) -> dict[str, float]:
    """The ratios of the module docstring."""
    model = build(model_name)
    inputs = batch_for(model, batch, seq)
    layer = layer_engine(model)
    unit = unit_engine(model, layer.num_parameters)
    tenth = unit_engine(model, layer.num_parameters // 10)

    def loss() -> float:
        return float(model(**inputs).loss)

    free = lambda: 0.0  # noqa: E731  (the step's own work only)
    with torch.no_grad():
        engine_layer, engine_unit = seconds_per_step(layer, free, repeats), seconds_per_step(unit, free, repeats)
        engine_tenth = seconds_per_step(tenth, free, repeats)
        step_layer, step_unit = seconds_per_step(layer, loss, repeats), seconds_per_step(unit, loss, repeats)
    return {
        "model": model_name,
        "weights_unit": unit.num_parameters,
        "weights_layer": layer.num_parameters,
        "engine_unit_over_layer": engine_unit / engine_layer,
        "engine_tenth_over_full_unit": engine_tenth / engine_unit,
        "step_unit_over_layer": step_unit / step_layer,
        "engine_share_unit": engine_unit / step_unit,
        "engine_share_layer": engine_layer / step_layer,
    }


def main() -> None:
    """Print the JSON object."""
    args = model_arguments(__doc__.splitlines()[0]).parse_args()
    print(json.dumps(measure(args.model, args.batch, args.seq, args.repeats), indent=2))


if __name__ == "__main__":
    main()
