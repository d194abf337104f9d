"""Threat models: perturb a model the way the world might, reversibly and reproducibly.

One interface serves the analyzer (perturb one unit, measure the damage), the evaluator (a grid
of threats, before vs after) and the threat-aware refine objective (the loss *of the perturbed
model*). A threat modifies weights in place and/or installs forward hooks; :func:`threatened`
applies one or more threats to a parameter subset and, on exit, restores every touched weight
by copy from a saved clone, so the model is bit-identical afterwards. Restoring by subtraction
(``w + n - n``) would not be: floating-point rounding leaves drift that accumulates over
thousands of analyzer trials.

All random noise comes from :mod:`zorefine.zo.directions`, one seed per tensor derived from
(threat seed, tensor name): any process can regenerate any tensor's noise alone, and two
tensors of the same shape never share a direction.

This module holds the :class:`Threat` protocol and the helpers the threat families share:
mode names and argument checks, the (out, in) view of a weight matrix (GPT-2's Conv1D is
stored transposed), and report labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from zorefine.errors import ConfigError

__all__ = ["Threat", "Undo", "is_random"]


Undo = Callable[[], None]


@runtime_checkable
class Threat(Protocol):
    """Something that perturbs a model in place.

    ``apply`` modifies the weights in ``params`` in place (the caller saves and restores them)
    and may return an undo callable for effects that are not weights, such as hooks. A threat
    may also define ``touched(params) -> list[str]``, the names of the parameters it will
    modify, so that :func:`threatened` clones only those; without it, all of ``params`` are
    saved.
    """

    @property
    def name(self) -> str:
        """Short label for reports, e.g. ``"wnoise_rel_s0.05_seed1"``."""
        ...

    def apply(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> Undo | None:
        """Perturb ``model`` (only ``params`` for weight threats); return an undo for non-weight effects."""
        ...


def is_random(threat: object) -> bool:
    """Whether ``threat`` is one draw of a random family: it has a seed the caller may re-draw.

    A threat whose ``seed`` is ``None`` (the fine-tuning attack without ``seed=``) runs the same
    way every time and is not re-drawn per noise stream.
    """
    return getattr(threat, "seed", None) is not None


# --------------------------------------------------------------------------- helpers

_MODES = {"absolute": "abs", "relative": "rel", "multiplicative": "mult"}
_MODE_ALIASES = {
    "absolute": "absolute",
    "abs": "absolute",
    "relative": "relative",
    "rel": "relative",
    "multiplicative": "multiplicative",
    "mult": "multiplicative",
    "mul": "multiplicative",
}


def _normalize_mode(kind: str, mode: str) -> str:
    canonical = _MODE_ALIASES.get(str(mode).lower())
    if canonical is None:
        raise ConfigError(f"{kind} mode must be one of {', '.join(_MODES)}; got {mode!r}")
    return canonical


def _check_sigma(kind: str, sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise ConfigError(f"{kind} sigma must be a number, got {sigma!r}")
    if not math.isfinite(sigma) or sigma < 0:
        raise ConfigError(f"{kind} sigma must be finite and >= 0, got {sigma!r}")
    return float(sigma)


def _check_int(kind: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{kind} {field} must be an integer, got {value!r}")
    return value


def _unique(params: Mapping[str, nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    """``params`` items with each tensor once: a tied weight listed twice must be perturbed once."""
    seen: set[int] = set()
    items = []
    for name, param in params.items():
        if id(param) not in seen:
            seen.add(id(param))
            items.append((name, param))
    return items


def _is_conv1d(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is the weight of a transformers ``Conv1D`` (GPT-2), stored as (in, out)."""
    module_path, _, leaf = name.rpartition(".")
    if leaf != "weight":
        return False
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return False
    # By class name: the transformers import is not needed, and forks of Conv1D are caught too.
    return type(module).__name__ == "Conv1D"


def _to_out_in(model: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """View ``weight`` as a 2-D (output features, inputs) matrix.

    A Linear weight is already (out, in); GPT-2's Conv1D stores (in, out), so it is transposed;
    higher-rank weights (convolutions) are flattened after the output dimension.
    """
    if _is_conv1d(model, name) and weight.dim() == 2:
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def _from_out_in(model: nn.Module, name: str, matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_out_in`: back to ``like``'s layout (shape and dtype)."""
    if _is_conv1d(model, name) and like.dim() == 2:
        matrix = matrix.t()
    return matrix.reshape(like.shape).to(like.dtype)


def _matrices(params: Mapping[str, nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    """The weight matrices among ``params``: quantization never touches 1-D norms or biases."""
    return [(name, p) for name, p in _unique(params) if p.dim() >= 2 and p.is_floating_point()]


def _float_label(value: float) -> str:
    return f"{value:g}"
