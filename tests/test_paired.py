"""Paired comparisons: the same prompts and noise draws, a hierarchical interval, 'better' only past zero."""

from __future__ import annotations

import json

import numpy as np

from tests.test_compare import two_runs  # noqa: F401  (the module-scoped fixture)
from zorefine.evaluate.compare import compare
from zorefine.evaluate.paired import paired_differences
from zorefine.stats import hierarchical_bootstrap, paired_verdict


def test_a_constant_difference_has_a_zero_width_interval_that_excludes_zero():
    interval = hierarchical_bootstrap(np.full((3, 4, 10), -0.25))
    assert interval["mean"] == interval["low"] == interval["high"] == -0.25
    assert paired_verdict(interval) == "better" and paired_verdict({**interval, "mean": 0.25}) == "worse"


def test_a_difference_of_pure_noise_is_no_significant_change():
    rng = np.random.default_rng(3)
    interval = hierarchical_bootstrap(rng.choice([-1.0, 0.0, 1.0], size=(5, 3, 64)))
    assert interval["low"] < 0 < interval["high"] and paired_verdict(interval) == "no significant change"


def test_the_interval_carries_the_spread_between_refinement_seeds():
    # Two seeds that disagree completely, prompts that agree within each seed: a flat bootstrap over
    # all cells would call this certain; resampling the seeds first does not.
    data = np.stack([np.full((2, 50), -1.0), np.full((2, 50), 0.6)])
    nested = hierarchical_bootstrap(data)
    flat = hierarchical_bootstrap(data.reshape(1, 1, -1))
    assert nested["low"] <= -0.99 and nested["high"] >= 0.59
    assert flat["high"] - flat["low"] < 0.5 * (nested["high"] - nested["low"])


def _result(outcomes_by_seed: list[list[int]], sigma: float = 0.5) -> dict:
    conditions = [{"label": f"wnoise σ={sigma:g} seed={s}", "family": "weight_noise", "sigma": sigma, "seed": s,
                   "outcomes": {"attack_success": values}} for s, values in enumerate(outcomes_by_seed)]
    return {"conditions": conditions}


def test_paired_differences_pair_the_same_prompt_under_the_same_draw():
    before = _result([[1, 1, 0, 1] * 8, [1, 0, 1, 1] * 8])
    fewer = _result([[0, 1, 0, 1] * 8, [0, 0, 1, 1] * 8])  # one harmful prompt fewer answered per 4, every draw
    same = paired_differences([before], [before])["wnoise σ=0.5"]
    assert same["mean"] == 0 and same["verdict"] == "no significant change"
    better = paired_differences([fewer, fewer], [before])["wnoise σ=0.5"]
    assert better["mean"] == -0.25 and better["refinement_seeds"] == 2 and better["verdict"] == "better"


def test_the_evaluate_stage_and_compare_print_paired_differences(two_runs, tmp_path):  # noqa: F811
    metrics = json.loads((two_runs / "0" / "metrics.json").read_text())
    paired = metrics["paired_after_minus_before"]["attack_success"]
    assert {"clean", "wnoise σ=0.1", "wnoise σ=0.3", "rtn:int8"} <= set(paired)
    for cell in paired.values():
        assert cell["low"] <= cell["mean"] <= cell["high"] and cell["verdict"] in ("better", "worse", "no significant change")
    assert "Paired differences, after − before" in (two_runs / "0" / "report.md").read_text()
    written = compare([two_runs], tmp_path)
    markdown = written["markdown"].read_text()
    assert "Paired: each setting − no refinement" in markdown and "Paired: each setting − zo" in markdown
    records = json.loads(written["json"].read_text())["paired"]
    assert records["reference"].startswith("zo") and len(records["vs_none"]) == 2 and len(records["vs_reference"]) == 1


def test_a_model_judge_is_selected_from_the_config(micro_checkpoint, tmp_path):
    from tests.conftest import make_cfg
    from zorefine.evaluate import stage as evaluate
    from zorefine.judge.model import ModelJudge
    from zorefine.run import Run

    seen = []
    real_call = ModelJudge.__call__

    def recording(self, prompts, responses):
        seen.append(len(prompts))
        return real_call(self, prompts, responses)

    import pytest

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModelJudge, "__call__", recording)
        cfg = make_cfg(micro_checkpoint, stages="[evaluate]", **{"evaluate.judge": "model", "evaluate.judge_path": str(micro_checkpoint)})
        evaluate.run(Run(cfg, tmp_path))
    assert seen  # every verdict of the evaluation came from the judge model
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["evaluate"]["judge"] == "model"


def test_the_seeds_of_a_random_spec_pool_into_one_threat():
    from zorefine.evaluate.paired import outcome_arrays

    conditions = [{"label": f"anoise:0.4:seed={s}", "family": "quantization", "sigma": None, "seed": None,
                   "outcomes": {"attack_success": [s % 2, 1, 0]}} for s in range(5)]
    arrays = outcome_arrays({"conditions": conditions}, "attack_success")
    assert list(arrays) == ["anoise:0.4"] and arrays["anoise:0.4"].shape == (5, 3)


def test_a_sequence_classifier_judge_is_selectable_from_the_config(micro_checkpoint, tmp_path):
    from tests.conftest import make_cfg
    from tests.test_judge import _save_tiny_judge
    from zorefine.evaluate import stage as evaluate
    from zorefine.run import Run

    # A classifier whose fixed answer is label 0 = REFUSAL: every non-degenerate answer is a refusal.
    judge_dir = tmp_path / "judge"
    _save_tiny_judge(judge_dir, "classifier", {0: "REFUSAL", 1: "COMPLIANCE"})
    cfg = make_cfg(micro_checkpoint, stages="[evaluate]", **{"evaluate.judge": "model", "evaluate.judge_path": str(judge_dir)})
    evaluate.run(Run(cfg, tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["models"]["model"]["summary"]
    for cell in summary.values():
        assert cell["attack_success_rate"]["mean"] == 0.0
        assert cell["harmful_refusal_rate"]["mean"] + cell["harmful_degenerate_rate"]["mean"] == 1.0
