"""What a ZO method refines: the analyzer's selection, explicit layers, every layer, or random units."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from zorefine.errors import ConfigError
from zorefine.models.layers import find_decoder_layers
from zorefine.models.selection import Selection, SelectionPolicy
from zorefine.models.units import discover_units
from zorefine.run import MASKS_FILE, SELECTION_FILE, Run


def units_path(run: Run) -> Path:
    """The ``units.safetensors`` that ``refine.units_file`` names (``analyze``: this run's)."""
    cfg = run.cfg.refine
    path = run.run_dir / MASKS_FILE if cfg.units_file == "analyze" else Path(cfg.units_file)
    if not path.is_file():
        raise ConfigError(f"no unit sets: {path} is missing; run analyze with a unit method (analyze.method=ssah, ...)")
    return path


def selection_for(run: Run, model: torch.nn.Module) -> Selection:
    """What to refine: ``refine.units_file``, else ``refine.layers``, else ``refine.selection_file``, else analyze's choice."""
    cfg = run.cfg.refine
    if cfg.units_file is not None:
        return Selection.of_entries(units_path(run), cfg.units_set, model)
    if cfg.layers is not None:
        decoder = find_decoder_layers(model)
        bad = [i for i in cfg.layers if not 0 <= i < len(decoder)]
        if bad:
            raise ConfigError(f"refine.layers {bad} out of range: the model has {len(decoder)} decoder layers")
        units = [unit for unit in discover_units(model, "layer") if unit.layer in set(cfg.layers)]
        return Selection.of(units, "layer", SelectionPolicy("names", names=[u.name for u in units]), None)
    path = Path(cfg.selection_file) if cfg.selection_file else run.run_dir / SELECTION_FILE
    if not path.is_file():
        raise ConfigError(f"no selection: {path} is missing; run analyze, or set refine.layers or refine.selection_file")
    return Selection.load(path)


def selection_for_method(run: Run, model: torch.nn.Module) -> Selection:
    """The units a ZO method refines: the analyzer's choice, every layer, or as many random units."""
    cfg = run.cfg.refine
    if cfg.method == "zo_full":
        units = discover_units(model, "layer")
        return Selection.of(units, "layer", SelectionPolicy("names", names=[u.name for u in units]), None)
    chosen = selection_for(run, model)
    if cfg.method != "zo_random":
        return chosen
    if chosen.granularity == "entries":
        raise ConfigError("refine.method=zo_random draws whole units; with refine.units_file draw a random set with the same structure instead")
    # The control for layer selection: as many units of the same granularity, chosen blindly.
    candidates = discover_units(model, chosen.granularity)
    rng = random.Random(f"{cfg.seed}:random-units")
    picked = sorted(rng.sample(range(len(candidates)), len(chosen.units)))
    units = [candidates[i] for i in picked]
    return Selection.of(units, chosen.granularity, SelectionPolicy("names", names=[u.name for u in units]), "random")
