"""Prefix caching for zeroth-order refinement: run the unperturbed first layers once per batch.

A ZO (SPSA/MeZO) step evaluates the loss several times on one batch: a clean pass, then a ``+εz``
and a ``-εz`` pass (and more for several directions). When only decoder layers ``k, k+1, ...``
(and possibly the final norm / LM head) are perturbed, the embeddings and layers ``0..k-1``
compute exactly the same thing in every pass. :class:`PrefixCache` runs them once, under
:meth:`PrefixCache.capture`, records what each of those layers returned, and under
:meth:`PrefixCache.replay` makes them hand back the recorded output instead of computing, so an
extra pass costs only layers ``k..L-1``, the final norm and the LM head (plus the cheap
embedding lookup, rotary tables and attention-mask construction, which still run).

How it works, generically (no per-architecture code): each prefix layer module gets a
temporary *instance* attribute ``forward`` (the class's method is untouched and the previous
instance attribute, e.g. one set by accelerate's device-map hooks, is put back on exit, also on
exceptions). ``nn.Module.__call__`` then calls that function. During capture it wraps the
original ``forward`` and records its return value (detached and cloned, with the same
structure: a tensor, or a tuple as older GPT-2/OPT layers return); during replay it returns the
record without running the layer. Only ``forward`` is replaced, so module hooks registered on a
prefix layer still run on replay, exactly as on a normal forward.

Equality: the suffix layers receive bit-for-bit the tensor a normal forward would have given
them, and everything else (masks, rotary tables, suffix layers, head) is recomputed by the same
code, so on CPU the replayed logits are bitwise equal (``torch.equal``) to a full forward with
the same perturbation; the tests check this for seven architectures. On GPU they are equal as
long as the kernels are deterministic for a given shape.

Guards against stale caches, so a cache is never silently reused on the wrong input:

* :meth:`~PrefixCache.replay` before a completed :meth:`~PrefixCache.capture` raises.
* The model's tensor inputs (``input_ids``, ``attention_mask``, ``position_ids``, ...; not
  ``labels``, which cannot change the prefix) of each call are compared exactly with the
  captured ones (through a pre-hook on ``model``).
* The hidden states entering layer 0 are compared exactly with the captured ones (shape always;
  values when ``verify=True``, the default). This also catches calls that bypass the model's
  ``__call__`` and perturbed embeddings, which would invalidate the cache.
* The version counters of the prefix layers' parameters are checked: an in-place write to any
  of them (``param.copy_``/``add_``, as the ZO engine does) after capture raises. Writes through
  ``param.data`` bypass version counters and are *not* detected.
* A replayed tensor that the model modified in place (which would corrupt the next replay) is
  detected through its version counter.

All these raise :class:`StaleCacheError`, a :class:`RuntimeError`.

KV caches: the refiner never needs one. When the model's ``forward`` takes ``use_cache`` and the
caller does not pass it, capture and replay pass ``use_cache=False``, so no cache object is
built. Replay refuses ``use_cache=True`` and a ``past_key_values`` argument: skipped layers
would not append their keys/values to a cache (transformers >= 4.36 mutates a shared ``Cache``
object in place rather than returning it), so the returned cache would be incomplete and a
given past would make the recorded outputs depend on it. If a layer does return a cache object
in its output (old transformers' ``(hidden, present)`` tuples), that object is recorded and
returned as is; it is never used by the refiner. Layers that talk to each other through side
channels other than their return value (e.g. cross-layer KV sharing as in Gemma 3n) are not
supported. ``output_attentions=True`` is refused under replay (transformers 5 collects attention
weights from hooks on the attention modules, which a skipped layer never calls).

Memory: the cache holds, per captured model call, one hidden-state tensor (B×T×H, the model's
dtype) per prefix layer, i.e. ``first_layer`` of them, plus one B×T×H copy of layer 0's input
when ``verify=True``, plus the (small) model input tensors. With ``keep_all=False`` only the
*last* prefix layer's output is stored: the output of layer ``i < first_layer - 1`` is only the
input of layer ``i + 1``, which replay ignores, so earlier layers return the last record instead.
That is exact for logits and losses, but ``output_hidden_states`` (refused then) and hooks on
earlier prefix layers that read their output would see the wrong tensor, hence the default
``keep_all=True``.

Other caveats: the model should be in eval mode (dropout in the prefix is frozen at the captured
sample); ZeRO-3 parameter-gathering hooks on prefix layers still fire on replay (hooks are
kept); a ``torch.compile``d model may not see the replaced ``forward``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from zorefine.models.layers import find_decoder_layers

__all__ = ["PrefixCache", "StaleCacheError", "cached_loss_fn"]

# Model inputs that cannot change what the prefix layers compute, so a difference in them
# between capture and replay must not be reported as a stale cache.
_IGNORED_INPUTS = frozenset({"labels"})

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


class PrefixCache:
    """Caches the outputs of decoder layers ``[0, first_layer)`` for one batch.

    Usage (one ZO step on one batch)::

        cache = PrefixCache(model, first_layer=k)   # perturb only layers >= k
        with cache.capture():
            clean = loss_fn()                       # a normal forward; prefix outputs recorded
        perturb(+eps)
        with cache.replay():
            plus = loss_fn()                        # layers < k are not computed
        perturb(-2 * eps)
        with cache.replay():
            minus = loss_fn()
        cache.clear()

    The captured block may call the model several times (e.g. micro-batches); each replay
    context then replays those calls in the same order. Calling :meth:`capture` again replaces
    the record. With ``first_layer == 0`` the cache is inactive: both contexts run the model
    normally. See the module docstring for the memory cost and the stale-cache guards.

    Args:
        model: a causal LM (or any module holding a decoder stack ``find_decoder_layers`` finds).
        first_layer: the first layer that is computed under replay; layers below are cached.
        keep_all: store every prefix layer's output (default) or only the last one's.
        verify: compare layer 0's input values (not only its shape) with the captured ones.
    """

    def __init__(self, model: nn.Module, first_layer: int, *, keep_all: bool = True, verify: bool = True) -> None:
        layers = find_decoder_layers(model)
        if not 0 <= first_layer <= len(layers):
            raise ValueError(f"first_layer must be in [0, {len(layers)}] for a model with {len(layers)} layers, got {first_layer}")
        self.model = model
        self.first_layer = first_layer
        self.keep_all = keep_all
        self.verify = verify
        self._layers: list[nn.Module] = layers.modules[:first_layer]
        self._records: list[_Record] | None = None
        self._inputs: list[dict[str, torch.Tensor]] = []
        self._param_versions: list[tuple[str, torch.Tensor, int]] = []
        self._busy = False
        self._stop_after_prefix = False
        # Per-context call counters: index of the current model call, per prefix layer and at the top.
        self._layer_calls: list[int] = []
        self._model_calls = 0
        self._use_cache_position = self._parameter_position(model, "use_cache")
        self._param_names = {
            id(param): f"{layers.name(index)}.{local}"
            for index, layer in enumerate(self._layers)
            for local, param in layer.named_parameters()
        }

    @property
    def active(self) -> bool:
        """Whether any layer is cached (``first_layer > 0``)."""
        return self.first_layer > 0

    @property
    def captured(self) -> bool:
        """Whether a completed capture is available for replay."""
        return self._records is not None

    def clear(self) -> None:
        """Drop the recorded outputs (frees their memory); replay needs a new capture after this."""
        self._records = None
        self._inputs = []
        self._param_versions = []

    def capture_prefix(self, calls: "list[Callable[[], Any]]") -> None:
        """Record the prefix outputs of each model call, computing the prefix only.

        Each callable makes one model call (e.g. one micro-batch). The call stops after the
        last cached layer, so a capture costs ``first_layer / num_layers`` of a forward pass;
        a ZO step with cached prefix then costs that plus one suffix pass per evaluation.
        """
        if not self.active:
            return
        self._stop_after_prefix = True
        try:
            with self.capture():
                for call in calls:
                    try:
                        call()
                    except _PrefixComputed:
                        pass
        finally:
            self._stop_after_prefix = False

    # ------------------------------------------------------------------ contexts

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Within: run the model normally; the outputs of layers ``< first_layer`` are recorded."""
        self._enter()
        self.clear()
        records: list[_Record] = []
        self._inputs = []
        self._layer_calls = [0] * len(self._layers)
        self._model_calls = 0
        try:
            with self._patched(lambda index, original: self._capturing(index, original, records)), self._model_hook(replaying=False):
                yield
            if self.active and not records:
                raise StaleCacheError(
                    "PrefixCache.capture(): the model's prefix layers were not called inside the capture block; "
                    "run the model (e.g. the clean loss) once within it"
                )
            # Only a capture that ran to the end becomes usable: a failed one leaves no record.
            self._records = records
            self._param_versions = [
                (self._param_names[id(p)], p, p._version) for layer in self._layers for p in layer.parameters()
            ]
        except BaseException:
            self.clear()
            raise
        finally:
            self._busy = False

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Within: model calls skip layers ``< first_layer`` and use the recorded outputs instead."""
        self._enter()
        if self._records is None:
            self._busy = False
            raise StaleCacheError("PrefixCache.replay() called before a completed capture(); run the clean forward under capture() first")
        self._layer_calls = [0] * len(self._layers)
        self._model_calls = 0
        try:
            self._check_parameters()
            with self._patched(lambda index, original: self._replaying(index)), self._model_hook(replaying=True):
                yield
        finally:
            self._busy = False

    # ------------------------------------------------------------------ internals

    def _enter(self) -> None:
        if self._busy:
            raise RuntimeError("PrefixCache contexts cannot be nested (capture/replay is already active)")
        self._busy = True

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


def cached_loss_fn(
    model: nn.Module, first_layer: int, loss_fn: Callable[[], torch.Tensor | float], **options: bool
) -> tuple[float, Callable[[], torch.Tensor | float]]:
    """Run ``loss_fn()`` once under capture and return ``(clean_loss, replaying_loss_fn)``.

    ``replaying_loss_fn()`` calls ``loss_fn()`` under :meth:`PrefixCache.replay`, so each call
    computes only layers ``>= first_layer`` and the head; it raises :class:`StaleCacheError` if
    the batch or a prefix parameter changed. The cache lives as long as the closure (see
    :class:`PrefixCache` for its memory). ``options`` are passed to :class:`PrefixCache`
    (``keep_all``, ``verify``). With ``first_layer == 0`` the closure is a plain call.
    """
    cache = PrefixCache(model, first_layer, **options)
    with cache.capture():
        clean = loss_fn()
    clean_value = float(clean.detach().item() if isinstance(clean, torch.Tensor) else clean)

    def replayed() -> torch.Tensor | float:
        with cache.replay():
            return loss_fn()

    # For introspection and for freeing the memory early (``replayed.cache.clear()``).
    replayed.cache = cache  # type: ignore[attr-defined]
    return clean_value, replayed
