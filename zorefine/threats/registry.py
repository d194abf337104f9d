"""The threat spec language: :func:`parse_threat` maps a spec's kind to its family's parser.

Spec language (:func:`parse_threat`), used in configs::

    wnoise:SIGMA[:MODE][:seed=N][:negate=1]   weight noise; MODE absolute|relative|multiplicative
    anoise:SIGMA[:MODE][:seed=N][:negate=1]   activation noise on each decoder layer's output
                                        (negate=1: the antithetic twin, the same draw times -1)
    rtn:int8|int4[:gN]                  round-to-nearest, per output channel or groups of N
    bnb:int8|nf4|fp4[:bN][:dq]          bitsandbytes LLM.int8 / NF4 / FP4 (blocksize N, double quant)
    aquant:a8|a6|a4[:pPCT]              per-token activation quantization of the decoder's linear
                                        inputs (scale from absmax, or the PCT percentile: clipped)
    w8a8|w4a8|w4a4[:gN][:pPCT]          RTN weights (per channel or groups of N) + quantized activations
    finetune:STEPS[:LR][:bN]            the fine-tuning attack: STEPS AdamW steps on the run's
                                        benign training pairs (default lr 1e-4, batch 8; also
                                        lr=X, batch=N)

To add a threat family: write its class in its own module, a ``_parse_<kind>`` here, one
branch in :func:`parse_threat`, and its form in ``_SPEC_HELP``.
"""

from __future__ import annotations

import re

from zorefine.errors import ConfigError
from zorefine.threats.activation_noise import ActivationNoise
from zorefine.threats.activation_quantization import ActivationQuantization, WeightActivationQuantization
from zorefine.threats.base import Threat
from zorefine.threats.bnb import _BNB_SCHEMES, BnbQuantization
from zorefine.threats.finetune import FineTuneAttack
from zorefine.threats.quantization import RTNQuantization
from zorefine.threats.weight_noise import WeightNoise

__all__ = ["parse_threat"]


# --------------------------------------------------------------------------- spec language

_SPEC_HELP = (
    "valid threat specs: 'wnoise:SIGMA[:absolute|relative|multiplicative][:seed=N][:negate=1]' (e.g. wnoise:0.05, "
    "wnoise:0.05:relative:seed=2), 'anoise:SIGMA[:MODE][:seed=N]' (e.g. anoise:0.1), "
    "'rtn:int8|int4[:gN]' (e.g. rtn:int8, rtn:int4:g128), "
    "'bnb:int8|nf4|fp4[:bN][:dq]' (e.g. bnb:nf4, bnb:fp4:b128), "
    "'aquant:a8|a6|a4[:pPCT]' (e.g. aquant:a8, aquant:a4:p99.9), "
    "'w8a8|w4a8|w4a4[:gN][:pPCT]' (e.g. w8a8, w4a4:g64:p99.9), "
    "'finetune:STEPS[:LR][:bN]' (e.g. finetune:20:1e-4:b8)"
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


def _reject_unknown(spec: str, options: dict[str, str], allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise _spec_error(spec, f"unknown option(s) {', '.join(sorted(unknown))}")


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
    _reject_unknown(spec, options, {"seed", "mode", "sigma", "negate"} | ({"target"} if kind == "anoise" else set()))
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
    _reject_unknown(spec, options, {"bits", "group", "group_size"})
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
    _reject_unknown(spec, options, {"blocksize", "scheme", "double_quant"})
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


_ACT_BITS = re.compile(r"a?(\d+)")
_PERCENTILE = re.compile(r"p(\d+(?:\.\d+)?)")
_WA_KIND = re.compile(r"w(\d+)a(\d+)")


def _parse_clip(spec: str, options: dict[str, str]) -> float | None:
    return _parse_number(spec, options["clip"], "clip") if "clip" in options else None


def _parse_aquant(spec: str, positional: list[str], options: dict[str, str]) -> Threat:
    _reject_unknown(spec, options, {"bits", "clip"})
    bits: int | None = _parse_int(spec, options["bits"], "bits") if "bits" in options else None
    clip = _parse_clip(spec, options)
    for field in positional:
        lowered = field.lower()
        if (match := _ACT_BITS.fullmatch(lowered)) and bits is None:
            bits = int(match.group(1))
        elif (match := _PERCENTILE.fullmatch(lowered)) and clip is None:
            clip = float(match.group(1))
        elif lowered == "absmax" and clip is None:
            continue
        else:
            raise _spec_error(spec, f"unexpected field {field!r} for aquant")
    try:
        return ActivationQuantization(bits=8 if bits is None else bits, clip=clip)
    except ConfigError as exc:
        raise _spec_error(spec, str(exc)) from None


def _parse_weight_activation(spec: str, kind: str, positional: list[str], options: dict[str, str]) -> Threat:
    _reject_unknown(spec, options, {"group", "group_size", "clip"})
    match = _WA_KIND.fullmatch(kind)
    assert match is not None  # parse_threat dispatches only matching kinds here
    group_text = options.get("group", options.get("group_size"))
    group: int | None = _parse_int(spec, group_text, "group size") if group_text is not None else None
    clip = _parse_clip(spec, options)
    for field in positional:
        lowered = field.lower()
        if (found := _GROUP.fullmatch(lowered)) and group is None:
            group = int(found.group(1))
        elif (found := _PERCENTILE.fullmatch(lowered)) and clip is None:
            clip = float(found.group(1))
        elif lowered in ("channel", "per_channel", "per-channel", "absmax"):
            continue
        else:
            raise _spec_error(spec, f"unexpected field {field!r} for {kind}")
    try:
        return WeightActivationQuantization(int(match.group(1)), int(match.group(2)), group, clip)
    except ConfigError as exc:
        raise _spec_error(spec, str(exc)) from None


def _parse_finetune(spec: str, positional: list[str], options: dict[str, str]) -> Threat:
    _reject_unknown(spec, options, {"steps", "lr", "batch", "seed"})
    fields = list(positional)
    steps_text = options.get("steps") or (fields.pop(0) if fields else None)
    if steps_text is None:
        raise _spec_error(spec, "finetune needs a number of steps")
    lr_text, batch_text = options.get("lr"), options.get("batch")
    # Positional forms (finetune:40:5e-5:b8) need no '=', which Hydra's override grammar rejects unquoted.
    for field in fields:
        if (match := _BLOCK.fullmatch(field.lower())) and batch_text is None:
            batch_text = match.group(1)
        elif lr_text is None:
            lr_text = field
        else:
            raise _spec_error(spec, f"unexpected field {field!r} for finetune")
    try:
        return FineTuneAttack(
            steps=_parse_int(spec, steps_text, "steps"),
            lr=_parse_number(spec, lr_text or "1e-4", "lr"),
            batch_size=_parse_int(spec, batch_text or "8", "batch"),
            seed=_parse_int(spec, options["seed"], "seed") if "seed" in options else None,
        )
    except ConfigError as exc:
        raise _spec_error(spec, str(exc)) from None


def parse_threat(spec: str) -> Threat:
    """Build a threat from a config spec such as ``"wnoise:0.05"`` or ``"rtn:int4:g128"``.

    Forms: ``wnoise:SIGMA[:MODE][:seed=N]``, ``anoise:SIGMA[:MODE][:seed=N]``,
    ``rtn:int8|int4[:gN]``, ``bnb:int8|nf4|fp4[:bN][:dq]``, ``aquant:a8|a6|a4[:pPCT]``,
    ``w8a8|w4a8|w4a4[:gN][:pPCT]``, ``finetune:STEPS[:LR][:bN][:seed=N]``; MODE is absolute, relative
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
    if kind == "aquant":
        return _parse_aquant(spec, positional, options)
    if _WA_KIND.fullmatch(kind):
        return _parse_weight_activation(spec, kind, positional, options)
    if kind == "finetune":
        return _parse_finetune(spec, positional, options)
    raise _spec_error(spec, f"unknown threat kind {kind!r}")
