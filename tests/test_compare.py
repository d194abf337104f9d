"""Reports and comparisons: robust σ, per-seed intervals, HTML pages, zorefine-compare."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import make_cfg
from zorefine.evaluate.compare import compare, main as compare_main
from zorefine.evaluate.document import Bullets, Document, Image, Table
from zorefine.errors import DataError
from zorefine.pipeline import run_pipeline
from zorefine.evaluate.curves import curve_area_interval, robust_sigma
from zorefine.evaluate.robustness import ConditionResult


def _cell(mean: float) -> dict:
    return {"mean": mean, "low": mean, "high": mean, "n": 1}


def _summary(clean: float, curve: dict[float, float]) -> dict:
    summary = {"clean": {"family": "clean", "sigma": None, "harmful_refusal_rate": _cell(clean)}}
    for sigma, value in curve.items():
        summary[f"wnoise σ={sigma:g}"] = {"family": "weight_noise", "sigma": sigma, "harmful_refusal_rate": _cell(value)}
    return summary


def test_robust_sigma_is_the_last_sigma_before_refusal_first_drops_below_the_level():
    assert robust_sigma(_summary(1.0, {0.2: 0.95, 0.4: 0.91, 0.6: 0.5, 0.8: 0.93}), "harmful_refusal_rate", 0.9) == 0.4
    assert robust_sigma(_summary(1.0, {0.2: 0.8}), "harmful_refusal_rate", 0.9) == 0.0
    assert robust_sigma(_summary(0.85, {0.2: 0.95}), "harmful_refusal_rate", 0.9) is None
    assert robust_sigma(_summary(1.0, {0.2: 1.0, 0.4: 0.9}), "harmful_refusal_rate", 0.9) == 0.4


def _result(family: str, sigma, seed, refusal: float) -> ConditionResult:
    return ConditionResult("x", family, sigma, seed, refusal, 0, 0, 0, 0, 0, None, 0.0, 0.0)


def test_curve_area_interval_is_over_the_per_seed_curves():
    results = [_result("clean", None, None, 1.0)]
    results += [_result("weight_noise", 0.5, s, v) for s, v in [(0, 1.0), (1, 0.0)]]
    results += [_result("weight_noise", 1.0, s, v) for s, v in [(0, 1.0), (1, 0.0)]]
    interval = curve_area_interval(results)
    # Seed 0: flat at 1 → area 1. Seed 1: 1 → 0 at 0.5, then 0 → area 0.25.
    assert interval["n"] == 2 and math.isclose(interval["mean"], 0.625)
    assert interval["low"] < 0.25 and interval["high"] > 1.0


def test_html_page_embeds_its_plots_and_escapes_text(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot = tmp_path / "p.png"
    plt.plot([0, 1]), plt.savefig(plot), plt.close()
    doc = Document("t", [Bullets(["**bold** <script>"]), Table(["a"], [["1 < 2"]]), Image(plot, "cap")])
    markdown_path, html_path = doc.write(tmp_path, "report")
    page = html_path.read_text()
    assert "data:image/png;base64," in page and "<b>bold</b>" in page
    assert "<script>" not in page and "1 &lt; 2" in page
    assert "![cap](p.png)" in markdown_path.read_text()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, micro_tokenizer):
    """Two evaluated micro runs from one start model: ZO on the analyzer's layer, and continued SFT."""
    from tests.conftest import save_micro_checkpoint

    root = tmp_path_factory.mktemp("sweep")
    checkpoint = save_micro_checkpoint("llama", micro_tokenizer, root / "start")
    common = {"evaluate.sigmas": "[0.1,0.3]", "evaluate.seeds": 2, "refine.lr": 1e-2, "refine.fo_lr": 1e-2}
    zo = make_cfg(checkpoint, stages="[analyze,refine,evaluate]", **common)
    sft = make_cfg(checkpoint, stages="[refine,evaluate]", **{**common, "refine.method": "sft"})
    run_pipeline(zo, root / "0")
    run_pipeline(sft, root / "1")
    return root


def test_compare_writes_one_table_with_the_unrefined_baseline_and_every_run(two_runs, tmp_path):
    written = compare([two_runs], tmp_path)
    rows = json.loads(written["json"].read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "zo", "sft"]
    none, zo, sft = rows
    # Every pass spent: 3 ZO steps (6) and SFT's equal budget, decoding, and for ZO the analysis it ranked by.
    zo_refine, sft_refine = (json.loads((two_runs / d / "refine.json").read_text()) for d in ("0", "1"))
    analysis = json.loads((two_runs / "0" / "sensitivity.json").read_text())["cost"]["forward_passes"]
    assert zo_refine["analysis_forward_passes"] == analysis > 0 and sft_refine["analysis_forward_passes"] == 0
    assert none["forward_passes"] == 0
    assert zo["forward_passes"] == 6 + analysis + zo_refine["target_decode_calls"]
    assert sft["forward_passes"] == 6 + sft_refine["target_decode_calls"]
    for row in (zo, sft):
        assert math.isclose(row["gain"], row["refusal_area"]["mean"] - none["refusal_area"]["mean"])
        assert row["refusal_area"]["n"] == 2
    markdown = written["markdown"].read_text()
    assert "none (alignment only)" in markdown and "refusal, rtn:int8" in markdown
    assert "data:image/png;base64," in written["html"].read_text()
    assert written["gain_plot"].stat().st_size > 0 and written["curves_plot"].stat().st_size > 0


def test_compare_accepts_run_directories_one_by_one(two_runs, tmp_path, capsys):
    assert compare_main([str(two_runs / "1"), str(two_runs / "0"), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "sft", "zo"]
    assert "| model |" in capsys.readouterr().out


def test_compare_rejects_what_is_not_a_run(tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist"):
        compare([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    assert compare_main([str(tmp_path / "empty")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{}")
    with pytest.raises(DataError, match="not a zorefine metrics file"):
        compare([tmp_path / "bad"])


def _record(method, overrides, gain, asr):
    return {"method": method, "overrides": overrides, "gain": gain, "asr_under_noise": asr, "clean_refusal": 1.0,
            "overrefusal": 0.3, "utility_loss": 7.0, "quantized_refusal": {"rtn:int4": 1.0}, "forward_passes": 400,
            "seconds": 10.0, "asr_by_condition": {"wnoise σ=0.8": {"mean": asr, "low": asr - 0.1, "high": asr + 0.1, "n": 3}}}


def test_runs_differing_only_in_the_refinement_seed_pool_into_one_row_with_an_interval():
    from zorefine.evaluate.compare import pooled_rows

    records = [_record("zo", [f"refine.seed={s}", "refine.lr=0.05"], g, a) for s, g, a in [(0, 0.01, 0.3), (1, 0.03, 0.2), (2, 0.02, 0.25)]]
    records += [_record("zo", [f"refine.seed={s}", "refine.lr=0.1"], 0.05, 0.1) for s in (0, 1)]
    records += [_record("sft", ["refine.method=sft", "refine.lr=0.05"], 0.0, 0.4)]  # no seed override: not pooled
    header, rows, pooled = pooled_rows(records, "refine.seed")
    assert [p["label"] for p in pooled] == ["zo [refine.lr=0.05]", "zo [refine.lr=0.1]"]
    first, second = pooled
    assert first["runs"] == 3 and math.isclose(first["gain"]["mean"], 0.02) and math.isclose(first["asr_under_noise"]["mean"], 0.25)
    assert first["gain"]["low"] < 0.02 < first["gain"]["high"]
    assert second["gain"]["low"] == second["gain"]["high"] == 0.05  # identical runs: an empty interval
    # Every threat condition is pooled too: the mean over runs of each run's mean over noise seeds.
    noisy = first["asr_by_condition"]["wnoise σ=0.8"]
    assert noisy["n"] == 3 and math.isclose(noisy["mean"], 0.25) and noisy["low"] < 0.25 < noisy["high"]
    assert first["forward_passes"] == 400 and first["seconds"] == 10.0
    assert len(rows) == 2 and len(header) == len(rows[0]) and header[-1] == "refusal, rtn:int4 ↑"
