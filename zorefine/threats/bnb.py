"""bitsandbytes weight quantization (``bnb:`` specs): LLM.int8 / NF4 / FP4, simulated in place.

bitsandbytes is an optional dependency, imported lazily on the first :meth:`BnbQuantization.apply`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zorefine.errors import ConfigError
from zorefine.threats.base import _check_int, _from_out_in, _matrices, _to_out_in

__all__ = ["BnbQuantization"]


# --------------------------------------------------------------------------- bitsandbytes

_BNB_SCHEMES = ("int8", "nf4", "fp4")
_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_BNB_DEFAULT_BLOCKSIZE = 64  # bitsandbytes' own default for quantize_4bit


def _bnb_functional() -> Any:
    """Import ``bitsandbytes.functional`` lazily (slow import; optional dependency)."""
    try:
        # bitsandbytes' CPU backend logs a warning at import when the optional `kernels` package
        # is missing; that kernel is a fused 4-bit matmul we never call, so the warning is noise.
        cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
        level = cpu_logger.level
        cpu_logger.setLevel(logging.ERROR)
        try:
            import bitsandbytes.functional as bnb_functional
        finally:
            cpu_logger.setLevel(level)
    except ImportError as exc:
        raise ConfigError(f"bnb threats need the bitsandbytes package ({exc}); install bitsandbytes") from None
    return bnb_functional


@dataclass(frozen=True)
class BnbQuantization:
    """bitsandbytes weight quantization, simulated (quantize, dequantize, write back); CPU or GPU.

    ``"int8"``: LLM.int8 row-wise absmax (``int8_vectorwise_quant``), on the fp16 weight as
    bitsandbytes does when it loads a model in 8 bits; the outlier threshold of LLM.int8 concerns
    activations, not the stored weight, so it plays no part here. ``"nf4"``/``"fp4"``:
    ``quantize_4bit``/``dequantize_4bit`` in blocks of ``blocksize`` (default 64) consecutive
    inputs of each output row, as ``Linear4bit`` stores them; ``double_quant`` also quantizes the
    block scales (QLoRA's ``bnb_4bit_use_double_quant``). Only weight matrices are quantized.
    """

    scheme: str = "nf4"
    blocksize: int | None = None
    double_quant: bool = False

    def __post_init__(self) -> None:
        scheme = str(self.scheme).lower()
        if scheme not in _BNB_SCHEMES:
            raise ConfigError(f"bnb scheme must be one of {', '.join(_BNB_SCHEMES)}; got {self.scheme!r}")
        object.__setattr__(self, "scheme", scheme)
        if scheme == "int8":
            if self.blocksize is not None or self.double_quant:
                raise ConfigError("bnb int8 is row-wise: it takes no blocksize and no double_quant")
            return
        if self.blocksize is None:
            object.__setattr__(self, "blocksize", _BNB_DEFAULT_BLOCKSIZE)
        _check_int("bnb", "blocksize", self.blocksize)
        if self.blocksize not in _BNB_BLOCKSIZES:
            raise ConfigError(
                f"bnb blocksize must be one of {', '.join(map(str, _BNB_BLOCKSIZES))}; got {self.blocksize}"
            )
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"bnb double_quant must be true or false, got {self.double_quant!r}")

    @property
    def name(self) -> str:
        """Report label, e.g. ``"bnb_nf4_b64"`` or ``"bnb_int8"``."""
        if self.scheme == "int8":
            return "bnb_int8"
        return f"bnb_{self.scheme}_b{self.blocksize}" + ("_dq" if self.double_quant else "")

    @property
    def spec(self) -> str:
        """Canonical spec string: ``parse_threat(t.spec) == t``."""
        if self.scheme == "int8":
            return "bnb:int8"
        return f"bnb:{self.scheme}:b{self.blocksize}" + (":dq" if self.double_quant else "")

    def touched(self, params: Mapping[str, nn.Parameter]) -> list[str]:
        """Names of the weight matrices :meth:`apply` quantizes."""
        return [name for name, _ in _matrices(params)]

    @torch.no_grad()
    def apply(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        """Quantize and dequantize every weight matrix in ``params`` in place with bitsandbytes."""
        functional = _bnb_functional()
        for name, param in _matrices(params):
            matrix = _to_out_in(model, name, param.detach())
            if self.scheme == "int8":
                dequant = self._int8(functional, matrix)
            else:
                dequant = self._four_bit(functional, matrix)
            param.copy_(_from_out_in(model, name, dequant, param))
        return None

    def _int8(self, functional: Any, matrix: torch.Tensor) -> torch.Tensor:
        # bitsandbytes casts weights to fp16 before int8 quantization (and its CUDA kernel
        # accepts only fp16), so do the same on every device.
        half = matrix.to(torch.float16).contiguous()
        quantized, row_stats, _ = functional.int8_vectorwise_quant(half, threshold=0.0)
        dequant = functional.int8_vectorwise_dequant(quantized, row_stats)
        # An all-zero row has absmax 0 and the reference kernel divides by it: force it to zero.
        return torch.where((row_stats > 0).unsqueeze(-1), dequant, torch.zeros_like(dequant))

    def _four_bit(self, functional: Any, matrix: torch.Tensor) -> torch.Tensor:
        # Quantized as one flat row of (out*in) values, padded to even length with a zero. Why:
        # bitsandbytes 0.50's native CPU dequantize_4bit returns wrong values for 2-D inputs whose
        # blocks span rows (blocksize > row length, e.g. 64x128 with blocksize 256) and falls back
        # to a torch.compile'd path for odd last dimensions. The flat layout gives exactly the
        # same blocks (blocks run over the row-major flattening either way), a zero pad cannot
        # change a block's absmax, and the result matches the reference implementation.
        flat = matrix.contiguous().reshape(-1)
        numel = flat.numel()
        if numel % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        quantized, state = functional.quantize_4bit(
            flat, blocksize=self.blocksize, compress_statistics=self.double_quant, quant_type=self.scheme
        )
        dequant = functional.dequantize_4bit(quantized, state)
        return dequant.reshape(-1)[:numel].reshape(matrix.shape)
