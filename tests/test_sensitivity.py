"""Units, selection policies, antithetic threats, curvature and rank agreement."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny_models import tiny_model
from zorefine.errors import ConfigError
from zorefine.models.selection import Selection, SelectionPolicy, select_units
from zorefine.analyze.ranking import rank_units
from zorefine.analyze.sensitivity import ThreatFamily
from zorefine.stats import spearman
from zorefine.threats import WeightNoise, parse_threat, threatened
from zorefine.models.units import discover_units, units_by_name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_units_at_each_granularity_partition_the_decoder_parameters(arch):
    model = tiny_model(arch)
    all_names = None
    for granularity in ("layer", "module", "tensor"):
        units = discover_units(model, granularity)
        names = [name for unit in units for name in unit.params]
        assert len(names) == len(set(names))  # no parameter in two units
        all_names = all_names or set(names)
        assert set(names) == all_names
    modules = discover_units(model, "module")
    assert {u.kind for u in modules} >= {"attention", "mlp"}
    assert [u.layer for u in modules] == sorted(u.layer for u in modules)
    assert units_by_name(model, [modules[1].name])[0].params.keys() == modules[1].params.keys()
    with pytest.raises(ConfigError, match="unknown units"):
        units_by_name(model, ["layers.99"])


RANKING = ["c", "a", "d", "b"]
SCORES = {"c": 4.0, "a": 3.0, "d": 1.0, "b": -0.5}
SIZES = {"a": 10, "b": 10, "c": 30, "d": 50}


@pytest.mark.parametrize(
    "policy, expected",
    [
        (SelectionPolicy("top_k", top_k=2), ["c", "a"]),
        (SelectionPolicy("budget", budget=0.45), ["c", "a"]),  # 40 of 100 weights; d would exceed 45
        (SelectionPolicy("budget", budget=0.05), ["c"]),  # at least one unit
        (SelectionPolicy("threshold", threshold=1.0), ["c", "a", "d"]),
        (SelectionPolicy("names", names=["b", "[cd]"]), ["b", "c", "d"]),
    ],
)
def test_selection_policies(policy, expected):
    assert select_units(RANKING, SCORES, SIZES, policy) == expected


def test_selection_policies_fail_clearly():
    with pytest.raises(ConfigError, match="threshold"):
        select_units(RANKING, SCORES, SIZES, SelectionPolicy("threshold", threshold=10.0))
    with pytest.raises(ConfigError, match="matches no unit"):
        select_units(RANKING, SCORES, SIZES, SelectionPolicy("names", names=["zz"]))
    with pytest.raises(ConfigError, match="regular expression"):
        select_units(RANKING, SCORES, SIZES, SelectionPolicy("names", names=["(["]))
    with pytest.raises(ConfigError, match="policy"):
        SelectionPolicy("random")


def test_a_saved_selection_round_trips_and_resolves(tmp_path):
    model = tiny_model("llama")
    units = discover_units(model, "module")[:2]
    selection = Selection.of(units, "module", SelectionPolicy("top_k", top_k=2), "safety_loss_rise")
    selection.save(tmp_path / "selection.json")
    loaded = Selection.load(tmp_path / "selection.json")
    assert loaded == selection
    assert list(loaded.resolve(model)) == [name for u in units for name in u.params]
    (tmp_path / "bad.json").write_text('{"units": []}')
    with pytest.raises(ConfigError, match="not a zorefine selection"):
        Selection.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="does not exist"):
        Selection.load(tmp_path / "missing.json")


def test_antithetic_weight_noise_is_the_mirror_image_and_restores_exactly():
    model = tiny_model("llama")
    unit = discover_units(model, "layer")[0]
    name, param = next(iter(unit.params.items()))
    before = param.detach().clone()
    with threatened(model, WeightNoise(0.3, seed=4), params=unit.params):
        plus = param.detach() - before
    with threatened(model, parse_threat("wnoise:0.3:seed=4:negate=1"), params=unit.params):
        minus = param.detach() - before
    assert torch.allclose(plus, -minus, atol=1e-6) and plus.abs().sum() > 0
    assert torch.equal(param.detach(), before)
    assert parse_threat(WeightNoise(0.3, seed=4, negate=True).spec) == WeightNoise(0.3, seed=4, negate=True)


def test_threat_families_sample_per_seed_only_when_random():
    noise = ThreatFamily("wnoise:0.5")
    assert noise.random and noise.label == "wnoise_rel_s0.5"
    pair = noise.samples(7, antithetic=True)
    assert [t.seed for t in pair] == [7, 7] and [t.negate for t in pair] == [False, True]
    assert len(noise.samples(7, antithetic=False)) == 1
    quantization = ThreatFamily("rtn:int4")
    assert not quantization.random and len(quantization.samples(7, antithetic=True)) == 1


def test_spearman_and_ranking():
    a = {"x": 1.0, "y": 2.0, "z": 3.0, "w": 4.0}
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, {k: -v for k, v in a.items()}) == pytest.approx(-1.0)
    assert spearman(a, {"x": 1.0, "y": 1.0, "z": 3.0, "w": 4.0}) == pytest.approx(0.9486833, rel=1e-6)
    assert math.isnan(spearman({"x": 1.0}, {"x": 2.0}))
    assert rank_units({"a": 1.0, "b": 2.0, "c": 2.0}, ["c", "b", "a"]) == ["c", "b", "a"]


def test_curvature_tracker_measures_every_unit_then_samples_by_curvature():
    from zorefine.refine.curvature import CurvatureTracker, curvature_estimate

    assert curvature_estimate(1.5, 1.3, 1.0, 0.1) == pytest.approx(80.0)
    tracker = CurvatureTracker(["a", "b", "c"], prior={"b": 5.0})
    assert tracker.choose(0) == "a"  # no estimate yet
    tracker.observe("a", 1.0, 1.0, 1.0, 0.1)  # flat: curvature 0
    assert tracker.choose(0) == "c"
    tracker.observe("c", 2.0, 2.0, 1.0, 1.0)  # curvature 2
    assert tracker.ranking() == ["b", "c", "a"]
    picks = [tracker.choose(seed) for seed in range(2000)]
    # weights b:5, c:2, a: the floor 0.5 -> shares 5/7.5, 2/7.5, 0.5/7.5
    assert picks.count("b") / 2000 == pytest.approx(5 / 7.5, abs=0.04)
    assert picks.count("a") / 2000 == pytest.approx(0.5 / 7.5, abs=0.03)
    assert tracker.as_dict()["c"] == {"curvature": 2.0, "observations": 1}
