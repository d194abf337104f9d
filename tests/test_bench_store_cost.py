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


def test_store_cost_reports_each_store_as_at_least_two_forwards_per_step(store_cost):
    results = store_cost.measure("builtin", batch=2, seq=16, repeats=1)
    for which in ("top_half", "full"):
        for store in store_cost.STORES:
            assert results[f"{which}/{store}/engine_seconds"] > 0
            # Two forward passes per step: a ratio under ~1.5 would mean a pass was skipped.
            assert results[f"{which}/{store}/step_over_forward"] > 1.5


def test_store_cost_profiles_the_compensated_store(store_cost):
    text = store_cost.profile_compensated("builtin", batch=2, seq=16)
    assert "weight_store.py" in text
