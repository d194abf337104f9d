"""Parameter masks: the one currency of unit sets, whatever their granularity.

A mask set maps a parameter's full name to a boolean tensor of that parameter's shape, true on
the entries that belong to the set. Structured units (MLP neurons, attention channels, heads:
:mod:`zorefine.models.neurons`) and single weight entries (Wei et al.'s set difference) both
become mask sets, so ablating, freezing, counting, saving and drawing random controls are each
written once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save
from torch import nn

from zorefine.errors import ConfigError
from zorefine.files import write_atomic
from zorefine.models.neurons import UnitGroup

__all__ = [
    "Masks",
    "count_entries",
    "freeze_masked",
    "load_masks",
    "named_sets",
    "random_entries_like",
    "random_units_like",
    "save_masks",
    "union_masks",
    "units_to_masks",
]

Masks = dict[str, torch.Tensor]


def units_to_masks(groups: Sequence[UnitGroup], chosen: Mapping[str, torch.Tensor]) -> Masks:
    """The entry masks of the chosen units: ``chosen[group.key]`` is a bool [size] per group."""
    masks: Masks = {}
    for group in groups:
        units = chosen.get(group.key)
        if units is None or not bool(units.any()):
            continue
        for piece in group.slices:
            masks[piece.param] = group.unit_entries(piece.param, units.bool()).clone()
    return masks


def union_masks(*sets: Mapping[str, torch.Tensor]) -> Masks:
    """Every entry any of ``sets`` covers."""
    merged: Masks = {}
    for masks in sets:
        for name, mask in masks.items():
            merged[name] = merged[name] | mask.bool() if name in merged else mask.bool().clone()
    return merged


def count_entries(masks: Mapping[str, torch.Tensor]) -> int:
    """How many parameter entries the masks cover."""
    return int(sum(int(mask.sum()) for mask in masks.values()))


def random_units_like(chosen: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """As many units per group as ``chosen`` holds, drawn uniformly: the control for a unit class."""
    drawn = {}
    for key, units in chosen.items():
        picked = torch.zeros_like(units, dtype=torch.bool)
        picked[torch.randperm(units.numel(), generator=generator)[: int(units.sum())]] = True
        drawn[key] = picked
    return drawn


def random_entries_like(masks: Mapping[str, torch.Tensor], generator: torch.Generator) -> Masks:
    """As many entries per tensor as ``masks`` holds, drawn uniformly: the control for a weight set."""
    drawn: Masks = {}
    for name, mask in masks.items():
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=generator)[: int(mask.sum())]] = True
        drawn[name] = flat.reshape(mask.shape).to(mask.device)
    return drawn


def freeze_masked(params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]) -> list:
    """Zero the gradient of every masked entry during training; returns the hook handles to remove.

    A gradient mask, not ``requires_grad=False``: a frozen unit is a slice of a tensor whose other
    entries still train. (With weight decay the optimizer still shrinks frozen entries: train
    frozen units with ``weight_decay=0``.)
    """
    handles = []
    missing = [name for name in masks if name not in params]
    if missing:
        raise ConfigError(f"masks name parameters the model lacks: {missing[:3]}")
    for name, mask in masks.items():
        keep = (~mask.bool()).to(params[name].dtype)
        handles.append(params[name].register_hook(lambda grad, keep=keep: grad * keep.to(grad.device)))
    return handles


def save_masks(path: Path, masks: Mapping[str, Masks]) -> None:
    """Write named mask sets (``{class: masks}``) to one safetensors file."""
    tensors = {f"{label}::{name}": mask.to(torch.uint8).contiguous().cpu() for label, group in masks.items() for name, mask in group.items()}
    write_atomic(path, save(tensors))


def load_masks(path: Path) -> dict[str, Masks]:
    """Read mask sets written by :func:`save_masks`; a missing file is a :class:`ConfigError`."""
    if not Path(path).is_file():
        raise ConfigError(f"unit mask file {path} does not exist (analyze with a unit method writes it)")
    sets: dict[str, Masks] = {}
    for key, tensor in load_file(str(path)).items():
        label, _, name = key.partition("::")
        sets.setdefault(label, {})[name] = tensor.bool()
    return sets


def named_sets(spec: str | None) -> Masks:
    """The union of the sets named by ``FILE:SET[+SET...]`` (e.g. ``run/units.safetensors:scu+cu``;
    ``None`` or empty: no entries)."""
    if not spec:
        return {}
    path, _, labels = spec.rpartition(":")
    if not path or not labels:
        raise ConfigError(f"unit sets are named FILE:SET[+SET...], e.g. run/units.safetensors:scu+cu; got {spec!r}")
    sets = load_masks(Path(path))
    missing = [label for label in labels.split("+") if label not in sets]
    if missing:
        raise ConfigError(f"{path} holds no set {missing}; it holds {sorted(sets)}")
    return union_masks(*(sets[label] for label in labels.split("+")))
