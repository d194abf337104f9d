"""Unit ablation: zero a set of parameter entries (a unit class, a weight set), restored exactly.

Not a perturbation from the world but the analyzer's probe of what a unit set carries: the
safety-unit papers validate their sets by removing them and watching refusal. As a threat it
goes through :func:`zorefine.threats.threatened`, so the weights come back bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["MaskAblation"]


@dataclass(frozen=True, eq=False)
class MaskAblation:
    """Zero every entry that ``masks`` (parameter name -> bool tensor of its shape) marks."""

    masks: Mapping[str, torch.Tensor] = field(repr=False)
    label: str = "units"

    @property
    def name(self) -> str:
        """``ablate_<label>``."""
        return f"ablate_{self.label}"

    def touched(self, params: Mapping[str, nn.Parameter]) -> list[str]:
        """The masked parameters among ``params``."""
        return [name for name in self.masks if name in params]

    def apply(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        """Zero the masked entries in place (the caller restores them)."""
        for name in self.touched(params):
            params[name].masked_fill_(self.masks[name].to(params[name].device), 0)
