"""Round-to-nearest weight quantization (``rtn:`` specs), simulated in place.

The bitsandbytes schemes are in :mod:`zorefine.threats.bnb`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from zorefine.errors import ConfigError
from zorefine.threats.base import _check_int, _from_out_in, _matrices, _to_out_in

__all__ = ["RTNQuantization"]


# --------------------------------------------------------------------------- round-to-nearest


@dataclass(frozen=True)
class RTNQuantization:
    """Symmetric round-to-nearest weight quantization, simulated (quantize, dequantize, write back).

    Scales are per output channel (``group_size=None``) or per group of ``group_size``
    consecutive inputs of each output channel; levels are ``-qmax..qmax`` with
    ``qmax = 2**(bits-1) - 1``. Only weight matrices (>= 2-D) are quantized, never norms or
    biases. "Output channel" means output *feature*: GPT-2's Conv1D weights, stored (in, out),
    are transposed first.
    """

    bits: int = 8
    group_size: int | None = None

    def __post_init__(self) -> None:
        _check_int("rtn", "bits", self.bits)
        if self.bits not in (4, 8):
            raise ConfigError(f"rtn bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None:
            _check_int("rtn", "group_size", self.group_size)
            if self.group_size <= 0:
                raise ConfigError(f"rtn group_size must be positive, got {self.group_size}")

    @property
    def name(self) -> str:
        """Report label, e.g. ``"rtn_int4_g128"`` (no group suffix: per channel)."""
        group = f"_g{self.group_size}" if self.group_size else ""
        return f"rtn_int{self.bits}{group}"

    @property
    def spec(self) -> str:
        """Canonical spec string: ``parse_threat(t.spec) == t``."""
        group = f":g{self.group_size}" if self.group_size else ""
        return f"rtn:int{self.bits}{group}"

    def touched(self, params: Mapping[str, nn.Parameter]) -> list[str]:
        """Names of the weight matrices :meth:`apply` quantizes."""
        return [name for name, _ in _matrices(params)]

    @torch.no_grad()
    def apply(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        """Quantize and dequantize every weight matrix in ``params`` in place."""
        matrices = [(name, p, _to_out_in(model, name, p.detach())) for name, p in _matrices(params)]
        if self.group_size is not None:
            # Checked for every tensor before any is modified: fail whole or not at all.
            for name, _, matrix in matrices:
                if matrix.shape[1] % self.group_size:
                    raise ConfigError(
                        f"rtn group_size {self.group_size} does not divide the input dimension "
                        f"{matrix.shape[1]} of {name}; use a divisor or per-channel (no group)"
                    )
        qmax = 2 ** (self.bits - 1) - 1
        for name, param, matrix in matrices:
            rows, cols = matrix.shape
            group = self.group_size or cols
            # Scales computed in float32: a bf16 absmax/qmax would add its own rounding error.
            grouped = matrix.float().reshape(rows, cols // group, group)
            scale = grouped.abs().amax(dim=-1, keepdim=True) / qmax
            # An all-zero group has scale 0; dividing by 1 instead keeps it exactly zero, not NaN.
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            dequant = torch.round(grouped / safe).clamp_(-qmax, qmax) * scale
            param.copy_(_from_out_in(model, name, dequant.reshape(rows, cols), param))
        return None
