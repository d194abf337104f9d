"""Weight stores: the compensated in-place store restores exactly and follows the copy store bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import tiny_model
from zorefine.models.layers import decoder_parameters
from zorefine.zo import directions as perturb
from zorefine.zo.directions import Direction, tensor_seed
from zorefine.zo.weight_store import CompensatedShift, MasterCopy, make_store
from zorefine.zo.engine import ZOEngine, ZOSettings, step_seed


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _refine(arch: str, store: str, steps: int = 4, **settings) -> tuple[torch.nn.Module, list[float]]:
    model = tiny_model(arch)
    engine = ZOEngine(decoder_parameters(model), settings=ZOSettings(store=store, **settings))
    ids = torch.arange(16).unsqueeze(0)
    losses = []
    for step in range(steps):
        record = engine.step(step, step_seed(3, step), 1e-2, lambda: model(input_ids=ids).logits.float().pow(2).mean())
        losses += [record.loss_plus, record.loss_minus]
    return model, losses


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(eps=1e-2),
        dict(eps=5e-2, direction="rademacher"),
        dict(eps=1e-2, eps_mode="relative", num_directions=3, optimizer="adam"),
    ],
    ids=["gaussian", "rademacher", "relative-q3-adam"],
)
def test_compensated_store_follows_the_copy_store_bit_for_bit(arch, settings, small_chunks):
    copy_model, copy_losses = _refine(arch, "copy", **settings)
    compensated_model, compensated_losses = _refine(arch, "compensated", **settings)
    assert copy_losses == compensated_losses
    start = _snapshot(tiny_model(arch))
    copied, compensated = _snapshot(copy_model), _snapshot(compensated_model)
    assert any(not torch.equal(copied[n], start[n]) for n in start)  # the weights really moved
    for name in start:
        assert torch.equal(copied[name], compensated[name]), name


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 256 entries, so small tensors cross many chunk boundaries."""
    monkeypatch.setitem(perturb._CHUNK_BY_DEVICE_TYPE, "cpu", 256)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_compensated_moves_undo_exactly_even_where_the_move_dwarfs_the_weight(kind, small_chunks):
    torch.manual_seed(0)
    values = torch.randn(4096) * 0.02
    values[:64] = 0.0  # exact zeros
    values[64:128] = torch.randn(64) * 1e-30  # far below any move
    values[128:192] = torch.finfo(torch.float32).tiny / 4  # subnormal
    values[192:256] = 1.0 + torch.arange(64) * 2.0**-23  # just above a binade edge
    weight = values.clone()
    store = CompensatedShift(weight, lambda seed: Direction(kind, weight.shape, weight.device, tensor_seed(seed, "w")))
    for seed, alpha in [(1, 0.1), (1, -0.1), (2, 3.0), (2, -3.0), (3, 1e-3), (4, -0.5)]:
        store.shift(seed, alpha)
        assert not torch.equal(weight, values)
    store.settle()
    assert torch.equal(weight.view(torch.int32), values.view(torch.int32))


def test_compensated_store_keeps_about_half_a_byte_per_weight():
    torch.manual_seed(0)
    weight = torch.randn(256, 256) * 0.02
    store = CompensatedShift(weight, lambda seed: Direction("gaussian", weight.shape, weight.device, seed))
    store.shift(7, 1e-3)
    saved = store._low.numel() * store._low.element_size()
    exceptions = sum(positions.numel() for positions, _ in store._exceptions)
    saved += sum(p.numel() * p.element_size() + v.numel() * v.element_size() for p, v in store._exceptions)
    assert saved == weight.numel() // 2 + 8 * exceptions  # 4 bits per weight, 8 bytes per exception
    assert 0 < exceptions < 0.03 * weight.numel() and saved <= 0.75 * weight.numel()


def test_half_precision_weights_always_get_a_master_copy():
    weight = torch.zeros(8, 8, dtype=torch.bfloat16)
    direction_of = lambda seed: Direction("gaussian", weight.shape, weight.device, seed)  # noqa: E731
    assert isinstance(make_store("compensated", weight, direction_of), MasterCopy)
    assert isinstance(make_store("compensated", torch.zeros(8, 8), direction_of), CompensatedShift)
    with pytest.raises(ValueError, match="store must be one of"):
        make_store("exact", weight, direction_of)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_a_direction_is_the_same_numbers_whatever_the_chunk_size(kind, monkeypatch):
    whole = Direction(kind, (3, 1000), torch.device("cpu"), 17).full()
    monkeypatch.setitem(perturb._CHUNK_BY_DEVICE_TYPE, "cpu", 256)
    pieces = [chunk.clone() for _, _, chunk in Direction(kind, (3, 1000), torch.device("cpu"), 17).chunks()]
    assert len(pieces) == 12 and torch.equal(torch.cat(pieces).view(3, 1000), whole)
    if kind == "rademacher":
        assert set(whole.unique().tolist()) == {-1.0, 1.0} and abs(float(whole.mean())) < 0.08  # 4.4 sigma
    else:
        assert abs(float(whole.std()) - 1.0) < 0.08


def test_master_copy_handles_bf16_and_non_contiguous_weights(small_chunks):
    for weight in (torch.randn(40, 30).to(torch.bfloat16), torch.randn(30, 40).t()):
        start = weight.clone()
        store = MasterCopy(weight, lambda seed: Direction("gaussian", weight.shape, weight.device, seed))
        store.shift(1, 0.5)
        expected = (start.float() + 0.5 * Direction("gaussian", weight.shape, weight.device, 1).full()).to(weight.dtype)
        assert torch.equal(weight, expected)
        store.settle()
        assert torch.equal(weight, start)


def test_compensated_store_skips_a_non_finite_step_with_the_weights_untouched():
    model = tiny_model("llama")
    before = _snapshot(model)
    engine = ZOEngine(decoder_parameters(model), settings=ZOSettings(eps=1e-2, store="compensated"))
    record = engine.step(0, 11, 1.0, lambda: float("nan"))
    assert record.skipped
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_compensated_restore_is_exact_across_every_magnitude(kind, small_chunks):
    # Log-uniform magnitudes over 35 binades, both signs, against moves from tiny to huge:
    # every entry is either inside the 4-bit correction's reach or saved as an exception.
    generator = torch.Generator().manual_seed(1)
    magnitudes = torch.exp2(torch.empty(20_001).uniform_(-30, 5, generator=generator))
    signs = torch.where(torch.rand(20_001, generator=generator) < 0.5, -1.0, 1.0)
    values = magnitudes * signs
    weight = values.clone()
    store = CompensatedShift(weight, lambda seed: Direction(kind, weight.shape, weight.device, tensor_seed(seed, "w")))
    for seed, alpha in [(1, 1e-3), (1, -1e-3), (2, 0.37), (3, -11.0), (3, 11.0), (4, 1e-7)]:
        store.shift(seed, alpha)
        store.settle()
        assert torch.equal(weight.view(torch.int32), values.view(torch.int32)), (seed, alpha)
