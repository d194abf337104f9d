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

The pieces: :mod:`zorefine.zo.layer_capture` patches the prefix layers (capture, replay and the
layer-0 checks) and :mod:`zorefine.zo.model_inputs` holds the pre-hook on the model (its input
checks and the ``use_cache`` handling); :class:`PrefixCache` puts them together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from zorefine.models.layers import find_decoder_layers
from zorefine.zo.layer_capture import LayerCapture, StaleCacheError, _PrefixComputed, _Record
from zorefine.zo.model_inputs import ModelInputGuard

__all__ = ["PrefixCache", "StaleCacheError", "cached_loss_fn"]


class PrefixCache(LayerCapture, ModelInputGuard):
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
