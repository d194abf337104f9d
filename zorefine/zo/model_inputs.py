"""The model-call guard of the prefix cache: a forward pre-hook on the model.

The model half of :class:`zorefine.zo.prefix_cache.PrefixCache`: on each model call inside its
contexts the hook passes ``use_cache=False`` when the caller left it out, records the tensor
inputs under capture and, under replay, refuses what replay cannot support (KV caches, attention
weights, ...) and compares the inputs exactly with those of the captured call.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from zorefine.zo.layer_capture import StaleCacheError

# Model inputs that cannot change what the prefix layers compute, so a difference in them
# between capture and replay must not be reported as a stale cache.
_IGNORED_INPUTS = frozenset({"labels"})


class ModelInputGuard:
    """The model pre-hook of :class:`~zorefine.zo.prefix_cache.PrefixCache` (a mixin).

    The methods read and update the state that ``PrefixCache.__init__`` and its contexts set up,
    and its ``active`` property.
    """

    model: nn.Module
    keep_all: bool
    _inputs: list[dict[str, torch.Tensor]]
    _model_calls: int
    _use_cache_position: int | None

    @staticmethod
    def _parameter_position(model: nn.Module, name: str) -> int | None:
        """Position of ``name`` in ``model.forward``'s signature, or None if it has no such parameter."""
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            return None
        for position, param in enumerate(params):
            if param.name == name and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                return position
        return None

    @contextlib.contextmanager
    def _model_hook(self, replaying: bool) -> Iterator[None]:
        hook = self.model.register_forward_pre_hook(
            lambda module, args, kwargs: self._model_pre_hook(args, kwargs, replaying), with_kwargs=True
        )
        try:
            yield
        finally:
            hook.remove()

    def _model_pre_hook(self, args: tuple[Any, ...], kwargs: dict[str, Any], replaying: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
        call = self._model_calls
        self._model_calls += 1
        position = self._use_cache_position
        if position is not None and len(args) > position:
            use_cache = args[position]
        else:
            use_cache = kwargs.get("use_cache")
            if position is not None and "use_cache" not in kwargs:
                # No KV cache is needed: don't let the config default build one.
                kwargs = {**kwargs, "use_cache": False}
        if not (self.active and replaying):
            if self.active:
                self._inputs.append(self._input_tensors(args, kwargs))
            return args, kwargs
        if use_cache:
            raise RuntimeError("PrefixCache.replay() does not support use_cache=True: skipped layers would leave the KV cache incomplete")
        if kwargs.get("past_key_values") is not None:
            raise RuntimeError("PrefixCache.replay() does not support past_key_values: the cached prefix outputs would depend on it")
        if kwargs.get("output_attentions"):
            raise RuntimeError("PrefixCache.replay() does not support output_attentions: skipped layers compute no attention weights")
        if kwargs.get("output_hidden_states") and not self.keep_all:
            raise RuntimeError("PrefixCache(keep_all=False).replay() cannot return output_hidden_states; use keep_all=True")
        if self._inputs:
            if call >= len(self._inputs):
                raise StaleCacheError(f"model called {call + 1} times under replay but only {len(self._inputs)} times under capture")
            self._compare_inputs(self._inputs[call], self._input_tensors(args, kwargs), call)
        return args, kwargs

    @staticmethod
    def _input_tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        tensors = {f"positional argument {i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        tensors.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in _IGNORED_INPUTS})
        # A clone: the caller may reuse or overwrite its input buffers between passes.
        return {name: t.detach().clone() for name, t in tensors.items()}

    @staticmethod
    def _compare_inputs(captured: dict[str, torch.Tensor], given: dict[str, torch.Tensor], call: int) -> None:
        if captured.keys() != given.keys():
            raise StaleCacheError(
                f"model call {call} under replay has tensor inputs {sorted(given)} but the captured call had {sorted(captured)}"
            )
        for name, tensor in given.items():
            ref = captured[name]
            if ref.shape != tensor.shape:
                raise StaleCacheError(
                    f"batch shape mismatch in model input {name!r}: captured {tuple(ref.shape)}, replay got "
                    f"{tuple(tensor.shape)}; capture() again for the new batch"
                )
            if not torch.equal(ref, tensor.to(ref.device)):
                raise StaleCacheError(f"model input {name!r} differs from the captured batch; capture() again for the new batch")
