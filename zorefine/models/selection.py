"""Selection policies: which units the refiner spends its budget on, and the saved selection.

Policies, applied to the analyzer's ranking (most fragile first):

- ``top_k``: the ``top_k`` most fragile units;
- ``budget``: the longest prefix of the ranking whose parameters add up to at most
  ``budget`` × all decoder parameters (at least one unit);
- ``threshold``: every unit whose score is at least ``threshold``;
- ``names``: units whose name matches one of ``names`` exactly or as a regular expression
  (``re.fullmatch``), whatever their score.

A unit set (``refine.units_file``: neurons, channels, heads or single weights from a unit
method's ``units.safetensors``) is a selection of granularity ``entries``: only those entries
of its tensors are refined.

The chosen selection is written to ``selection.json`` with the granularity, the policy, the
units, their layers and every parameter name, so refine and later runs
(``refine.selection_file=/path/to/selection.json``) reuse exactly the same weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from zorefine.errors import ConfigError
from zorefine.models.fingerprint import file_digest
from zorefine.models.layers import find_decoder_layers
from zorefine.files import write_json_atomic
from zorefine.models.param_masks import load_masks
from zorefine.models.units import Unit, union_parameters, units_by_name

POLICIES = ("top_k", "budget", "threshold", "names")


@dataclass
class SelectionPolicy:
    """How many of the ranked units to select (see the module docstring)."""

    policy: str = "top_k"
    top_k: int = 2
    budget: float = 0.25
    threshold: float = 0.0
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"selection policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "top_k" and self.top_k < 1:
            raise ConfigError("selection top_k must be >= 1")
        if self.policy == "budget" and not 0 < self.budget <= 1:
            raise ConfigError("selection budget must be a fraction in (0, 1]")
        if self.policy == "names" and not self.names:
            raise ConfigError("selection policy 'names' needs a non-empty names list")


def _matching(pattern: str, names: Sequence[str]) -> list[str]:
    if pattern in names:
        return [pattern]
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"selection name {pattern!r} is not a valid regular expression: {exc}") from None
    return [name for name in names if compiled.fullmatch(name)]


def select_units(ranking: Sequence[str], scores: dict[str, float], sizes: dict[str, int], policy: SelectionPolicy) -> list[str]:
    """The selected unit names, most fragile first.

    Args:
        ranking: unit names, most fragile first.
        scores: each unit's fragility score (for ``threshold``).
        sizes: each unit's parameter count (for ``budget``).
        policy: the policy.
    """
    if policy.policy == "top_k":
        return list(ranking[: policy.top_k])
    if policy.policy == "budget":
        allowed = policy.budget * sum(sizes[unit] for unit in ranking)
        chosen, used = [], 0
        for unit in ranking:
            # A prefix of the ranking: skipping a large unit to fit smaller, less fragile
            # ones would select by size rather than fragility.
            if chosen and used + sizes[unit] > allowed:
                break
            chosen.append(unit)
            used += sizes[unit]
        return chosen
    if policy.policy == "threshold":
        chosen = [unit for unit in ranking if scores[unit] >= policy.threshold]
        if not chosen:
            best = max(scores.values()) if scores else float("nan")
            raise ConfigError(f"no unit scored >= threshold {policy.threshold} (the best scored {best:.4g})")
        return chosen
    chosen = []
    for pattern in policy.names:
        matches = _matching(pattern, ranking)
        if not matches:
            raise ConfigError(f"selection name {pattern!r} matches no unit; units look like {ranking[0]!r}")
        chosen += [unit for unit in matches if unit not in chosen]
    return chosen


@dataclass
class Selection:
    """The saved outcome of a selection: what refine reads."""

    granularity: str
    units: list[str]
    layers: list[int]
    parameters: list[str]
    policy: dict[str, Any]
    rank_by: str | None = None
    # A unit set (granularity "entries"): the units.safetensors it comes from, the set, its digest.
    entries_file: str | None = None
    entries_set: str | None = None
    entries_digest: str | None = None

    @classmethod
    def of_entries(cls, path: Path, label: str, model: nn.Module) -> "Selection":
        """The selection of one set of a ``units.safetensors``: only its entries are refined."""
        sets = load_masks(path)
        if label not in sets:
            raise ConfigError(f"unit set {label!r} is not in {path}; it holds {sorted(sets)}")
        names = [name for name, mask in sets[label].items() if bool(mask.any())]
        if not names:
            raise ConfigError(f"unit set {label!r} of {path} is empty")
        layers = find_decoder_layers(model)
        in_layer = [i for i in range(len(layers)) if any(n.startswith(layers.name(i) + ".") for n in names)]
        return cls("entries", [label], in_layer, names, {"policy": "units_file"}, None, str(Path(path).resolve()), label, file_digest(path))

    def entry_indices(self) -> dict[str, torch.Tensor]:
        """Flat positions of the selected entries per parameter (empty for whole-tensor selections)."""
        if self.entries_file is None:
            return {}
        if self.entries_digest is not None and file_digest(self.entries_file) != self.entries_digest:
            raise ConfigError(f"{self.entries_file} changed since the selection was made from it")
        masks = load_masks(Path(self.entries_file))[self.entries_set]
        return {name: masks[name].reshape(-1).nonzero().squeeze(1) for name in self.parameters}

    @classmethod
    def of(cls, units: Sequence[Unit], granularity: str, policy: SelectionPolicy, rank_by: str | None) -> "Selection":
        """The selection made of ``units``."""
        return cls(
            granularity=granularity,
            units=[u.name for u in units],
            layers=sorted({u.layer for u in units}),
            parameters=list(union_parameters(list(units))),
            policy=asdict(policy),
            rank_by=rank_by,
        )

    def save(self, path: Path) -> None:
        """Write the selection as JSON (atomically)."""
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "Selection":
        """Read a saved selection; a missing or malformed file is a :class:`ConfigError`."""
        if not path.is_file():
            raise ConfigError(f"selection file {path} does not exist")
        try:
            data = json.loads(path.read_text())
            return cls(**{key: data[key] for key in ("granularity", "units", "layers", "parameters", "policy")}, rank_by=data.get("rank_by"),
                       **{key: data.get(key) for key in ("entries_file", "entries_set", "entries_digest")})
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a zorefine selection file ({type(exc).__name__}: {exc})") from None

    def resolve(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The selected parameters of ``model``, by name; every saved name must exist."""
        named = dict(model.named_parameters())
        missing = [name for name in self.parameters if name not in named]
        if missing:
            raise ConfigError(f"the selection names parameters this model lacks: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        return {name: named[name] for name in self.parameters}

    def unit_objects(self, model: nn.Module) -> list[Unit]:
        """The selected units of ``model`` (a unit set is one unit holding all its tensors)."""
        if self.granularity == "entries":
            return [Unit(self.units[0], min(self.layers), "entries", self.resolve(model))]
        return units_by_name(model, self.units)
