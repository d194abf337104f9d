"""Weight stores: the compensated in-place store restores exactly and follows the copy store bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import tiny_model
from zorefine.models.layers import decoder_parameters
from zorefine.perturb import gaussian_direction, rademacher_direction, tensor_seed
from zorefine.weight_store import CompensatedShift, MasterCopy, make_store
from zorefine.zo import ZOEngine, ZOSettings, step_seed


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
def test_compensated_store_follows_the_copy_store_bit_for_bit(arch, settings):
    copy_model, copy_losses = _refine(arch, "copy", **settings)
    compensated_model, compensated_losses = _refine(arch, "compensated", **settings)
    assert copy_losses == compensated_losses
    start = _snapshot(tiny_model(arch))
    copied, compensated = _snapshot(copy_model), _snapshot(compensated_model)
    assert any(not torch.equal(copied[n], start[n]) for n in start)  # the weights really moved
    for name in start:
        assert torch.equal(copied[name], compensated[name]), name


@pytest.mark.parametrize("draw", [gaussian_direction, rademacher_direction])
def test_compensated_moves_undo_exactly_even_where_the_move_dwarfs_the_weight(draw):
    torch.manual_seed(0)
    values = torch.randn(4096) * 0.02
    values[:64] = 0.0  # exact zeros
    values[64:128] = torch.randn(64) * 1e-30  # far below any move
    values[128:192] = torch.finfo(torch.float32).tiny / 4  # subnormal
    values[192:256] = 1.0 + torch.arange(64) * 2.0**-23  # just above a binade edge
    weight = values.clone()
    store = CompensatedShift(weight, lambda seed: draw(weight, tensor_seed(seed, "w")))
    for seed, alpha in [(1, 0.1), (1, -0.1), (2, 3.0), (2, -3.0), (3, 1e-3), (4, -0.5)]:
        store.shift(seed, alpha)
        assert not torch.equal(weight, values)
    store.settle()
    assert torch.equal(weight.view(torch.int32), values.view(torch.int32))


def test_compensated_store_keeps_about_one_byte_per_weight():
    torch.manual_seed(0)
    weight = torch.randn(256, 256) * 0.02
    store = CompensatedShift(weight, lambda seed: gaussian_direction(weight, seed))
    store.shift(7, 1e-3)
    saved = store._low.numel() * store._low.element_size()
    saved += store._exact_index.numel() * (store._exact_index.element_size() + store._exact_value.element_size())
    assert saved <= 1.1 * weight.numel()
    assert 0 < store._exact_index.numel() < 0.01 * weight.numel()


def test_half_precision_weights_always_get_a_master_copy():
    weight = torch.zeros(8, 8, dtype=torch.bfloat16)
    assert isinstance(make_store("compensated", weight, lambda seed: weight.float()), MasterCopy)
    assert isinstance(make_store("compensated", torch.zeros(8, 8), lambda seed: weight.float()), CompensatedShift)
    with pytest.raises(ValueError, match="store must be one of"):
        make_store("exact", weight, lambda seed: weight.float())


def test_compensated_store_skips_a_non_finite_step_with_the_weights_untouched():
    model = tiny_model("llama")
    before = _snapshot(model)
    engine = ZOEngine(decoder_parameters(model), settings=ZOSettings(eps=1e-2, store="compensated"))
    record = engine.step(0, 11, 1.0, lambda: float("nan"))
    assert record.skipped
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
