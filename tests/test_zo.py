"""The ZO engine: exact restore, per-tensor seeds, skipped steps, unbiased direction."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny_models import tiny_model
from zorefine.models.layers import find_decoder_layers
from zorefine.zo.directions import Direction, gaussian_direction, tensor_seed
from zorefine.zo.engine import ZOEngine, ZOSettings, step_seed


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _layer_params(model, index=0):
    return find_decoder_layers(model).parameters(index)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_lr_step_restores_every_weight_bitwise(arch):
    model = tiny_model(arch)
    before = _snapshot(model)
    engine = ZOEngine(_layer_params(model), eps=1e-2)
    ids = torch.arange(12).unsqueeze(0)
    record = engine.step(0, seed=123, lr=0.0, loss_fn=lambda: model(input_ids=ids).logits.float().pow(2).mean())
    assert not record.skipped
    assert record.loss_plus != record.loss_minus  # the perturbation really changed the model
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_step_only_touches_selected_parameters():
    model = tiny_model("llama")
    before = _snapshot(model)
    selected = _layer_params(model, 1)
    engine = ZOEngine(selected, eps=1e-2)
    ids = torch.arange(10).unsqueeze(0)
    engine.step(0, seed=7, lr=1e-2, loss_fn=lambda: model(input_ids=ids).logits.float().mean())
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and changed <= set(selected)


def _z(engine: ZOEngine, name: str, seed: int) -> torch.Tensor:
    """The direction ``engine`` gives tensor ``name`` for a direction seed."""
    param = engine.params[name]
    return Direction(engine.settings.direction, param.shape, param.device, tensor_seed(seed, name), pool_seed=seed).full()


def test_update_follows_the_regenerated_direction():
    model = tiny_model("llama")
    params = _layer_params(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    engine = ZOEngine(params, eps=1e-3)
    ids = torch.arange(10).unsqueeze(0)
    record = engine.step(0, seed=99, lr=0.5, loss_fn=lambda: model(input_ids=ids).logits.float().mean())
    for name, param in params.items():
        z = _z(engine, name, 99)
        expected = before[name] - 0.5 * record.projected_grad * z
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-6)


def test_tensors_get_independent_directions():
    weight = torch.zeros(64, 64)
    a = gaussian_direction(weight, tensor_seed(5, "layers.0.q.weight"))
    b = gaussian_direction(weight, tensor_seed(5, "layers.0.k.weight"))
    assert not torch.equal(a, b)
    correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert abs(float(correlation)) < 0.05
    assert torch.equal(a, gaussian_direction(weight, tensor_seed(5, "layers.0.q.weight")))
    assert step_seed(0, 1) != step_seed(0, 2)


def test_non_finite_loss_skips_and_leaves_weights_untouched():
    model = tiny_model("llama")
    params = _layer_params(model)
    before = _snapshot(model)
    engine = ZOEngine(params, eps=1e-2)
    record = engine.step(0, seed=3, lr=1.0, loss_fn=lambda: float("nan"))
    assert record.skipped and math.isnan(record.projected_grad)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_same_seed_gives_the_same_step_twice():
    ids = torch.arange(10).unsqueeze(0)
    results = []
    for _ in range(2):
        model = tiny_model("gpt2")
        engine = ZOEngine(_layer_params(model), eps=1e-3)
        for step in range(3):
            engine.step(step, step_seed(11, step), 1e-2, lambda: model(input_ids=ids).logits.float().pow(2).mean())
        results.append(_snapshot(model))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_spsa_estimate_agrees_with_the_true_gradient_in_expectation(direction):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 6))
    data = torch.randn(32, 6)
    target = torch.randn(32, 8)

    def loss() -> torch.Tensor:
        return ((data @ weight.T - target) ** 2).mean()

    true_grad = torch.autograd.grad(loss(), weight)[0]
    engine = ZOEngine({"w": weight}, settings=ZOSettings(eps=1e-3, direction=direction))
    estimate = torch.zeros_like(weight)
    directions = 600
    with torch.no_grad():
        for i in range(directions):
            record = engine.step(i, seed=1000 + i, lr=0.0, loss_fn=loss)
            estimate += record.projected_grad * _z(engine, "w", 1000 + i)
    estimate /= directions
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(), true_grad.flatten(), dim=0)
    assert cosine > 0.8


def test_bf16_model_restores_exactly_through_the_fp32_master():
    model = tiny_model("llama").to(torch.bfloat16)
    before = _snapshot(model)
    engine = ZOEngine(_layer_params(model), eps=1e-3)
    ids = torch.arange(12).unsqueeze(0)
    for step in range(3):
        engine.step(step, step_seed(5, step), 0.0, lambda: model(input_ids=ids).logits.float().pow(2).mean())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(engine.theta(n).dtype == torch.float32 for n in engine.params)


def test_small_bf16_updates_accumulate_in_the_master_copy():
    model = tiny_model("llama").to(torch.bfloat16)
    params = _layer_params(model)
    engine = ZOEngine(params, eps=1e-3)
    start = {n: engine.theta(n).clone() for n in params}
    # Far below the bf16 resolution of the weights. Three steps: a sum of an odd number of ±1
    # entries is never zero, so every entry must have moved.
    for step in range(3):
        engine.apply_update(step_seed(1, step), 1.0, 1e-5)
    moved = sum(int((engine.theta(n) != start[n]).sum()) for n in params)
    assert moved > 0.9 * sum(p.numel() for p in params.values())


def test_more_directions_lower_the_variance_of_the_estimate():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 5))
    data, target = torch.randn(16, 5), torch.randn(16, 6)

    def loss() -> torch.Tensor:
        return ((data @ weight.T - target) ** 2).mean()

    true_grad = torch.autograd.grad(loss(), weight)[0]

    def squared_errors(num_directions: int) -> float:
        from zorefine.zo.engine import ZOSettings, direction_seed

        engine = ZOEngine({"w": weight}, settings=ZOSettings(eps=1e-3, num_directions=num_directions))
        errors = []
        with torch.no_grad():
            for trial in range(150):
                grads, _, _ = engine.estimate(trial, 1e-3, loss)
                engine.restore()
                estimate = sum(g * _z(engine, "w", direction_seed(trial, i)) for i, g in enumerate(grads)) / len(grads)
                errors.append(float((estimate - true_grad).pow(2).sum()))
        return sum(errors) / len(errors)

    assert squared_errors(8) < 0.35 * squared_errors(1)


@pytest.mark.parametrize("optimizer", ["momentum", "adam", "sign"])
def test_optimizers_descend_a_quadratic(optimizer):
    from zorefine.zo.engine import ZOSettings

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 4))
    target = torch.zeros(4, 4)
    engine = ZOEngine({"w": weight}, settings=ZOSettings(eps=1e-3, optimizer=optimizer, num_directions=4))
    start = float((weight.detach() - target).pow(2).sum())
    lr = {"momentum": 0.01, "adam": 0.05, "sign": 0.02}[optimizer]
    for step in range(60):
        engine.step(step, step_seed(2, step), lr, lambda: (weight - target).pow(2).sum())
    assert float((weight.detach() - target).pow(2).sum()) < 0.5 * start
    assert set(engine.state) <= {"w"}


def test_rademacher_directions_are_signs_seeded_and_replayable(tmp_path):
    from zorefine.zo.directions import rademacher_direction
    from zorefine.zo.engine import ZOSettings

    weight = torch.zeros(37, 11)
    z = rademacher_direction(weight, 3)
    assert z.shape == weight.shape and set(z.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(z, rademacher_direction(weight, 3)) and not torch.equal(z, rademacher_direction(weight, 4))
    assert abs(float(z.mean())) < 0.1
    model = tiny_model("llama")
    before = _snapshot(model)
    engine = ZOEngine(_layer_params(model), settings=ZOSettings(eps=1e-2, direction="rademacher"))
    ids = torch.arange(8).unsqueeze(0)
    engine.step(0, 9, 0.0, lambda: model(input_ids=ids).logits.float().mean())
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("optimizer", ["adam", "sign"])
def test_normalized_optimizers_step_relative_to_each_tensor_under_relative_eps(optimizer):
    """Adam and sign steps have unit size per entry; relative ε must scale them per tensor like SGD."""
    from zorefine.zo.engine import ZOSettings

    torch.manual_seed(0)
    small = torch.nn.Parameter(torch.randn(8, 8) * 0.01)
    large = torch.nn.Parameter(small.detach() * 100)
    start_small, start_large = small.detach().clone(), large.detach().clone()
    engine = ZOEngine({"small": small, "large": large}, settings=ZOSettings(eps=0.1, eps_mode="relative", optimizer=optimizer))
    engine.step(0, step_seed(0, 0), 0.01, lambda: small.sum() + large.sum() / 100)
    moved_small = float((small.detach() - start_small).abs().mean())
    moved_large = float((large.detach() - start_large).abs().mean())
    assert moved_small > 0
    assert moved_large == pytest.approx(100 * moved_small, rel=1e-3)


def test_an_engine_leaves_the_settings_it_was_given_as_they_were():
    model = tiny_model("llama")
    settings = ZOSettings(eps=1e-3)
    engine = ZOEngine(_layer_params(model), eps=0.5, settings=settings)
    assert engine.settings.eps == 0.5 and settings.eps == 1e-3


@pytest.mark.parametrize("num_directions", [1, 2, 3])
@pytest.mark.parametrize("evaluate_clean", [False, True])
def test_a_step_costs_what_step_cost_says(monkeypatch, num_directions, evaluate_clean):
    from zorefine.zo import directions
    from zorefine.zo.engine import step_cost

    model = tiny_model("llama")
    params = {"w": _layer_params(model)["self_attn.q_proj.weight"] if "self_attn.q_proj.weight" in _layer_params(model)
              else next(iter(_layer_params(model).values()))}
    engine = ZOEngine(params, settings=ZOSettings(eps=1e-2, num_directions=num_directions))
    draws, forwards = [], []
    real_chunks = directions.Direction.chunks
    monkeypatch.setattr(directions.Direction, "chunks", lambda self: draws.append(self.seed) or real_chunks(self))
    engine.step(0, 7, 1e-3, lambda: forwards.append(1) or float(params["w"].sum()), evaluate_clean=evaluate_clean)
    assert (len(forwards), len(draws)) == step_cost(num_directions, evaluate_clean)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_decaying_schedule_still_moves_the_weights_on_its_last_step(schedule):
    from zorefine.zo.schedule import scheduled

    values = [scheduled(1.0, step, 10, schedule) for step in range(10)]
    assert values[0] == 1.0 and all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] > 0.0
    if schedule == "linear":
        assert values[-1] == pytest.approx(0.1)
    # The floor of an ε schedule is where a step past the last would be.
    assert scheduled(1.0, 10, 10, schedule, final_fraction=0.1) == pytest.approx(0.1)


def test_a_resumed_trajectory_carries_the_resumed_run_s_header(tmp_path):
    from zorefine.zo.engine import ZOStepRecord
    from zorefine.zo.trajectory import TrajectoryWriter, read_trajectory

    log = tmp_path / "trajectory.jsonl"
    with TrajectoryWriter(log, {"refine": {"steps": 20}}, 0) as writer:
        for step in range(5):
            writer.append(ZOStepRecord(step, step, 0.1, 1e-3, 1.0, 0.9))
    # Killed after 5 of 20 steps; resumed as a run of 10 steps.
    with TrajectoryWriter(log, {"refine": {"steps": 10}}, 5) as writer:
        writer.append(ZOStepRecord(5, 5, 0.1, 1e-3, 1.0, 0.9))
    header, steps = read_trajectory(log)
    assert header["refine"]["steps"] == 10 and [s.step for s in steps] == list(range(6))
    assert sum('"type": "header"' in line for line in log.read_text().splitlines()) == 1


def _paired_engines(arch: str, dtype: torch.dtype, layer: int = 0):
    """Two identical models with an engine each: one settles every step, the other defers."""
    models = [tiny_model(arch).to(dtype) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    params = [dict(find_decoder_layers(m).parameters(layer)) for m in models]
    engines = [ZOEngine(p, settings=ZOSettings(eps=1e-2)) for p in params]
    ids = torch.arange(12).unsqueeze(0)
    losses = [lambda m=m: float(m(input_ids=ids).logits.float().pow(2).mean()) for m in models]
    return models, engines, losses


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("llama", torch.bfloat16)])
def test_a_deferred_update_gives_the_same_losses_and_weights_bit_for_bit(arch, dtype):
    models, (eager, deferred), (loss_eager, loss_deferred) = _paired_engines(arch, dtype)
    names = list(eager.params)
    for step in range(6):
        # A subset, the clean evaluation (curvature schedule) and the whole selection, in turn.
        subset = names[: len(names) // 2] if step % 3 == 1 else None
        clean = step % 3 == 2
        a = eager.step(step, 100 + step, 0.05, loss_eager, names=subset, evaluate_clean=clean)
        b = deferred.step(step, 100 + step, 0.05, loss_deferred, names=subset, evaluate_clean=clean, settle=False)
        assert (a.loss_plus, a.loss_minus, a.loss_clean) == (b.loss_plus, b.loss_minus, b.loss_clean), step
        for name in names:
            assert torch.equal(eager.weight(name), deferred.weight(name)), (step, name)
    deferred.restore()
    for (name, x), y in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(x, y), name


def test_an_unsettled_step_leaves_the_update_pending_until_restore():
    models, (eager, deferred), (loss_eager, loss_deferred) = _paired_engines("llama", torch.float32)
    eager.step(0, 5, 0.1, loss_eager)
    deferred.step(0, 5, 0.1, loss_deferred, settle=False)
    name = next(iter(deferred.params))
    # The weight still holds θ − εz; the engine's θ is already the updated one.
    assert not torch.equal(deferred.params[name], eager.params[name])
    assert torch.equal(deferred.weights()[name], eager.params[name])
    assert not torch.equal(deferred.params[name], eager.params[name])  # looking θ up writes nothing
    deferred.restore()
    assert torch.equal(deferred.params[name], eager.params[name])


def _inplace_run(model, steps: int, settle: bool):
    """Steps of every kind with store=inplace; returns the engine and its records."""
    params = dict(find_decoder_layers(model).parameters(0))
    engine = ZOEngine(params, settings=ZOSettings(eps=1e-2, store="inplace"))
    names = list(params)
    ids = torch.arange(12).unsqueeze(0)
    records = []
    for step in range(steps):
        subset = names[: len(names) // 2] if step % 4 == 1 else None
        clean = step % 4 == 2
        # One step sees a non-finite loss and is skipped (its moves still round θ).
        loss = (lambda: float("nan")) if step == 3 else (lambda: float(model(input_ids=ids).logits.float().pow(2).mean()))
        record = engine.step(step, 200 + step, 0.05, loss, names=subset, evaluate_clean=clean, settle=settle)
        record.unit = "half" if subset is not None else None
        records.append(record)
    engine.restore()
    return engine, records, {"half": names[: len(names) // 2]}


def test_the_inplace_store_keeps_no_copy_and_replays_its_rounding_bit_for_bit():
    from zorefine.zo.replay import apply_records
    from zorefine.zo.weight_store import InPlaceShift

    model = tiny_model("llama")
    start = _snapshot(model)
    engine, records, units = _inplace_run(model, 8, settle=False)
    assert all(isinstance(s, InPlaceShift) for s in engine.stores.values())
    assert not any(isinstance(v, torch.Tensor) for s in engine.stores.values() for k, v in vars(s).items() if k != "param" and k != "_flat")
    assert records[3].skipped and not records[4].skipped
    replayed = tiny_model("llama")
    replayed.load_state_dict(start)
    replay_engine = ZOEngine(dict(find_decoder_layers(replayed).parameters(0)), settings=ZOSettings(eps=1e-2, store="inplace"))
    assert apply_records(replay_engine, records, units) == 7
    for (name, x), y in zip(model.state_dict().items(), replayed.state_dict().values()):
        assert torch.equal(x, y), name
    # Replaying the updates alone (as for the exact stores) misses the rounding of the moves.
    alone = tiny_model("llama")
    alone.load_state_dict(start)
    copy_engine = ZOEngine(dict(find_decoder_layers(alone).parameters(0)), settings=ZOSettings(eps=1e-2))
    apply_records(copy_engine, records, units)
    differs = [n for n, x in model.state_dict().items() if not torch.equal(x, alone.state_dict()[n])]
    assert differs
    for name in differs:
        torch.testing.assert_close(model.state_dict()[name], alone.state_dict()[name], rtol=0, atol=1e-6)


def test_the_inplace_store_defers_an_update_without_changing_a_bit():
    models = [tiny_model("llama") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    (_, eager, _), (_, deferred, _) = _inplace_run(models[0], 6, settle=True), _inplace_run(models[1], 6, settle=False)
    # repr: the skipped step's NaN equals itself there.
    assert [repr((r.loss_plus, r.loss_minus)) for r in eager] == [repr((r.loss_plus, r.loss_minus)) for r in deferred]
    for (name, x), y in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(x, y), name
