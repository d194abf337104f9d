"""The store-cost benchmark runs on the built-in config and reports every store and selection."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "store_cost.py"


@pytest.fixture(scope="module")
def store_cost():
    spec = importlib.util.spec_from_file_location("store_cost", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(store_cost):
    """One measurement for every test that reads it (medians of three: one slow sample on a busy
    machine must not decide a bound)."""
    return store_cost.measure("builtin", batch=2, seq=16, repeats=3)


def test_store_cost_reports_each_store_as_at_least_two_forwards_per_step(store_cost, results):
    for which in ("top_half", "full"):
        for row, _, _ in store_cost.ENGINES:
            assert results[f"{which}/{row}/engine_seconds"] > 0
            # Two forward passes per step: a ratio under ~1.5 would mean a pass was skipped.
            assert results[f"{which}/{row}/step_over_forward"] > 1.5


@pytest.mark.parametrize("row", ["compensated", "tiled_inplace"])
def test_store_cost_profiles_an_engine(store_cost, row):
    text = store_cost.profile_engine("builtin", batch=2, seq=16, row=row)
    assert "weight_store.py" in text


def test_a_weight_pass_writes_every_weight_back_unchanged(store_cost):
    import torch

    weights = [torch.randn(64, 64) * 0.02, torch.randn(128) * 0.02]
    before = [w.clone() for w in weights]
    store_cost.weight_pass(weights)
    assert all(torch.equal(a, b) for a, b in zip(before, weights))


def test_store_cost_states_each_store_s_work_in_weight_passes(store_cost, results):
    for which in ("top_half", "full"):
        assert results[f"{which}/weight_pass_seconds"] > 0
        # A store moves each weight at least twice a step (+εz, then −2εz), so its work cannot
        # cost less than one plain pass over the same weights.
        for row, _, _ in store_cost.ENGINES:
            assert results[f"{which}/{row}/engine_passes"] >= 1.0
