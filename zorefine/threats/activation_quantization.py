"""Activation quantization (``aquant:`` specs): fake-quantize the inputs of the decoder's linear layers.

Deployments that quantize activations (W8A8, W4A4) round the input of every matrix multiply to
a few bits per token. This simulates it with forward pre-hooks on each ``nn.Linear`` (and GPT-2
``Conv1D``) inside the decoder layers: per token, a symmetric scale from the token's absmax, or
from a percentile of its absolute values (outliers are then clipped, as SmoothQuant-style
deployments do), then round to ``-qmax..qmax`` and dequantize.

The quantized input is written as ``x + (q(x) - x).detach()``: the forward value is exactly the
quantized one, and first-order methods get the straight-through gradient. Zeroth-order refinement
needs no estimator at all: it reads the loss of the quantized model directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zorefine.errors import ConfigError
from zorefine.models.neurons import decoder_linears
from zorefine.threats.base import Undo, _check_int, _float_label
from zorefine.threats.quantization import RTNQuantization

__all__ = ["ACTIVATION_BITS", "ActivationQuantization", "WeightActivationQuantization", "fake_quantize_per_token", "linear_modules"]

ACTIVATION_BITS = (4, 6, 8)


def fake_quantize_per_token(x: torch.Tensor, bits: int, clip: float | None = None) -> torch.Tensor:
    """Symmetric per-token (last dimension) quantize-dequantize of ``x``, computed in float32.

    ``clip`` is a percentile in (0, 100): the scale comes from that quantile of each token's
    absolute values and larger values saturate; ``None`` uses the absmax (nothing saturates).
    """
    qmax = 2 ** (bits - 1) - 1
    magnitude = x.detach().float().abs()
    if clip is None:
        bound = magnitude.amax(dim=-1, keepdim=True)
    else:
        # kthvalue is exact and, unlike torch.quantile, has no input-size limit.
        k = max(1, min(magnitude.shape[-1], round(clip / 100 * magnitude.shape[-1])))
        bound = magnitude.kthvalue(k, dim=-1, keepdim=True).values
    scale = bound / qmax
    # An all-zero token has scale 0; dividing by 1 instead keeps it exactly zero, not NaN.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = (torch.round(x.float() / safe).clamp_(-qmax, qmax) * scale).to(x.dtype)
    return x + (quantized - x).detach()


def linear_modules(model: nn.Module, params: Mapping[str, nn.Parameter]) -> list[tuple[str, nn.Module]]:
    """The decoder layers' linear maps (``nn.Linear``, GPT-2 ``Conv1D``) whose weight is in ``params``."""
    wanted = {id(p) for p in params.values()}
    return [(name, module) for name, module in decoder_linears(model).items() if id(module.weight) in wanted]


@dataclass(frozen=True)
class ActivationQuantization:
    """Per-token symmetric fake quantization of the inputs of the decoder's linear layers.

    Hooks go on the linear layers whose weight is in ``params`` (all of them by default), so the
    analyzer can measure one layer's or one module's sensitivity to activation quantization.
    Deterministic: no noise, no seed. No weight is touched.
    """

    bits: int = 8
    # Percentile of |x| per token that sets the scale (e.g. 99.9); None = absmax.
    clip: float | None = None

    def __post_init__(self) -> None:
        _check_int("aquant", "bits", self.bits)
        if self.bits not in ACTIVATION_BITS:
            raise ConfigError(f"aquant bits must be one of {', '.join(map(str, ACTIVATION_BITS))}, got {self.bits}")
        if self.clip is not None and not 0 < float(self.clip) < 100:
            raise ConfigError(f"aquant clip must be a percentile strictly between 0 and 100, got {self.clip}")

    @property
    def name(self) -> str:
        """Report label, e.g. ``"aquant_a8"`` or ``"aquant_a4_p99.9"``."""
        return f"aquant_a{self.bits}" + (f"_p{_float_label(self.clip)}" if self.clip is not None else "")

    @property
    def spec(self) -> str:
        """Canonical spec string: ``parse_threat(t.spec) == t``."""
        return f"aquant:a{self.bits}" + (f":p{_float_label(self.clip)}" if self.clip is not None else "")

    def touched(self, params: Mapping[str, nn.Parameter]) -> list[str]:
        """No weights are modified: the quantization lives in hooks."""
        return []

    def apply(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> Undo | None:
        """Install the quantizing pre-hooks; returns the undo that removes them."""
        modules = linear_modules(model, params)

        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
            return (fake_quantize_per_token(inputs[0], self.bits, self.clip), *inputs[1:])

        handles = [module.register_forward_pre_hook(hook) for _, module in modules]

        def undo() -> None:
            for handle in handles:
                handle.remove()

        return undo


@dataclass(frozen=True)
class WeightActivationQuantization:
    """``WxAy``: round-to-nearest weights (per channel or per group) and per-token quantized activations.

    The deployment formats W8A8, W4A8 and W4A4 in one threat: the weights in ``params`` are
    quantized in place (see :class:`~zorefine.threats.quantization.RTNQuantization`) and the
    inputs of the same linear layers are quantized by hooks.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    group_size: int | None = None
    clip: float | None = None

    def __post_init__(self) -> None:
        # Building the parts checks every field with the parts' own messages.
        self.parts()

    def parts(self) -> tuple[RTNQuantization, ActivationQuantization]:
        """The weight and the activation half of the threat."""
        return RTNQuantization(self.weight_bits, self.group_size), ActivationQuantization(self.activation_bits, self.clip)

    @property
    def name(self) -> str:
        """Report label, e.g. ``"w4a4"`` or ``"w4a8_g64_p99.9"``."""
        group = f"_g{self.group_size}" if self.group_size else ""
        clip = f"_p{_float_label(self.clip)}" if self.clip is not None else ""
        return f"w{self.weight_bits}a{self.activation_bits}{group}{clip}"

    @property
    def spec(self) -> str:
        """Canonical spec string: ``parse_threat(t.spec) == t``."""
        group = f":g{self.group_size}" if self.group_size else ""
        clip = f":p{_float_label(self.clip)}" if self.clip is not None else ""
        return f"w{self.weight_bits}a{self.activation_bits}{group}{clip}"

    def touched(self, params: Mapping[str, nn.Parameter]) -> list[str]:
        """The weight matrices the weight half quantizes."""
        return self.parts()[0].touched(params)

    def apply(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> Undo | None:
        """Quantize the weights in place, then install the activation hooks; returns their undo."""
        weights, activations = self.parts()
        weights.apply(model, params)
        return activations.apply(model, params)
