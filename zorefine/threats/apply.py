"""Applying threats: the :func:`threatened` context manager, which perturbs and then restores exactly.

Every tensor a threat will touch is cloned first and restored by copy on exit (not by
subtraction, whose rounding drift would accumulate), and the threats' hooks are removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from zorefine.errors import ConfigError
from zorefine.models.layers import decoder_parameters
from zorefine.threats.base import Threat, Undo
from zorefine.threats.registry import parse_threat

__all__ = ["threatened"]


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
