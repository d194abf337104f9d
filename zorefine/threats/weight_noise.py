"""Weight noise (``wnoise:`` specs): Gaussian noise on weights, one seeded direction per tensor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from zorefine.threats.base import _MODES, _check_int, _check_sigma, _float_label, _normalize_mode, _unique
from zorefine.zo.directions import gaussian_direction, tensor_rms, tensor_seed

__all__ = ["WeightNoise"]


# --------------------------------------------------------------------------- weight noise


@dataclass(frozen=True)
class WeightNoise:
    """Gaussian noise on weights, one independent seeded direction per tensor.

    ``mode``: ``"absolute"`` adds ``sigma·z``; ``"relative"`` adds ``sigma·rms(w)·z`` (the same
    *relative* damage to every tensor whatever its scale); ``"multiplicative"`` sets
    ``w·(1 + sigma·z)`` (zero weights stay zero). ``z = gaussian_direction(w,
    tensor_seed(seed, name))``. ``negate`` uses ``-z``: the antithetic twin of the same draw,
    which cancels the first-order term when both are averaged.
    """

    sigma: float
    mode: str = "relative"
    seed: int = 0
    negate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", _check_sigma("wnoise", self.sigma))
        object.__setattr__(self, "mode", _normalize_mode("wnoise", self.mode))
        _check_int("wnoise", "seed", self.seed)

    @property
    def name(self) -> str:
        """Report label, e.g. ``"wnoise_rel_s0.05_seed1"``."""
        return f"wnoise_{_MODES[self.mode]}_s{_float_label(self.sigma)}_seed{self.seed}{'_neg' if self.negate else ''}"

    @property
    def spec(self) -> str:
        """Canonical spec string: ``parse_threat(t.spec) == t``."""
        return f"wnoise:{_float_label(self.sigma)}:{self.mode}:seed={self.seed}{':negate=1' if self.negate else ''}"

    def touched(self, params: Mapping[str, nn.Parameter]) -> list[str]:
        """Names of the parameters :meth:`apply` modifies (all floating tensors, none if sigma is 0)."""
        if self.sigma == 0:
            return []
        return [name for name, p in _unique(params) if p.is_floating_point()]

    @torch.no_grad()
    def apply(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        """Add the noise to every tensor in ``params`` in place."""
        for name in self.touched(params):
            param = params[name]
            # Drawn and combined in float32, then cast once: a bf16 weight gets the same
            # perturbation as its fp32 master copy, up to the final rounding.
            z = gaussian_direction(param, tensor_seed(self.seed, name))
            if self.negate:
                z.neg_()
            weight = param.detach().float()
            if self.mode == "absolute":
                noisy = weight + self.sigma * z
            elif self.mode == "relative":
                noisy = weight + (self.sigma * tensor_rms(weight)) * z
            else:
                noisy = weight * (1.0 + self.sigma * z)
            param.copy_(noisy.to(param.dtype))
        return None
