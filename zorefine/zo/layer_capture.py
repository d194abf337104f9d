"""Capture and replay of the prefix layers' outputs, by giving each layer its own ``forward``.

The layer half of :class:`zorefine.zo.prefix_cache.PrefixCache` (that module's docstring explains
the mechanism and its guarantees): under capture, each prefix layer's temporary instance
``forward`` runs the original one and records a detached clone of its output; under replay it
returns the record without computing. It also holds the checks made when a replayed call
enters layer 0 (its hidden-state input, the version counters of the prefix parameters and of
the records), and :class:`StaleCacheError`, which every guard of the cache raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

_MISSING = object()


class _PrefixComputed(Exception):
    """Raised by the last prefix layer in :meth:`PrefixCache.capture_prefix` to skip the suffix."""


class StaleCacheError(RuntimeError):
    """A prefix cache was used without a capture, or on inputs/weights it was not captured for."""


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict, keeping the structure and type."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        mapped = [_map_tensors(item, fn) for item in obj]
        # Named tuples are rebuilt from positional fields; plain tuples from an iterable.
        return type(obj)(*mapped) if hasattr(obj, "_fields") else type(obj)(mapped)
    if isinstance(obj, list):
        return [_map_tensors(item, fn) for item in obj]
    if isinstance(obj, dict):
        # A dict subclass such as transformers' ModelOutput keeps its type through copy + update.
        out = obj.copy()
        for key, value in obj.items():
            out[key] = _map_tensors(value, fn)
        return out
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(obj, lambda t: found.append(t) or t)
    return found


def _version(tensor: torch.Tensor) -> int | None:
    # Inference tensors (made under torch.inference_mode) have no version counter.
    try:
        return tensor._version
    except RuntimeError:
        return None


def _hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The hidden-states argument of a decoder layer call, found without knowing the layer."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return value
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


class _Record:
    """What one model call left behind during capture."""

    def __init__(self) -> None:
        self.outputs: dict[int, Any] = {}  # layer index -> recorded output (detached clone)
        self.versions: list[tuple[torch.Tensor, int | None]] = []  # recorded tensors, their versions
        self.layer0_input: torch.Tensor | None = None
        self.layer0_shape: tuple[int, ...] | None = None


class LayerCapture:
    """Patching of the prefix layers for :class:`~zorefine.zo.prefix_cache.PrefixCache` (a mixin).

    The methods read and update the state that ``PrefixCache.__init__`` and its contexts set up.
    """

    first_layer: int
    keep_all: bool
    verify: bool
    _layers: list[nn.Module]
    _records: list[_Record] | None
    _param_versions: list[tuple[str, torch.Tensor, int]]
    _stop_after_prefix: bool
    _layer_calls: list[int]

    @contextlib.contextmanager
    def _patched(self, make_forward: Callable[[int, Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
        """Give each prefix layer an instance ``forward``; put back exactly what was there on exit."""
        saved: list[tuple[nn.Module, Any]] = []
        try:
            for index, layer in enumerate(self._layers):
                # The instance dict, not getattr: we must restore "no instance attribute" as such,
                # and keep an instance forward someone else installed (accelerate hooks).
                previous = layer.__dict__.get("forward", _MISSING)
                original = layer.forward
                saved.append((layer, previous))
                layer.forward = make_forward(index, original)
            yield
        finally:
            for layer, previous in reversed(saved):
                if previous is _MISSING:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = previous

    def _check_parameters(self) -> None:
        for name, param, version in self._param_versions:
            if param._version != version:
                raise StaleCacheError(
                    f"parameter {name} of a cached prefix layer (< {self.first_layer}) was modified after capture(); "
                    "the cached outputs are stale (perturb only layers >= first_layer, or capture() again)"
                )

    def _capturing(self, index: int, original: Callable[..., Any], records: list[_Record]) -> Callable[..., Any]:
        last = index == len(self._layers) - 1

        def forward(*args: Any, **kwargs: Any) -> Any:
            call = self._layer_calls[index]
            self._layer_calls[index] += 1
            if index == 0:
                records.append(_Record())
                hidden = _hidden_input(args, kwargs)
                if hidden is not None:
                    records[call].layer0_shape = tuple(hidden.shape)
                    if self.verify:
                        records[call].layer0_input = hidden.detach().clone()
            output = original(*args, **kwargs)
            if call >= len(records):
                raise StaleCacheError("PrefixCache.capture(): prefix layers were called out of order (layer 0 must run first)")
            if self.keep_all or last:
                # Detached (no graph is kept alive) and cloned (a later in-place op on the next
                # layer's input must not change the record).
                stored = _map_tensors(output, lambda t: t.detach().clone())
                records[call].outputs[index] = stored
                records[call].versions.extend((t, _version(t)) for t in _tensors(stored))
            if last and self._stop_after_prefix:
                # The suffix and the head would be computed for nothing: stop this call here.
                raise _PrefixComputed
            return output

        return forward

    def _replaying(self, index: int) -> Callable[..., Any]:
        assert self._records is not None
        records = self._records
        source = index if self.keep_all else len(self._layers) - 1

        def forward(*args: Any, **kwargs: Any) -> Any:
            call = self._layer_calls[index]
            self._layer_calls[index] += 1
            if call >= len(records):
                raise StaleCacheError(
                    f"prefix layer {index} called {call + 1} times under replay but the capture recorded {len(records)} model call(s)"
                )
            record = records[call]
            if index == 0:
                self._check_parameters()
                self._check_layer0(record, _hidden_input(args, kwargs), call)
                for tensor, version in record.versions:
                    if version is not None and tensor._version != version:
                        raise StaleCacheError(
                            "a cached prefix output was modified in place by the model during an earlier replay; "
                            "this model cannot use PrefixCache"
                        )
            return record.outputs[source]

        return forward

    def _check_layer0(self, record: _Record, hidden: torch.Tensor | None, call: int) -> None:
        if hidden is None or record.layer0_shape is None:
            return
        if tuple(hidden.shape) != record.layer0_shape:
            raise StaleCacheError(
                f"batch shape mismatch: the hidden states entering layer 0 have shape {tuple(hidden.shape)} under replay "
                f"but {record.layer0_shape} were captured (model call {call}); capture() again for the new batch"
            )
        if record.layer0_input is not None and not torch.equal(record.layer0_input, hidden):
            raise StaleCacheError(
                "the hidden states entering layer 0 differ from the captured ones: a different batch, or the embeddings "
                "were changed (perturbing anything before layer first_layer invalidates the cache); capture() again"
            )
