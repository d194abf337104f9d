"""bench/zo_step.py runs on the built-in config and reports every row its docstring names."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "zo_step.py"


@pytest.fixture(scope="module")
def zo_step():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("zo_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zo_step_reports_every_engine_against_an_inference_forward(zo_step):
    # Medians of three pairs: one slow sample on a busy machine must not decide a bound.
    results = zo_step.measure("builtin", batch=2, seq=16, repeats=3, device="cpu")
    for which in ("full", "top_half", "default"):
        for row in ("mezo", "gaussian", "gaussian_inplace", "rademacher", "rademacher_compensated", "rademacher_inplace", "tiled_inplace"):
            # Every step makes at least two forward passes of what it perturbs.
            assert results[f"{which}/{row}/step_over_forward"] > 1.0, (which, row)
        assert 0 < results[f"{which}/tiled_inplace/engine_share"] < 1
    assert results["top_half/tiled_inplace_cached/step_over_forward"] > 0
    for which in ("full", "top_half", "default"):
        # Paired rows: a step against a step, both positive and finite.
        for row in ("speedup_vs_mezo", "speedup_vs_mezo_inplace", "defer_gain"):
            assert 0 < results[f"{which}/{row}"] < float("inf"), (which, row)
