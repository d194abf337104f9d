"""Tests for zorefine.zo.prefix_cache: replayed prefixes give exactly the logits of a full forward.

Every architecture of ``tests/tiny_models.py`` is covered, because skipping layers is only
correct if nothing the model computes between/around its layers depends on the skipped
computation; that is a property of each model's code, so it is checked per architecture.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.tiny_models import ARCHS, tiny_input_ids, tiny_model
from zorefine.models.layers import find_decoder_layers
from zorefine.zo.prefix_cache import PrefixCache, cached_loss_fn

# (arch, first_layer): every arch at 1, and at 2 where the tiny model has at least 3 layers,
# so a cached prefix of several layers (outputs handed from one skipped layer to the next) is covered.
CASES = [(arch, 1) for arch in ARCHS] + [
    (arch, 2) for arch in ARCHS if len(find_decoder_layers(tiny_model(arch)).modules) >= 3
]


def _logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def _perturb_layer(model: nn.Module, index: int, scale: float = 0.05) -> str:
    """Add a fixed (seeded) perturbation to every matrix of decoder layer ``index``; return one name."""
    generator = torch.Generator().manual_seed(1234)
    names = []
    with torch.no_grad():
        for name, param in find_decoder_layers(model).parameters(index).items():
            if param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator), alpha=scale)
                names.append(name)
    assert names, "the layer has no matrix to perturb"
    return names[0]


class _CallCounter:
    """Counts forward calls of modules through forward hooks."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.count = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, args, output) -> None:
        self.count += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(("arch", "first_layer"), CASES)
def test_replay_equals_full_forward_with_suffix_perturbed(arch: str, first_layer: int) -> None:
    """Bitwise on CPU: replayed logits == full-forward logits under the same suffix perturbation."""
    model = tiny_model(arch)
    ids = tiny_input_ids(batch=2, length=8)
    clean = _logits(model, ids)
    cache = PrefixCache(model, first_layer)
    with cache.capture():
        captured = _logits(model, ids)
    # Capturing must not change what the model computes.
    assert torch.equal(captured, clean)

    _perturb_layer(model, first_layer)
    full = _logits(model, ids)
    with cache.replay():
        replayed = _logits(model, ids)
    assert torch.equal(replayed, full)
    # The perturbation matters, so the equality above is not the trivial clean == clean.
    assert (full - clean).abs().max() > 1e-4
    # A second replay (the "-" pass of SPSA) still sees an intact cache.
    with cache.replay():
        assert torch.equal(_logits(model, ids), full)


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_skips_prefix_layers_and_runs_suffix(arch: str) -> None:
    """Under replay no submodule of a prefix layer runs; suffix layers do."""
    model = tiny_model(arch)
    layers = find_decoder_layers(model).modules
    ids = tiny_input_ids()
    # Hooks on the prefix layer's *children*: a hook on the layer itself still fires under replay
    # (only its forward is replaced), so it could not tell skipping from computing.
    prefix = _CallCounter([m for m in layers[0].modules() if m is not layers[0]])
    suffix = _CallCounter([m for layer in layers[1:] for m in layer.modules()])
    cache = PrefixCache(model, 1)
    with cache.capture():
        _logits(model, ids)
    assert prefix.count > 0 and suffix.count > 0  # the counters do see a normal forward
    prefix.count = suffix.count = 0
    with cache.replay():
        _logits(model, ids)
    assert prefix.count == 0
    assert suffix.count > 0
    prefix.remove()
    suffix.remove()


def test_replay_returns_recorded_outputs() -> None:
    """Replay really uses the record: a prefix change hidden from the guards does not show up.

    ``.data`` writes do not bump the version counter, so the stale-cache guard cannot see this
    one; it is used here only to prove that replay returns what capture recorded.
    """
    model = tiny_model("gpt2")
    ids = tiny_input_ids()
    clean = _logits(model, ids)
    cache = PrefixCache(model, 1)
    with cache.capture():
        _logits(model, ids)
    for param in find_decoder_layers(model).modules[0].parameters():
        param.data.mul_(2.0)
    assert not torch.equal(_logits(model, ids), clean)  # a full forward sees the change
    with cache.replay():
        assert torch.equal(_logits(model, ids), clean)  # the replay does not


def test_forward_restored_after_contexts_and_exceptions() -> None:
    """The layers' ``forward`` is the class method again after each context, also after an error."""
    model = tiny_model("llama")
    layer = find_decoder_layers(model).modules[0]
    ids = tiny_input_ids()
    cache = PrefixCache(model, 1)
    with pytest.raises(ValueError, match="boom"):
        with cache.capture():
            _logits(model, ids)
            assert "forward" in layer.__dict__  # patched inside
            raise ValueError("boom")
    assert "forward" not in layer.__dict__
    assert not cache.captured  # a failed capture leaves nothing to replay
    with cache.capture():
        _logits(model, ids)
    assert "forward" not in layer.__dict__
    with pytest.raises(ValueError, match="boom"):
        with cache.replay():
            _logits(model, ids)
            raise ValueError("boom")
    assert "forward" not in layer.__dict__
    assert layer.forward.__func__ is type(layer).forward
    # No hook is left on the model either: a plain call does not compare against the capture.
    _logits(model, tiny_input_ids(length=5))


def test_existing_instance_forward_is_wrapped_and_restored() -> None:
    """An instance ``forward`` installed by someone else (e.g. accelerate) is used in capture and put back."""
    model = tiny_model("llama")
    layer = find_decoder_layers(model).modules[0]
    calls = []
    original = layer.forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.forward = wrapper
    ids = tiny_input_ids()
    cache = PrefixCache(model, 1)
    with cache.capture():
        _logits(model, ids)
    assert len(calls) == 1
    with cache.replay():
        _logits(model, ids)
    assert len(calls) == 1  # skipped under replay
    assert layer.__dict__["forward"] is wrapper


def test_replay_before_capture_and_after_clear_raise() -> None:
    """Replay without a completed capture is a RuntimeError with a clear message."""
    model = tiny_model("gpt2")
    cache = PrefixCache(model, 1)
    with pytest.raises(RuntimeError, match="before a completed capture"):
        with cache.replay():
            pass
    with cache.capture():
        _logits(model, tiny_input_ids())
    cache.clear()
    with pytest.raises(RuntimeError, match="before a completed capture"):
        with cache.replay():
            pass


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_mismatch_raises(arch: str) -> None:
    """A different batch shape or different tokens under replay is refused, never silently used."""
    model = tiny_model(arch)
    ids = tiny_input_ids(batch=2, length=8)
    cache = PrefixCache(model, 1)
    with cache.capture():
        _logits(model, ids)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with cache.replay():
            _logits(model, tiny_input_ids(batch=2, length=6))
    with pytest.raises(RuntimeError, match="differs from the captured batch"):
        with cache.replay():
            _logits(model, tiny_input_ids(batch=2, length=8, seed=1))
    # Bypassing model.__call__ (no model pre-hook) is still caught at layer 0.
    with pytest.raises(RuntimeError, match="layer 0"):
        with cache.replay(), torch.no_grad():
            model.forward(tiny_input_ids(batch=3, length=8), use_cache=False)
    # The cache is still good for the right batch after the refused calls.
    full = _logits(model, ids)
    with cache.replay():
        assert torch.equal(_logits(model, ids), full)


def test_perturbed_prefix_or_embeddings_raise() -> None:
    """Changing a cached layer's weight or the embeddings after capture invalidates the cache."""
    model = tiny_model("llama")
    ids = tiny_input_ids()
    cache = PrefixCache(model, 1)
    with cache.capture():
        _logits(model, ids)
    param = next(find_decoder_layers(model).modules[0].parameters())
    with torch.no_grad():
        param.add_(0.0)  # even a no-op in-place write bumps the version: the check is conservative
    with pytest.raises(RuntimeError, match="modified after capture"):
        with cache.replay():
            _logits(model, ids)

    with cache.capture():
        _logits(model, ids)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="layer 0 differ"):
        with cache.replay():
            _logits(model, ids)


def test_several_model_calls_replay_in_order() -> None:
    """Micro-batches: each captured call is replayed in order; an extra call raises."""
    model = tiny_model("gpt_neox")
    first, second = tiny_input_ids(batch=2, seed=0), tiny_input_ids(batch=1, length=5, seed=1)
    cache = PrefixCache(model, 2)
    with cache.capture():
        _logits(model, first)
        _logits(model, second)
    _perturb_layer(model, 2)
    expected = (_logits(model, first), _logits(model, second))
    with cache.replay():
        assert torch.equal(_logits(model, first), expected[0])
        assert torch.equal(_logits(model, second), expected[1])
        with pytest.raises(RuntimeError, match="only 2 times under capture"):
            _logits(model, first)


def test_keep_last_only_is_exact_and_smaller() -> None:
    """keep_all=False stores one output, gives the same logits, and refuses output_hidden_states."""
    model = tiny_model("mistral")
    ids = tiny_input_ids()
    cache = PrefixCache(model, 2, keep_all=False)
    with cache.capture():
        _logits(model, ids)
    assert list(cache._records[0].outputs) == [1]  # only the last prefix layer's output is stored
    _perturb_layer(model, 2)
    full = _logits(model, ids)
    with cache.replay():
        assert torch.equal(_logits(model, ids), full)
    with pytest.raises(RuntimeError, match="output_hidden_states"):
        with cache.replay():
            _logits(model, ids, output_hidden_states=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hidden_states_match_with_keep_all(arch: str) -> None:
    """With every output stored, output_hidden_states under replay equals a full forward's."""
    model = tiny_model(arch)
    ids = tiny_input_ids()
    cache = PrefixCache(model, 2)
    with cache.capture():
        _logits(model, ids)
    if len(find_decoder_layers(model)) > 2:  # llama's 2 layers are all cached: nothing to perturb
        _perturb_layer(model, 2)
    with torch.no_grad():
        full = model(ids, use_cache=False, output_hidden_states=True).hidden_states
        with cache.replay():
            replayed = model(ids, use_cache=False, output_hidden_states=True).hidden_states
    assert len(replayed) == len(full)
    for a, b in zip(replayed, full):
        assert torch.equal(a, b)


def test_kv_cache_is_off_by_default_and_refused_under_replay() -> None:
    """Without use_cache the refiner's passes build no KV cache; use_cache=True is refused under replay."""
    model = tiny_model("llama")
    ids = tiny_input_ids()
    assert model.config.use_cache  # the config default would build a cache
    cache = PrefixCache(model, 1)
    with torch.no_grad():
        with cache.capture():
            assert model(ids).past_key_values is None
        with cache.replay():
            assert model(ids).past_key_values is None
            with pytest.raises(RuntimeError, match="use_cache=True"):
                model(ids, use_cache=True)


def test_cached_loss_fn_matches_uncached() -> None:
    """The clean loss and the replayed (perturbed) loss equal uncached calls exactly."""
    model = tiny_model("llama")
    ids = tiny_input_ids()

    def loss_fn() -> torch.Tensor:
        with torch.no_grad():
            return model(ids, labels=ids).loss

    uncached_clean = loss_fn().item()
    clean, replayed = cached_loss_fn(model, 1, loss_fn)
    assert clean == uncached_clean
    _perturb_layer(model, 1)
    perturbed = loss_fn()
    assert perturbed.item() != clean
    assert torch.equal(replayed(), perturbed)
    # first_layer=0: inactive cache, same contract.
    clean0, replayed0 = cached_loss_fn(model, 0, loss_fn)
    assert clean0 == perturbed.item()
    assert torch.equal(replayed0(), perturbed)


def test_invalid_first_layer_and_nesting() -> None:
    """first_layer outside [0, L] is a ValueError; nested contexts are refused."""
    model = tiny_model("opt")
    with pytest.raises(ValueError, match="first_layer"):
        PrefixCache(model, 3)
    with pytest.raises(ValueError, match="first_layer"):
        PrefixCache(model, -1)
    assert not PrefixCache(model, 0).active and PrefixCache(model, 2).active
    cache = PrefixCache(model, 1)
    with cache.capture():
        _logits(model, tiny_input_ids())
        with pytest.raises(RuntimeError, match="nested"):
            with cache.replay():
                pass


def test_capture_prefix_computes_only_the_prefix():
    model = tiny_model("gpt2")
    layers = find_decoder_layers(model)
    calls = {i: 0 for i in range(len(layers))}
    handles = [m.register_forward_pre_hook(lambda mod, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, m in enumerate(layers.modules)]
    ids = torch.arange(12).unsqueeze(0)
    cache = PrefixCache(model, first_layer=2, keep_all=False)
    cache.capture_prefix([lambda: model(input_ids=ids)])
    assert calls == {0: 1, 1: 1, 2: 0}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with cache.replay():
            replayed = model(input_ids=ids).logits
    assert torch.equal(expected, replayed)
    assert calls[2] == 2  # the suffix ran for the plain forward and for the replay
    for handle in handles:
        handle.remove()
