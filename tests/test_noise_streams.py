"""Analysis, training, validation and test draw noise from streams that never share a seed."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_cfg
from zorefine.evaluate.robustness import threat_grid
from zorefine.refine import first_order
from zorefine.run import Run
from zorefine.threats.streams import STREAMS, stream_of, stream_seed


def test_streams_are_disjoint_by_construction():
    indices = list(range(5000)) + [2**39 + 7, 2**40 - 1]
    seen: dict[int, str] = {}
    for stream in STREAMS:
        for index in indices:
            seed = stream_seed(stream, index)
            assert stream_of(seed) == stream
            assert seen.setdefault(seed, stream) == stream
    assert stream_of(3) is None  # a hand-written seed belongs to no stream
    with pytest.raises(ValueError):
        stream_seed("test", 2**40)
    with pytest.raises(ValueError):
        stream_seed("holdout", 0)


def _grid_seeds(stream: str) -> set[int]:
    grid = threat_grid([0.2, 0.4], 3, ["rtn:int4", "anoise:0.1"], stream=stream)
    return {c.threat.seed for c in grid if c.threat is not None and hasattr(c.threat, "seed")}


def test_validation_and_test_grids_use_their_own_streams():
    val, test = _grid_seeds("val"), _grid_seeds("test")
    assert {stream_of(s) for s in val} == {"val"} and {stream_of(s) for s in test} == {"test"}
    assert not val & test


def test_analysis_and_rwp_training_draw_from_their_own_streams(micro_checkpoint, tmp_path, monkeypatch):
    from zorefine.analyze import stage as analyze
    from zorefine.refine import stage as refine

    analyze.run(Run(make_cfg(micro_checkpoint, stages="[analyze]"), tmp_path / "analyze"))
    seeds = json.loads((tmp_path / "analyze" / "sensitivity.json").read_text())["seeds"]
    assert {stream_of(s) for s in seeds} == {"analyze"}

    drawn: list[int] = []
    real = first_order.WeightNoise

    def recording(*args, **kwargs):
        drawn.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(first_order, "WeightNoise", recording)
    refine.run(Run(make_cfg(micro_checkpoint, stages="[refine]", **{"refine.method": "rwp", "refine.steps": 2}), tmp_path / "rwp"))
    assert drawn and {stream_of(s) for s in drawn} == {"train"}
