"""Tiled ±1 directions: what makes them valid SPSA directions, and every store's guarantees with them."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import tiny_model
from zorefine.models.layers import find_decoder_layers
from zorefine.zo import directions
from zorefine.zo.directions import Direction, tensor_seed
from zorefine.zo.engine import ZOEngine, ZOSettings
from zorefine.zo.replay import apply_records


@pytest.fixture
def small_tiles(monkeypatch):
    """Blocks of 64 entries, so the tiny models' tensors span several blocks."""
    monkeypatch.setitem(directions._TILE_BY_DEVICE_TYPE, "cpu", 64)
    return 64


def test_a_tiled_direction_is_signs_seeded_and_the_same_in_chunks_windows_and_whole(small_tiles):
    shape = (10, 70)  # 700 entries: 10 full blocks and a partial one
    z = Direction("tiled", shape, "cpu", 7, pool_seed=11).full()
    assert z.shape == shape and set(z.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(z, Direction("tiled", shape, "cpu", 7, pool_seed=11).full())
    assert not torch.equal(z, Direction("tiled", shape, "cpu", 8, pool_seed=11).full())
    assert not torch.equal(z, Direction("tiled", shape, "cpu", 7, pool_seed=12).full())
    window = Direction("tiled", shape, "cpu", 7, window=(50, 300), pool_seed=11).full()
    assert torch.equal(window, z.flatten()[50:350])
    # A window past the tensor's end is padding: no direction there.
    tail = Direction("tiled", shape, "cpu", 7, window=(650, 100), pool_seed=11)
    chunks = [(start, end, chunk.clone()) for start, end, chunk in tail.chunks()]
    assert [(start, end) for start, end, _ in chunks] == [(0, 50)]
    assert torch.equal(chunks[0][2], z.flatten()[650:700])


def test_blocks_are_shifted_reads_of_the_pool_not_one_block_repeated(small_tiles):
    z = Direction("tiled", (64 * 16,), "cpu", tensor_seed(3, "w"), pool_seed=3).full().view(16, 64)
    # Two blocks are signed copies only when their offsets coincide (16 offsets of 64 possible).
    copies = (z @ z.T / 64).abs().fill_diagonal_(0) == 1
    assert copies.sum() / 2 <= 4
    assert torch.equal(z.abs(), torch.ones_like(z))


def test_tiled_entries_have_zero_mean_and_identity_covariance(small_tiles):
    draws, numel = 3000, 256  # four blocks
    first_moment = torch.zeros(numel)
    second_moment = torch.zeros(numel, numel)
    for seed in range(draws):
        z = Direction("tiled", (numel,), "cpu", tensor_seed(seed, "w"), pool_seed=seed).full()
        first_moment += z
        second_moment += torch.outer(z, z)
    first_moment /= draws
    second_moment /= draws
    # Standard error 1/sqrt(3000) ≈ 0.018; a shared, unsigned pool would put ±1 off the diagonal.
    assert first_moment.abs().max() < 0.1
    assert torch.equal(second_moment.diagonal(), torch.ones(numel))
    assert (second_moment - torch.eye(numel)).abs().max() < 0.12


def test_the_spsa_estimate_with_tiled_directions_follows_the_true_gradient(monkeypatch):
    monkeypatch.setitem(directions._TILE_BY_DEVICE_TYPE, "cpu", 16)  # the 48 weights in 3 blocks
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 6))
    data, target = torch.randn(32, 6), torch.randn(32, 8)

    def loss() -> torch.Tensor:
        return ((data @ weight.T - target) ** 2).mean()

    true_grad = torch.autograd.grad(loss(), weight)[0]
    engine = ZOEngine({"w": weight}, settings=ZOSettings(eps=1e-3, direction="tiled"))
    estimate = torch.zeros_like(weight)
    with torch.no_grad():
        for i in range(600):
            record = engine.step(i, seed=1000 + i, lr=0.0, loss_fn=loss)
            z = Direction("tiled", weight.shape, "cpu", tensor_seed(1000 + i, "w"), pool_seed=1000 + i).full()
            estimate += record.projected_grad * z
    cosine = torch.nn.functional.cosine_similarity((estimate / 600).flatten(), true_grad.flatten(), dim=0)
    assert cosine > 0.8


def _engine(model, store: str) -> ZOEngine:
    params = dict(find_decoder_layers(model).parameters(0))
    return ZOEngine(params, settings=ZOSettings(eps=1e-2, direction="tiled", store=store))


def _loss(model):
    ids = torch.arange(12).unsqueeze(0)
    return lambda: float(model(input_ids=ids).logits.float().pow(2).mean())


@pytest.mark.parametrize("store", ["copy", "compensated"])
def test_the_exact_stores_restore_every_weight_bitwise_with_tiled_directions(small_tiles, store):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = _engine(model, store).step(0, seed=5, lr=0.0, loss_fn=_loss(model))
    assert record.loss_plus != record.loss_minus
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("store", ["copy", "inplace"])
def test_a_deferred_update_with_tiled_directions_changes_no_bit(small_tiles, store):
    models = [tiny_model("llama") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    eager, deferred = _engine(models[0], store), _engine(models[1], store)
    for step in range(5):
        a = eager.step(step, 40 + step, 0.05, _loss(models[0]))
        b = deferred.step(step, 40 + step, 0.05, _loss(models[1]), settle=False)
        assert (a.loss_plus, a.loss_minus) == (b.loss_plus, b.loss_minus), step
    eager.restore(), deferred.restore()
    for (name, x), y in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(x, y), name


def test_a_tiled_inplace_run_replays_bit_for_bit(small_tiles):
    model, replayed = tiny_model("llama"), tiny_model("llama")
    replayed.load_state_dict(model.state_dict())
    engine = _engine(model, "inplace")
    records = [engine.step(step, 70 + step, 0.05, _loss(model), settle=False) for step in range(6)]
    engine.restore()
    assert apply_records(_engine(replayed, "inplace"), records, {}) == 6
    for (name, x), y in zip(model.state_dict().items(), replayed.state_dict().values()):
        assert torch.equal(x, y), name
