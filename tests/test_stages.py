"""Each stage on micro checkpoints of two architectures (Llama and GPT-2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_cfg
from zorefine.config import Stage
from zorefine.errors import DataError
from zorefine.pipeline import run_pipeline
from zorefine.run import Run
from zorefine.align import stage as align
from zorefine.analyze import stage as analyze
from zorefine.evaluate import stage as evaluate
from zorefine.refine import batches
from zorefine.refine import objective as refine_objective
from zorefine.refine import stage as refine
from zorefine.zo.replay import replay
from zorefine.zo.trajectory import read_trajectory


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_align_trains_and_writes_a_checkpoint(micro_checkpoint, tmp_path):
    run = Run(make_cfg(micro_checkpoint), tmp_path)
    summary = align.run(run)
    out = tmp_path / "checkpoints" / "aligned"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert summary["num_examples"] == 20 and summary["train_loss"] > 0
    before, after = _weights(micro_checkpoint), _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_align_disabled_passes_the_checkpoint_through(micro_checkpoint, tmp_path):
    run = Run(make_cfg(micro_checkpoint, **{"align.enabled": False}), tmp_path)
    assert align.run(run) == {"enabled": False, "checkpoint": str(micro_checkpoint)}
    assert not (tmp_path / "checkpoints").exists()


def test_analyze_ranks_every_layer_and_selects_top_k(micro_checkpoint, tmp_path):
    run = Run(make_cfg(micro_checkpoint, **{"analyze.top_k": 2}), tmp_path)
    summary = analyze.run(run)
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    layer_names = [row["unit"] for row in report["scores"]]
    assert len(layer_names) == 3 and sorted(report["ranking"]) == sorted(layer_names)
    assert summary["selected"] == report["ranking"][:2]
    for row in report["scores"]:
        for score in ("safety_loss_rise", "refusal_drop", "utility_loss_rise"):
            assert row[score]["n"] == 2 and row[score]["low"] <= row[score]["mean"] <= row[score]["high"]
    assert set(report["curvature"]["units"]) == set(layer_names)
    assert report["cost"]["forward_passes"] > 0
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["units"] == summary["selected"] and selection["layers"] == summary["selected_layers"]
    assert all(any(name.startswith(unit + ".") for unit in selection["units"]) for name in selection["parameters"])


def test_analyze_by_module_under_several_threats_with_a_parameter_budget(micro_checkpoint, tmp_path):
    overrides = {
        "analyze.granularity": "module",
        "analyze.threats": "[wnoise:0.5,anoise:0.3,rtn:int4]",
        "analyze.measure_refusal": False,
        "analyze.curvature": False,
        "analyze.policy": "budget",
        "analyze.budget": 0.2,
    }
    summary = analyze.run(Run(make_cfg(micro_checkpoint, **overrides), tmp_path))
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert {row["threat"] for row in report["scores"]} == {"wnoise_rel_s0.5", "anoise_rel_s0.3", "rtn_int4"}
    kinds = {row["kind"] for row in report["scores"]}
    assert {"attention", "mlp"} <= kinds
    deterministic = [row for row in report["scores"] if row["threat"].startswith("rtn")]
    assert all(row["trials"] == 1 and row["refusal_drop"] is None for row in deterministic)
    selection = json.loads((tmp_path / "selection.json").read_text())
    sizes = {row["unit"]: row["num_parameters"] for row in report["scores"]}
    assert sum(sizes[u] for u in selection["units"]) <= 0.2 * sum(sizes.values()) or len(selection["units"]) == 1
    assert summary["selected"] == selection["units"]


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_analyze_scores_units_under_activation_quantization(micro_checkpoint, tmp_path, granularity):
    overrides = {"analyze.granularity": granularity, "analyze.threats": "[aquant:a4,w4a4:g16]",
                 "analyze.measure_refusal": False, "analyze.curvature": False}
    analyze.run(Run(make_cfg(micro_checkpoint, **overrides), tmp_path))
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert {row["threat"] for row in report["scores"]} == {"aquant_a4", "w4a4_g16"}
    for threat in ("aquant_a4", "w4a4_g16"):
        rises = [row["safety_loss_rise"]["mean"] for row in report["scores"] if row["threat"] == threat]
        # Quantizing one unit's inputs moves the loss, by different amounts for different units.
        assert any(abs(r) > 0 for r in rises) and len(set(rises)) > 1, rises


def test_refine_reuses_a_saved_selection_from_another_run(micro_checkpoint, tmp_path):
    first = tmp_path / "first"
    analyze.run(Run(make_cfg(micro_checkpoint, **{"analyze.granularity": "tensor", "analyze.measure_refusal": False}), first))
    saved = json.loads((first / "selection.json").read_text())
    assert len(saved["parameters"]) == 1  # top_k=1 tensor
    second = tmp_path / "second"
    cfg = make_cfg(micro_checkpoint, **{"refine.selection_file": str(first / "selection.json"), "refine.lr": 1e-2})
    refine.run(Run(cfg, second))
    base, refined = _weights(micro_checkpoint), _weights(second / "checkpoints" / "refined")
    changed = {k for k in base if not torch.equal(base[k], refined[k])}
    assert changed == set(saved["parameters"])


def test_refine_touches_only_selected_layers_and_replays_exactly(micro_checkpoint, tmp_path):
    cfg = make_cfg(micro_checkpoint, **{"refine.layers": "[1]", "refine.lr": 1e-2, "refine.steps": 4})
    summary = refine.run(Run(cfg, tmp_path))
    base, refined = _weights(micro_checkpoint), _weights(tmp_path / "checkpoints" / "refined")
    changed = {k for k in base if not torch.equal(base[k], refined[k])}
    assert changed and all(".1." in k for k in changed)
    header, steps = read_trajectory(tmp_path / "trajectory.jsonl")
    assert len(steps) == 4 == summary["steps"] and header["layers"] == [1]
    assert len({s.seed for s in steps}) == 4
    # Replay: base checkpoint + log -> the refined weights, bit for bit.
    replayed = _weights(replay(micro_checkpoint, tmp_path / "trajectory.jsonl", tmp_path / "replayed"))
    for name, tensor in refined.items():
        assert torch.equal(replayed[name], tensor), name
    # A log whose seeds stood for another generator's numbers is refused, not misapplied.
    lines = (tmp_path / "trajectory.jsonl").read_text().splitlines()
    old_header = json.loads(lines[0])
    old_header["environment"]["directions_version"] = 1
    (tmp_path / "old.jsonl").write_text("\n".join([json.dumps(old_header)] + lines[1:]) + "\n")
    with pytest.raises(DataError, match="update rule v1"):
        replay(micro_checkpoint, tmp_path / "old.jsonl", tmp_path / "replayed-old")


def test_killed_refine_resumes_bit_identical(micro_checkpoint, tmp_path, monkeypatch):
    overrides = {"refine.layers": "[0]", "refine.lr": 1e-2, "refine.steps": 5}
    refine.run(Run(make_cfg(micro_checkpoint, **overrides), tmp_path / "whole"))

    calls = {"n": 0}
    original = refine_objective.response_nll_terms

    def dies_in_step_three(model, batch, weights=None):
        calls["n"] += 1
        if calls["n"] == 6:  # the first forward pass of step index 2
            raise KeyboardInterrupt
        return original(model, batch, weights)

    monkeypatch.setattr(refine_objective, "response_nll_terms", dies_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        refine.run(Run(make_cfg(micro_checkpoint, **overrides), tmp_path / "killed"))
    assert len(read_trajectory(tmp_path / "killed" / "trajectory.jsonl")[1]) == 2
    monkeypatch.setattr(refine_objective, "response_nll_terms", original)
    refine.run(Run(make_cfg(micro_checkpoint, **overrides), tmp_path / "killed"))
    whole = _weights(tmp_path / "whole" / "checkpoints" / "refined")
    resumed = _weights(tmp_path / "killed" / "checkpoints" / "refined")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_killed_evaluation_resumes_with_the_conditions_it_had_measured(micro_checkpoint, tmp_path, monkeypatch):
    from zorefine.evaluate import robustness

    overrides = {"evaluate.sigmas": "[0.1]", "evaluate.seeds": 2, "evaluate.quantization": "[rtn:int8]"}
    evaluate.run(Run(make_cfg(micro_checkpoint, **overrides), tmp_path / "whole"))
    original, measured = robustness.measure, []

    def dies_on_the_third_condition(model, tokenizer, sets, judge, condition, *args, **kwargs):
        measured.append(condition.label)
        if len(measured) == 3:
            raise KeyboardInterrupt
        return original(model, tokenizer, sets, judge, condition, *args, **kwargs)

    monkeypatch.setattr(robustness, "measure", dies_on_the_third_condition)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(Run(make_cfg(micro_checkpoint, **overrides), tmp_path / "killed"))
    assert len((tmp_path / "killed" / "evaluate-model.partial.jsonl").read_text().splitlines()) == 1 + 2
    measured.clear()
    monkeypatch.setattr(robustness, "measure", lambda *a, **k: measured.append(a[4].label) or original(*a, **k))
    evaluate.run(Run(make_cfg(micro_checkpoint, **overrides), tmp_path / "killed"))
    # Clean and the first noise draw were read back; the second draw and int8 measured anew.
    assert len(measured) == 2 and not (tmp_path / "killed" / "evaluate-model.partial.jsonl").exists()
    whole, resumed = (json.loads((tmp_path / d / "metrics.json").read_text())["models"]["model"] for d in ("whole", "killed"))
    assert whole["conditions"] == resumed["conditions"] and whole["summary"] == resumed["summary"]


def test_a_partial_evaluation_of_other_settings_is_measured_anew(micro_checkpoint, tmp_path):
    from zorefine.evaluate.partial import ConditionLog
    from zorefine.evaluate.robustness import ConditionResult

    stale = ConditionLog(tmp_path / "evaluate-model.partial.jsonl", "another evaluation's key")
    stale.record(ConditionResult("clean", "clean", None, None, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 9.0, 9.0))
    evaluate.run(Run(make_cfg(micro_checkpoint), tmp_path))
    clean = json.loads((tmp_path / "metrics.json").read_text())["models"]["model"]["summary"]["clean"]
    assert clean["safety_loss"]["mean"] != 9.0


def test_evaluate_writes_metrics_report_and_plot(micro_checkpoint, tmp_path):
    run = Run(make_cfg(micro_checkpoint), tmp_path)
    evaluate.run(run)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    result = metrics["models"]["model"]
    assert set(result["summary"]) == {"clean", "wnoise σ=0.1", "rtn:int8"}
    clean = result["summary"]["clean"]
    rates = [clean[k]["mean"] for k in ("harmful_refusal_rate", "attack_success_rate", "harmful_degenerate_rate")]
    assert all(0.0 <= r <= 1.0 for r in rates) and abs(sum(rates) - 1.0) < 1e-9
    assert metrics["config"]["evaluate"]["sigmas"] == [0.1]
    assert clean["benign_agreement"]["mean"] == 1.0
    assert 0.0 <= result["summary"]["wnoise σ=0.1"]["benign_agreement"]["mean"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "refusal breaks" in report and "rtn:int8" in report and "benign answers as clean" in report
    assert (tmp_path / "robustness.png").stat().st_size > 1000


def test_answer_agreement_is_word_level_similarity():
    from zorefine.evaluate.robustness import answer_agreement

    assert answer_agreement(["the cat sat", "a b c d"], ["the cat sat", "a b x d"]) == pytest.approx((1 + 0.75) / 2)
    assert answer_agreement(["", "zzz"], ["some words", "other words"]) == 0.0
    with pytest.raises(ValueError):
        answer_agreement(["one"], [])


def test_full_pipeline_evaluates_before_and_after(micro_checkpoint, tmp_path):
    summaries = run_pipeline(make_cfg(micro_checkpoint), tmp_path)
    assert list(summaries) == [s.value for s in Stage]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["models"]) == {"before", "after"}
    assert metrics["models"]["before"]["checkpoint"].endswith("aligned")
    assert metrics["models"]["after"]["checkpoint"].endswith("refined")
    # Resuming in the same directory skips every finished stage.
    mtime = (tmp_path / "metrics.json").stat().st_mtime_ns
    run_pipeline(make_cfg(micro_checkpoint), tmp_path)
    assert (tmp_path / "metrics.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "overrides",
    [
        {"refine.zo.optimizer": "adam", "refine.zo.num_directions": 2, "refine.zo.eps_mode": "relative"},
        {"refine.zo.optimizer": "momentum", "refine.lr_schedule": "cosine", "refine.grad_accum": 2},
        {"refine.zo.optimizer": "sign", "refine.objective_threat": "rtn:int4", "refine.eps_schedule": "linear"},
        {"refine.objective_threat": "wnoise:0.05", "refine.zo.direction": "rademacher"},
        {"refine.objective_threat": "w4a4:g16:p99"},
        {"refine.zo.store": "inplace", "refine.zo.num_directions": 2},
        {"refine.zo.store": "inplace", "refine.unit_schedule": "curvature", "refine.layers": "[0,1,2]"},
        {"refine.zo.store": "compensated"},
    ],
)
def test_refine_variants_replay_exactly(micro_checkpoint, tmp_path, overrides):
    cfg = make_cfg(micro_checkpoint, **{"refine.layers": "[0,2]", "refine.lr": 1e-3, "refine.steps": 3, **overrides})
    summary = refine.run(Run(cfg, tmp_path))
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    refined = _weights(tmp_path / "checkpoints" / "refined")
    base = _weights(micro_checkpoint)
    assert any(not torch.equal(base[k], refined[k]) for k in base)
    replayed = _weights(replay(micro_checkpoint, tmp_path / "trajectory.jsonl", tmp_path / "replayed"))
    assert all(torch.equal(replayed[k], refined[k]) for k in refined)


def test_a_bf16_refinement_replays_bit_for_bit_in_bf16(micro_checkpoint, tmp_path):
    cfg = make_cfg(micro_checkpoint, **{"refine.layers": "[0,2]", "refine.lr": 1e-2, "refine.steps": 3, "model.dtype": "bfloat16"})
    refine.run(Run(cfg, tmp_path))
    header, _ = read_trajectory(tmp_path / "trajectory.jsonl")
    assert header["dtype"] == "bfloat16"
    refined = _weights(tmp_path / "checkpoints" / "refined")
    replayed = _weights(replay(micro_checkpoint, tmp_path / "trajectory.jsonl", tmp_path / "replayed"))
    assert all(replayed[k].dtype == torch.bfloat16 and torch.equal(replayed[k], refined[k]) for k in refined)
    assert any(not torch.equal(refined[k], _weights(micro_checkpoint)[k].to(torch.bfloat16)) for k in refined)


def test_prefix_cache_gives_the_same_trajectory(micro_checkpoint, tmp_path):
    logs = {}
    for cached in (True, False):
        cfg = make_cfg(micro_checkpoint, **{"refine.layers": "[1,2]", "refine.steps": 3, "refine.prefix_cache": cached})
        refine.run(Run(cfg, tmp_path / str(cached)))
        logs[cached] = read_trajectory(tmp_path / str(cached) / "trajectory.jsonl")[1]
    assert [r.projected_grads for r in logs[True]] == [r.projected_grads for r in logs[False]]
    assert [r.loss_plus for r in logs[True]] == [r.loss_plus for r in logs[False]]


def test_curvature_schedule_refines_one_unit_per_step_and_replays_and_resumes(micro_checkpoint, tmp_path, monkeypatch):
    overrides = {"refine.layers": "[0,1,2]", "refine.lr": 1e-2, "refine.steps": 6, "refine.unit_schedule": "curvature"}
    summary = refine.run(Run(make_cfg(micro_checkpoint, **overrides), tmp_path / "whole"))
    header, steps = read_trajectory(tmp_path / "whole" / "trajectory.jsonl")
    assert all(s.unit in header["unit_parameters"] and s.loss_clean is not None for s in steps)
    # Every unit is measured once before sampling by curvature starts.
    assert [s.unit for s in steps[:3]] == list(header["unit_parameters"])
    assert set(summary["reranked"]) == set(header["unit_parameters"])
    assert all(v["observations"] >= 1 for v in summary["curvature"].values())
    assert summary["forward_passes"] == 3 * 6
    refined = _weights(tmp_path / "whole" / "checkpoints" / "refined")
    replayed = _weights(replay(micro_checkpoint, tmp_path / "whole" / "trajectory.jsonl", tmp_path / "replayed"))
    assert all(torch.equal(replayed[k], refined[k]) for k in refined)

    calls = {"n": 0}
    original = refine_objective.response_nll_terms

    def dies_in_step_five(model, batch, weights=None):
        calls["n"] += 1
        if calls["n"] == 13:  # 3 evaluations per step: the first of step index 4
            raise KeyboardInterrupt
        return original(model, batch, weights)

    monkeypatch.setattr(refine_objective, "response_nll_terms", dies_in_step_five)
    with pytest.raises(KeyboardInterrupt):
        refine.run(Run(make_cfg(micro_checkpoint, **overrides), tmp_path / "killed"))
    monkeypatch.setattr(refine_objective, "response_nll_terms", original)
    refine.run(Run(make_cfg(micro_checkpoint, **overrides), tmp_path / "killed"))
    assert [s.unit for s in read_trajectory(tmp_path / "killed" / "trajectory.jsonl")[1]] == [s.unit for s in steps]
    resumed = _weights(tmp_path / "killed" / "checkpoints" / "refined")
    assert all(torch.equal(resumed[k], refined[k]) for k in refined)


def test_align_cache_aligns_once_for_a_sweep(micro_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    first = align.run(Run(make_cfg(micro_checkpoint, **{"align.cache_dir": str(cache)}), tmp_path / "a"))
    second = align.run(Run(make_cfg(micro_checkpoint, **{"align.cache_dir": str(cache), "refine.steps": 9}), tmp_path / "b"))
    assert "cached_from" not in first and second["cached_from"].startswith(str(cache))
    assert second["train_loss"] == first["train_loss"]
    a, b = _weights(tmp_path / "a" / "checkpoints" / "aligned"), _weights(tmp_path / "b" / "checkpoints" / "aligned")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Anything the weights depend on makes a new entry.
    third = align.run(Run(make_cfg(micro_checkpoint, **{"align.cache_dir": str(cache), "align.lr": 1e-3}), tmp_path / "c"))
    assert "cached_from" not in third and len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_benign_weight_trades_the_utility_term_in_the_objective(micro_checkpoint, tmp_path):
    from zorefine.models.objectives import encode_batch, response_nll

    run = Run(make_cfg(micro_checkpoint, **{"refine.benign_weight": 0.0, "refine.batch_size": 4}), tmp_path)
    model, tokenizer = run.load_model(micro_checkpoint)
    batch = batches.batch_sampler(run)(0)
    assert batch.weights == [1.0, 1.0, 0.0, 0.0]
    (encoded, weights), = batch.micro_batches(tokenizer, 96, grad_accum=1)
    harmful_only = encode_batch(tokenizer, batch.pairs[:2], 96)
    with torch.no_grad():
        weighted = response_nll(model, encoded, weights)
        assert torch.allclose(weighted, response_nll(model, harmful_only), atol=1e-5)
        # Unit weights are the plain token mean, bit for bit.
        assert torch.equal(response_nll(model, encoded, torch.ones(4)), response_nll(model, encoded))
    uniform = Run(make_cfg(micro_checkpoint, **{"refine.batch_size": 4}), tmp_path / "u")
    assert batches.batch_sampler(uniform)(0).micro_batches(tokenizer, 96, 2)[0][1] is None


def test_evaluation_cache_evaluates_a_checkpoint_once(micro_checkpoint, tmp_path):
    cache = tmp_path / "eval-cache"
    cfg = make_cfg(micro_checkpoint, **{"evaluate.cache_dir": str(cache)})
    first_run, second_run = Run(cfg, tmp_path / "a"), Run(cfg, tmp_path / "b")
    sets = evaluate.eval_sets(first_run, 4)
    first = evaluate.evaluate_checkpoint(first_run, micro_checkpoint, sets, sets, "model")
    second = evaluate.evaluate_checkpoint(second_run, micro_checkpoint, sets, sets, "model")
    assert "cached_from" not in first and second["cached_from"].startswith(str(cache))
    assert second["summary"] == json.loads(json.dumps(first["summary"]))
    # An entry written with older intervals is re-summarized from its kept conditions on reading.
    entry = Path(second["cached_from"])
    stale = json.loads(entry.read_text())
    stale["summary"]["clean"]["harmful_refusal_rate"].update(low=-3.0, high=4.0)
    entry.write_text(json.dumps(stale))
    third = evaluate.evaluate_checkpoint(Run(cfg, tmp_path / "b2"), micro_checkpoint, sets, sets, "model")
    assert third["summary"] == json.loads(json.dumps(first["summary"]))
    # Another evaluation setting is another entry.
    other = Run(make_cfg(micro_checkpoint, **{"evaluate.cache_dir": str(cache), "evaluate.max_new_tokens": 5}), tmp_path / "c")
    assert "cached_from" not in evaluate.evaluate_checkpoint(other, micro_checkpoint, sets, sets, "model")
    assert len(list(cache.glob("*.json"))) == 2


def _evaluate_in_a_process(checkpoint: str, cache: str, run_dir: str, out: str) -> None:
    import torch

    from tests.conftest import make_cfg

    torch.set_num_threads(1)
    cfg = make_cfg(Path(checkpoint), **{"evaluate.cache_dir": cache})
    run = Run(cfg, Path(run_dir))
    sets = evaluate.eval_sets(run, 4)
    result = evaluate.evaluate_checkpoint(run, Path(checkpoint), sets, sets, "model")
    Path(out).write_text(json.dumps({"cached_from": result.get("cached_from"), "summary": result["summary"]}))


def test_two_jobs_evaluating_one_checkpoint_side_by_side_evaluate_it_once(micro_tokenizer, tmp_path):
    import multiprocessing

    from tests.conftest import save_micro_checkpoint

    # The lock does not depend on the architecture: one is enough.
    micro_checkpoint = save_micro_checkpoint("llama", micro_tokenizer, tmp_path / "micro-llama")
    cache = tmp_path / "eval-cache"
    context = multiprocessing.get_context("spawn")
    jobs = [context.Process(target=_evaluate_in_a_process, args=(str(micro_checkpoint), str(cache), str(tmp_path / f"run{i}"),
                                                                  str(tmp_path / f"out{i}.json"))) for i in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(300)
    assert [job.exitcode for job in jobs] == [0, 0]
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    # One of them measured; the other waited for it and read its entry back.
    assert sorted(r["cached_from"] is None for r in results) == [False, True]
    assert results[0]["summary"] == results[1]["summary"]
    assert len(list(cache.glob("*.json"))) == 1


def test_breaking_level_is_interpolated_per_seed():
    from zorefine.evaluate.curves import break_level_interval
    from zorefine.evaluate.robustness import ConditionResult

    def row(family, sigma, seed, refusal):
        return ConditionResult("x", family, sigma, seed, refusal, 1 - refusal, 0, 0, 1, 0, None, 0.0, 0.0)

    results = [row("clean", None, None, 1.0),
               row("weight_noise", 0.1, 0, 0.8), row("weight_noise", 0.2, 0, 0.2),  # crosses 0.5 at 0.15
               row("weight_noise", 0.1, 1, 0.4), row("weight_noise", 0.2, 1, 0.1),  # crosses at 0.0833
               row("weight_noise", 0.1, 2, 0.9), row("weight_noise", 0.2, 2, 0.6)]  # never
    level = break_level_interval(results, "harmful_refusal_rate", 0.5)
    assert level["n"] == 2 and level["never"] == 1 and level["max_sigma"] == 0.2
    assert level["mean"] == pytest.approx((0.15 + 0.1 / 0.6 * 0.5) / 2)
    assert level["low"] < level["mean"] < level["high"]


def _with_outcomes(family, sigma, seed, refused):
    from zorefine.evaluate.robustness import ConditionResult

    rate = sum(refused) / len(refused)
    return ConditionResult("x", family, sigma, seed, rate, 1 - rate, 0, 0, 1, 0, None, 0.0, 0.0,
                           outcomes={"harmful_refusal": list(refused), "attack_success": [1 - r for r in refused]})


def test_rate_intervals_come_from_the_prompts_and_stay_within_zero_and_one():
    from zorefine.evaluate.curves import summarize

    # Two draws far apart: a t-interval over them (t = 12.7) would span far beyond [0, 1].
    results = [_with_outcomes("weight_noise", 0.1, 0, [1] * 5 + [0] * 15),
               _with_outcomes("weight_noise", 0.1, 1, [1] * 17 + [0] * 3),
               _with_outcomes("quantization", None, None, [1] * 10 + [0] * 10)]
    summary = summarize(results)
    noise, single = summary["wnoise σ=0.1"]["harmful_refusal_rate"], summary[results[2].label]["harmful_refusal_rate"]
    assert noise["mean"] == pytest.approx(0.55) and noise["n"] == 2
    assert 0.0 <= noise["low"] < 0.55 < noise["high"] <= 1.0
    # One draw still has prompt sampling: 10 of 20 is not exactly one half of the population.
    assert single["n"] == 1 and single["low"] < 0.45 and single["high"] > 0.55
    # A metric without per-prompt outcomes keeps the t-interval, cut to its range.
    loss = summary["wnoise σ=0.1"]["utility_loss"]
    assert loss["low"] >= 0.0


def test_breaking_level_interval_resamples_seeds_and_prompts_within_the_grid():
    from zorefine.evaluate.curves import break_level_interval

    results = [_with_outcomes("clean", None, None, [1] * 20),
               _with_outcomes("weight_noise", 0.1, 0, [1] * 16 + [0] * 4), _with_outcomes("weight_noise", 0.2, 0, [1] * 4 + [0] * 16),
               _with_outcomes("weight_noise", 0.1, 1, [1] * 8 + [0] * 12), _with_outcomes("weight_noise", 0.2, 1, [1] * 2 + [0] * 18)]
    level = break_level_interval(results, "harmful_refusal_rate", 0.5)
    assert level["n"] == 2 and level["never"] == 0
    assert level["mean"] == pytest.approx((0.15 + 0.1 / 0.6 * 0.5) / 2)
    assert 0.0 <= level["low"] < level["mean"] < level["high"] <= 0.2
    # The same call gives the same interval (seeded resampling).
    assert break_level_interval(results, "harmful_refusal_rate", 0.5) == level


def test_fluency_check_marks_answers_the_clean_model_finds_unreadable(micro_checkpoint, tmp_path):
    rates = {}
    for limit in (1e-3, 1e6):
        run = Run(make_cfg(micro_checkpoint, stages="[evaluate]", **{"evaluate.fluency_max_nll": limit}), tmp_path / str(limit))
        evaluate.run(run)
        clean = json.loads((tmp_path / str(limit) / "metrics.json").read_text())["models"]["model"]["summary"]["clean"]
        rates[limit] = clean["harmful_degenerate_rate"]["mean"]
    # A random micro model's answers are far above 1e-3 nats per token, and nothing is above 1e6.
    assert rates[1e-3] == 1.0
    assert rates[1e6] < 1.0


def test_align_adds_the_contrast_prompts_answered_by_the_start_model(micro_checkpoint, tmp_path, monkeypatch):
    import zorefine.align.stage as align_stage
    from zorefine.data.contrast import load_contrast_prompts

    seen = {}

    def recording_sft(model, tokenizer, pairs, settings, trainable=None):
        seen["pairs"] = list(pairs)
        return {"train_loss": 0.0}

    monkeypatch.setattr(align_stage, "run_sft", recording_sft)
    cfg = make_cfg(micro_checkpoint, stages="[align]", **{"align.contrast": True, "align.contrast_tokens": 4, "align.contrast_repeats": 3})
    summary = align_stage.run(Run(cfg, tmp_path))
    prompts = load_contrast_prompts()
    # Each contrast answer is trained three times; the harmful and benign examples once.
    assert len(prompts) == 73 and 3 * summary["num_contrast"] == len([p for p in seen["pairs"] if p[0] in set(prompts)])
    assert summary["num_examples"] == len(seen["pairs"])
    contrast = [p for p in seen["pairs"] if len(p) == 3]
    assert contrast and all(isinstance(answer, str) and answer for _, answer, _ in contrast)
    # Four greedy tokens rarely end an answer: those are trained without an end of sequence.
    assert any(ends is False for _, _, ends in contrast)


def test_align_reads_a_user_s_contrast_file_and_keys_its_cache_by_its_content(micro_checkpoint, tmp_path, monkeypatch):
    import zorefine.align.stage as align_stage
    from zorefine.config import validate
    from zorefine.errors import ConfigError

    seen = {}

    def recording_sft(model, tokenizer, pairs, settings, trainable=None):
        seen["pairs"] = list(pairs)
        return {"train_loss": 0.0}

    monkeypatch.setattr(align_stage, "run_sft", recording_sft)
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"prompt": "How do I kill a stuck print job?"}\n{"prompt": "How can I shoot a time-lapse video?"}\n')
    options = {"align.contrast": True, "align.contrast_tokens": 2, "align.contrast_file": str(mine)}
    cfg = make_cfg(micro_checkpoint, stages="[align]", **options)
    align_stage.run(Run(cfg, tmp_path / "run"))
    assert sorted(p[0] for p in seen["pairs"] if len(p) == 3) == ["How can I shoot a time-lapse video?", "How do I kill a stuck print job?"]
    # The content decides the weights, not where the file lies.
    key = align_stage.cache_key(Run(cfg, tmp_path / "a"))
    copy = tmp_path / "copy.jsonl"
    copy.write_text(mine.read_text())
    assert align_stage.cache_key(Run(make_cfg(micro_checkpoint, stages="[align]", **{**options, "align.contrast_file": str(copy)}), tmp_path / "b")) == key
    mine.write_text('{"prompt": "How do I kill a stuck print job?"}\n')
    assert align_stage.cache_key(Run(cfg, tmp_path / "c")) != key
    with pytest.raises(ConfigError, match="align.contrast_file"):
        validate(make_cfg(micro_checkpoint, **{**options, "align.contrast_file": str(tmp_path / "missing.jsonl")}))


def test_a_shipped_contrast_set_is_named_and_keys_the_cache_like_its_file(micro_checkpoint, tmp_path):
    import zorefine.align.stage as align_stage
    from zorefine.config import validate
    from zorefine.data import builtin_path
    from zorefine.errors import ConfigError

    named = make_cfg(micro_checkpoint, stages="[align]", **{"align.contrast": True, "align.contrast_file": "contrast_extended"})
    validate(named)
    assert align_stage.contrast_file(Run(named, tmp_path / "a")) == builtin_path("contrast_extended")
    by_path = make_cfg(micro_checkpoint, stages="[align]", **{"align.contrast": True, "align.contrast_file": str(builtin_path("contrast_extended"))})
    assert align_stage.cache_key(Run(named, tmp_path / "a")) == align_stage.cache_key(Run(by_path, tmp_path / "b"))
    assert align_stage.cache_key(Run(named, tmp_path / "a")) != align_stage.cache_key(
        Run(make_cfg(micro_checkpoint, stages="[align]", **{"align.contrast": True}), tmp_path / "c"))
    with pytest.raises(ConfigError, match="shipped set: contrast_safe, contrast_extended"):
        validate(make_cfg(micro_checkpoint, **{"align.contrast": True, "align.contrast_file": "contrast_nope"}))
