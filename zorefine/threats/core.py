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

Spec language (:func:`parse_threat`), used in configs::

    wnoise:SIGMA[:MODE][:seed=N][:negate=1]   weight noise; MODE absolute|relative|multiplicative
    anoise:SIGMA[:MODE][:seed=N][:negate=1]   activation noise on each decoder layer's output
                                        (negate=1: the antithetic twin, the same draw times -1)
    rtn:int8|int4[:gN]                  round-to-nearest, per output channel or groups of N
    bnb:int8|nf4|fp4[:bN][:dq]          bitsandbytes LLM.int8 / NF4 / FP4 (blocksize N, double quant)
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from zorefine.errors import ConfigError
from zorefine.models.layers import decoder_parameters, find_decoder_layers
from zorefine.zo.directions import gaussian_direction, tensor_rms, tensor_seed

__all__ = [
    "ActivationNoise",
    "BnbQuantization",
    "RTNQuantization",
    "Threat",
    "WeightNoise",
    "parse_threat",
    "threatened",
]

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


# --------------------------------------------------------------------------- context manager


def _as_threat_list(threats: Threat | str | Sequence[Threat | str]) -> list[Threat]:
    items: Sequence[Threat | str] = [threats] if isinstance(threats, (str, Threat)) else threats
    result: list[Threat] = []
    for item in items:
        threat = parse_threat(item) if isinstance(item, str) else item
        if not isinstance(threat, Threat):
            raise ConfigError(f"not a threat: {item!r}")
        result.append(threat)
    return result


@contextlib.contextmanager
def threatened(
    model: nn.Module,
    threats: Threat | str | Sequence[Threat | str],
    params: Mapping[str, nn.Parameter] | None = None,
) -> Iterator[None]:
    """Apply ``threats`` (in order; they compose) to ``params`` for the duration of the block.

    ``params`` defaults to all decoder-layer parameters; threats may be objects or spec strings.
    Before each threat runs, the tensors it will touch are cloned (only those, and each once);
    on exit, also on an exception, hooks are removed and every touched tensor is restored by
    copy from its clone, so the weights are bit-identical to before. Peak extra memory is one
    copy of the touched tensors, on their own device.
    """
    threat_list = _as_threat_list(threats)
    if params is None:
        params = decoder_parameters(model)
    saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    undos: list[Undo] = []
    try:
        with torch.no_grad():
            for threat in threat_list:
                touched_fn = getattr(threat, "touched", None)
                # A threat that does not say what it touches may touch anything in params.
                names = touched_fn(params) if callable(touched_fn) else list(params)
                for name in names:
                    param = params[name]
                    if id(param) not in saved:
                        saved[id(param)] = (param, param.detach().clone())
                undo = threat.apply(model, params)
                if undo is not None:
                    undos.append(undo)
        yield
    finally:
        errors: list[BaseException] = []
        for undo in reversed(undos):
            try:
                undo()
            except Exception as exc:  # keep going: the weights must be restored regardless
                errors.append(exc)
        with torch.no_grad():
            for param, original in saved.values():
                param.copy_(original)
        if errors:
            raise errors[0]


# --------------------------------------------------------------------------- spec language

_SPEC_HELP = (
    "valid threat specs: 'wnoise:SIGMA[:absolute|relative|multiplicative][:seed=N][:negate=1]' (e.g. wnoise:0.05, "
    "wnoise:0.05:relative:seed=2), 'anoise:SIGMA[:MODE][:seed=N]' (e.g. anoise:0.1), "
    "'rtn:int8|int4[:gN]' (e.g. rtn:int8, rtn:int4:g128), "
    "'bnb:int8|nf4|fp4[:bN][:dq]' (e.g. bnb:nf4, bnb:fp4:b128)"
)


def _spec_error(spec: str, problem: str) -> ConfigError:
    return ConfigError(f"bad threat spec {spec!r}: {problem}; {_SPEC_HELP}")


def _split(spec: str) -> tuple[str, list[str], dict[str, str]]:
    parts = [part.strip() for part in spec.strip().split(":")]
    if not parts[0] or any(not part for part in parts):
        raise _spec_error(spec, "empty field")
    positional: list[str] = []
    options: dict[str, str] = {}
    for part in parts[1:]:
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip().lower()
            if key in options:
                raise _spec_error(spec, f"option {key!r} given twice")
            options[key] = value.strip()
        else:
            positional.append(part)
    return parts[0].lower(), positional, options


def _parse_number(spec: str, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _spec_error(spec, f"{what} must be a number, got {text!r}") from None


def _parse_int(spec: str, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _spec_error(spec, f"{what} must be an integer, got {text!r}") from None


def _parse_noise(spec: str, kind: str, positional: list[str], options: dict[str, str]) -> Threat:
    unknown = set(options) - {"seed", "mode", "sigma", "negate"} - ({"target"} if kind == "anoise" else set())
    if unknown:
        raise _spec_error(spec, f"unknown option(s) {', '.join(sorted(unknown))}")
    if len(positional) > 2:
        raise _spec_error(spec, f"too many fields for {kind}")
    sigma_text = options.get("sigma", positional[0] if positional else None)
    if sigma_text is None:
        raise _spec_error(spec, f"{kind} needs a sigma")
    rest = positional[1:] if "sigma" not in options else positional
    if "mode" in options and rest:
        raise _spec_error(spec, "mode given twice")
    mode = options.get("mode", rest[0] if rest else "relative")
    seed = _parse_int(spec, options["seed"], "seed") if "seed" in options else 0
    sigma = _parse_number(spec, sigma_text, "sigma")
    negate_text = options.get("negate", "0").lower()
    if negate_text not in ("0", "1", "true", "false"):
        raise _spec_error(spec, f"negate must be 0 or 1, got {negate_text!r}")
    negate = negate_text in ("1", "true")
    try:
        if kind == "wnoise":
            return WeightNoise(sigma=sigma, mode=mode, seed=seed, negate=negate)
        return ActivationNoise(sigma=sigma, mode=mode, seed=seed, target=options.get("target", "residual"), negate=negate)
    except ConfigError as exc:
        raise _spec_error(spec, str(exc)) from None


_BITS = re.compile(r"(?:int|w)?(4|8)")
_GROUP = re.compile(r"g(\d+)")
_BLOCK = re.compile(r"b(\d+)")


def _parse_rtn(spec: str, positional: list[str], options: dict[str, str]) -> Threat:
    unknown = set(options) - {"bits", "group", "group_size"}
    if unknown:
        raise _spec_error(spec, f"unknown option(s) {', '.join(sorted(unknown))}")
    bits: int | None = _parse_int(spec, options["bits"], "bits") if "bits" in options else None
    group_text = options.get("group", options.get("group_size"))
    group: int | None = _parse_int(spec, group_text, "group size") if group_text is not None else None
    for field in positional:
        lowered = field.lower()
        if (match := _BITS.fullmatch(lowered)) and bits is None:
            bits = int(match.group(1))
        elif (match := _GROUP.fullmatch(lowered)) and group is None:
            group = int(match.group(1))
        elif lowered in ("channel", "per_channel", "per-channel") and group is None:
            continue
        else:
            raise _spec_error(spec, f"unexpected field {field!r} for rtn")
    try:
        return RTNQuantization(bits=8 if bits is None else bits, group_size=group)
    except ConfigError as exc:
        raise _spec_error(spec, str(exc)) from None


def _parse_bnb(spec: str, positional: list[str], options: dict[str, str]) -> Threat:
    unknown = set(options) - {"blocksize", "scheme", "double_quant"}
    if unknown:
        raise _spec_error(spec, f"unknown option(s) {', '.join(sorted(unknown))}")
    scheme = options.get("scheme")
    blocksize = _parse_int(spec, options["blocksize"], "blocksize") if "blocksize" in options else None
    flag = options.get("double_quant", "false").lower()
    if flag not in ("1", "true", "yes", "0", "false", "no"):
        raise _spec_error(spec, f"double_quant must be true or false, got {flag!r}")
    double_quant = flag in ("1", "true", "yes")
    for field in positional:
        lowered = field.lower()
        if lowered in _BNB_SCHEMES and scheme is None:
            scheme = lowered
        elif (match := _BLOCK.fullmatch(lowered)) and blocksize is None:
            blocksize = int(match.group(1))
        elif lowered in ("dq", "double_quant"):
            double_quant = True
        else:
            raise _spec_error(spec, f"unexpected field {field!r} for bnb")
    try:
        return BnbQuantization(scheme=scheme or "nf4", blocksize=blocksize, double_quant=double_quant)
    except ConfigError as exc:
        raise _spec_error(spec, str(exc)) from None


def parse_threat(spec: str) -> Threat:
    """Build a threat from a config spec such as ``"wnoise:0.05"`` or ``"rtn:int4:g128"``.

    Forms: ``wnoise:SIGMA[:MODE][:seed=N]``, ``anoise:SIGMA[:MODE][:seed=N]``,
    ``rtn:int8|int4[:gN]``, ``bnb:int8|nf4|fp4[:bN][:dq]``; MODE is absolute, relative
    (default) or multiplicative. Every threat's ``spec`` property parses back to an equal
    threat. Raises :class:`ConfigError` listing the valid forms on a bad spec.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"a threat spec must be a string, got {spec!r}; {_SPEC_HELP}")
    kind, positional, options = _split(spec)
    if kind in ("wnoise", "anoise"):
        return _parse_noise(spec, kind, positional, options)
    if kind == "rtn":
        return _parse_rtn(spec, positional, options)
    if kind == "bnb":
        return _parse_bnb(spec, positional, options)
    raise _spec_error(spec, f"unknown threat kind {kind!r}")
