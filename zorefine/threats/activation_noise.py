"""Activation noise (``anoise:`` specs): Gaussian noise on each decoder layer's output, via forward hooks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zorefine.errors import ConfigError
from zorefine.models.layers import find_decoder_layers
from zorefine.threats.base import _MODES, Undo, _check_int, _check_sigma, _float_label, _normalize_mode
from zorefine.zo.directions import gaussian_direction, tensor_seed

__all__ = ["ActivationNoise"]


# --------------------------------------------------------------------------- activation noise

_TARGETS = ("residual",)


@dataclass(frozen=True)
class ActivationNoise:
    """Gaussian noise on each decoder layer's output hidden states, via forward hooks.

    ``"relative"`` scales the noise by each token's RMS over the hidden dimension (hidden-state
    norms differ by orders of magnitude between tokens, e.g. attention sinks, so a whole-tensor
    RMS would drown most tokens or spare them); ``"absolute"`` adds ``sigma·z``;
    ``"multiplicative"`` sets ``h·(1 + sigma·z)``. Hooks are installed on the layers that hold
    at least one of ``params`` (all layers by default). The k-th call of a layer's hook draws
    ``z`` from ``tensor_seed(seed, f"{layer}#k")``, so every forward gets fresh noise, and the
    same sequence of forwards after applying the threat gets the same noise: reproducible.
    """

    sigma: float
    mode: str = "relative"
    seed: int = 0
    target: str = "residual"
    # The antithetic twin: the same draws with the opposite sign.
    negate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", _check_sigma("anoise", self.sigma))
        object.__setattr__(self, "mode", _normalize_mode("anoise", self.mode))
        _check_int("anoise", "seed", self.seed)
        if self.target not in _TARGETS:
            raise ConfigError(f"anoise target must be one of {', '.join(_TARGETS)}; got {self.target!r}")

    @property
    def name(self) -> str:
        """Report label, e.g. ``"anoise_rel_s0.1_seed0"``."""
        return f"anoise_{_MODES[self.mode]}_s{_float_label(self.sigma)}_seed{self.seed}{'_neg' if self.negate else ''}"

    @property
    def spec(self) -> str:
        """Canonical spec string: ``parse_threat(t.spec) == t``."""
        return f"anoise:{_float_label(self.sigma)}:{self.mode}:seed={self.seed}{':negate=1' if self.negate else ''}"

    def touched(self, params: Mapping[str, nn.Parameter]) -> list[str]:
        """No weights are modified: the noise lives in hooks."""
        return []

    def _noise(self, hidden: torch.Tensor, seed: int) -> torch.Tensor:
        z = gaussian_direction(hidden, seed)
        if self.negate:
            z.neg_()
        # The perturbation is a constant of the forward: no gradient flows through its scale.
        h = hidden.detach().float()
        if self.mode == "absolute":
            delta = self.sigma * z
        elif self.mode == "relative":
            delta = self.sigma * h.pow(2).mean(dim=-1, keepdim=True).sqrt() * z
        else:
            delta = self.sigma * h * z
        return delta.to(hidden.dtype)

    def apply(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> Undo | None:
        """Install the noise hooks; returns the undo that removes them."""
        if self.sigma == 0:
            return None
        layers = find_decoder_layers(model)
        wanted = {id(p) for p in params.values()}
        handles: list[torch.utils.hooks.RemovableHandle] = []
        for index, layer in enumerate(layers.modules):
            if not any(id(p) in wanted for p in layer.parameters()):
                continue
            layer_name = layers.name(index)
            calls = [0]  # per-hook call counter, reset by every apply

            def hook(
                module: nn.Module, inputs: Any, output: Any, layer_name: str = layer_name, calls: list[int] = calls
            ) -> Any:
                seed = tensor_seed(self.seed, f"{layer_name}#{calls[0]}")
                calls[0] += 1
                # Decoder layers return the hidden states, or a tuple starting with them.
                if isinstance(output, torch.Tensor):
                    return output + self._noise(output, seed)
                if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                    return (output[0] + self._noise(output[0], seed), *output[1:])
                raise TypeError(f"cannot add activation noise to {layer_name}'s output of type {type(output).__name__}")

            handles.append(layer.register_forward_hook(hook))

        def undo() -> None:
            for handle in handles:
                handle.remove()

        return undo
