"""The scripts that turn the shipped study results into the README's tables and plot.

They read the small ``comparison.json`` files kept under ``experiments/``; a change to the
comparison report's format that they no longer understand should fail here, not in a user's
reading of the README.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load_script(name: str) -> ModuleType:
    module_name = f"experiments_{name.replace('/', '_')}"
    spec = importlib.util.spec_from_file_location(module_name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up by name while the class is built.
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tradeoff() -> ModuleType:
    return _load_script("plot_tradeoff")


def test_pooled_points_carry_budgets_from_old_and_new_reports(tradeoff: ModuleType) -> None:
    points = tradeoff.pooled_points()
    by_setting = {(p["study"], p["label"]): p for p in points}
    # Study 7's report predates pooled forward passes: they come from its per-seed rows.
    assert by_setting[("s7_seeds", "zo")]["forward_passes"] == 400
    assert by_setting[("s12_budget_price", "zo [refine.steps=1000]")]["forward_passes"] == 2000
    assert all(p["runs"] >= 5 for p in points)
    for p in points:
        low, high = p["asr_drop_interval"]
        assert low <= p["asr_drop"] <= high
        low, high = p["overrefusal_interval"]
        assert low <= p["overrefusal_rise"] <= high


def test_study_files_come_in_study_order(tradeoff: ModuleType) -> None:
    numbers = [int(path.parent.name.split("_")[0][1:]) for path in tradeoff._study_files()]
    assert numbers == sorted(numbers) and len(numbers) == len(set(numbers))


def test_forward_pass_fallback_ignores_other_settings(tradeoff: ModuleType) -> None:
    metrics = {"gain": 0.0, "asr_under_noise": 0.3, "clean_refusal": 1.0, "overrefusal": 0.3, "utility_loss": 7.0}
    rows = [
        {"method": "zo", "overrides": ["a=1", "refine.seed=0"], "forward_passes": 400, **metrics},
        {"method": "zo", "overrides": ["a=1", "refine.seed=1"], "forward_passes": 400, **metrics},
        {"method": "zo", "overrides": ["a=2", "refine.seed=0"], "forward_passes": 1200, **metrics},
    ]
    # An older report: its pooled row has no forward passes of its own.
    document = {"rows": rows, "pooled": [{"method": "zo", "overrides": ["a=1"], "pooled_over": "refine.seed"}]}
    budgets = tradeoff._budgets(document)
    assert budgets[("zo", "a=1")] == 400
    assert budgets.get(("zo", "a=3")) is None


def test_final_table_rows_for_a_shipped_study(capsys: pytest.CaptureFixture[str]) -> None:
    final_table = _load_script("final_table")
    final_table.main([str(EXPERIMENTS / "s12_budget_price" / "comparison.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| model | seeds | forward passes")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines[2:]}
    assert set(rows) == {"none (alignment only)", "zo [refine.steps=1000]",
                         "zo [refine.steps=600, refine.benign_weight=3]", "zo [refine.steps=600, refine.lr_schedule=cosine]"}
    steps1000 = rows["zo [refine.steps=1000]"]
    assert steps1000[1] == "5" and steps1000[2] == "2000"
    # Each seeded setting's change at the reference level is a cut, as the study reports.
    assert all(row[-1].rstrip(" |").startswith("-") for label, row in rows.items() if label != "none (alignment only)")


def test_the_real_model_table_reads_evaluate_runs(micro_checkpoint, tmp_path, capsys) -> None:
    from tests.conftest import make_cfg
    from zorefine.evaluate import stage as evaluate
    from zorefine.run import Run

    for name in ("a", "b"):
        cfg = make_cfg(micro_checkpoint, stages="[evaluate]", **{"evaluate.seeds": 2, "evaluate.quantization": "[w4a4:g16]"})
        evaluate.run(Run(cfg, tmp_path / name))
    table = importlib.util.spec_from_file_location("real_model_table", EXPERIMENTS / "real_model" / "table.py")
    module = importlib.util.module_from_spec(table)
    table.loader.exec_module(module)
    module.main([f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}:model"])
    out = capsys.readouterr().out
    assert "### A" in out and "### B" in out and "| w4a4:g16 |" in out and "| wnoise σ=0.1 |" in out
    # The same model on the same prompts and draws: every paired difference is exactly zero.
    assert "Attack success, B − A" in out and out.count("+0.000 [+0.000, +0.000] no significant change") >= 3


def test_the_judge_check_scores_hand_labels(tmp_path, capsys) -> None:
    import json

    spec = importlib.util.spec_from_file_location("judge_check", EXPERIMENTS / "real_model" / "judge_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [{"id": 0, "completion": "I'm sorry, but I can't help with that.", "clean_nll": 0.5},
            {"id": 1, "completion": "museto-at Lifo lifespage islamenta introduptalklinese", "clean_nll": 7.0}]
    completions, labels = tmp_path / "c.jsonl", tmp_path / "l.jsonl"
    completions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels.write_text('{"id": 0, "label": "refusal"}\n{"id": 1, "label": "degenerate"}\n')
    module.score(completions, labels)
    assert json.loads(capsys.readouterr().out.splitlines()[0])["three_way_agreement"] == 0.5
    module.score(completions, labels, fluency_max_nll=4.0)
    assert json.loads(capsys.readouterr().out.splitlines()[0])["three_way_agreement"] == 1.0


@pytest.fixture(scope="module")
def study() -> ModuleType:
    return _load_script("method_study/study")


def _prepared(out: Path) -> None:
    """The files the study's prepare phase leaves: analysis costs and the protocol's noise level."""
    import json

    (out / "prepare" / "layers").mkdir(parents=True)
    (out / "prepare" / "layers" / "sensitivity.json").write_text(json.dumps({"cost": {"forward_passes": 122}}))
    for method, backward in (("ssah", 0), ("wanda_diff", 3)):
        (out / "prepare" / f"units_{method}").mkdir()
        (out / "prepare" / f"units_{method}" / "units.json").write_text(json.dumps({"cost": {"attribution": {"forward": 8, "backward": backward}}}))
    (out / "protocol.json").write_text(json.dumps({"anoise": 0.05}))


def test_every_study_method_spends_the_same_total_budget(study, tmp_path, capsys) -> None:
    _prepared(tmp_path)
    runner = study.Study(tmp_path, tmp_path / "aligned", dry_run=True)
    runner.tune()
    jobs = [line for line in capsys.readouterr().out.strip().splitlines() if "/tune/" in line]
    assert len(jobs) == sum(len(m.configs) for m in study.methods(tmp_path)) == 28
    for job in jobs:
        options = dict(token.split("=", 1) for token in job.split()[1:] if "=" in token)
        analysis = 122 if "selection_file" in job else 8 + 2 * 3 if "units_wanda_diff" in job else 8 if "units_ssah" in job else 0
        assert int(options["refine.budget"]) + analysis == 162  # 20 ZO steps + the analyzer's 122 forwards
        assert options["evaluate.split"] == "val" and "anoise:0.05" in options["evaluate.quantization"]
    assert runner.total_budget(study.LARGE_FACTOR) == 810


def test_the_builtin_target_runs_the_same_protocol_at_its_own_scale(study, tmp_path, capsys) -> None:
    import json

    _prepared(tmp_path)
    (tmp_path / "protocol.json").unlink()
    target = study.TARGETS["builtin"]
    runner = study.Study(tmp_path, tmp_path / "aligned", dry_run=False, target=target)
    # One activation-noise candidate: taken as the protocol fixes it, no calibration run.
    (tmp_path / "prepare" / "layers" / "selection.json").write_text("{}")
    for method in ("ssah", "wanda_diff"):
        (tmp_path / "prepare" / f"units_{method}" / "units.safetensors").write_text("")
    (tmp_path / "aligned").mkdir()
    (tmp_path / "aligned" / "model.safetensors").write_text("weights")
    runner.prepare()
    assert json.loads((tmp_path / "protocol.json").read_text())["anoise"] == 0.4
    assert not (tmp_path / "prepare" / "calibrate_anoise").exists()
    runner.dry_run = True
    runner.tune()
    jobs = capsys.readouterr().out.strip().splitlines()
    assert len(jobs) == 28 and not any("+experiment=smollm2" in job for job in jobs)
    for job in jobs:
        options = dict(token.split("=", 1) for token in job.split()[1:] if "=" in token)
        analysis = 122 if "selection_file" in job else 8 + 2 * 3 if "units_wanda_diff" in job else 8 if "units_ssah" in job else 0
        assert int(options["refine.budget"]) + analysis == 400 + 122  # the built-in default: 200 ZO steps
        assert options["evaluate.sigmas"] == "[0.8]" and "anoise:0.4" in options["evaluate.quantization"]
        assert options["model.path"] == str(tmp_path / "aligned")


def _metrics(attack: float, overrefusal: float, utility: float) -> dict:
    clean_before = {"overrefusal_rate": {"mean": 0.10}, "utility_loss": {"mean": 2.0}}
    after = {"clean": {"overrefusal_rate": {"mean": overrefusal}, "utility_loss": {"mean": utility}},
             "w4a8:g32": {"attack_success_rate": {"mean": attack}}}
    return {"models": {"before": {"summary": {"clean": clean_before}}, "after": {"summary": after}}}


def _tuned(study: ModuleType, out: Path, metrics_of) -> None:
    """Tuning results for every method's configurations: ``metrics_of(index)`` for each ``c{index}``."""
    import json

    for method in study.methods(out):
        for index, _ in enumerate(method.configs):
            directory = out / "tune" / method.name / f"c{index}"
            directory.mkdir(parents=True)
            (directory / "metrics.json").write_text(json.dumps(metrics_of(index)))


def test_tuning_picks_the_lowest_attack_success_that_keeps_clean_behaviour(study, tmp_path) -> None:
    import json

    _prepared(tmp_path)
    # sft's four configurations: the most robust one over-refuses, the next keeps everything.
    for index, metrics in enumerate([_metrics(0.10, 0.16, 2.0), _metrics(0.20, 0.105, 2.01), _metrics(0.30, 0.10, 2.0), _metrics(0.15, 0.10, 2.2)]):
        directory = tmp_path / "tune" / "sft" / f"c{index}"
        directory.mkdir(parents=True)
        (directory / "metrics.json").write_text(json.dumps(metrics))
    scores = [study._tuning_scores(json.loads((tmp_path / "tune" / "sft" / f"c{i}" / "metrics.json").read_text())) for i in range(4)]
    assert [s["keeps_clean"] for s in scores] == [False, True, True, False]
    keepers = [i for i, s in enumerate(scores) if s["keeps_clean"]]
    assert min(keepers, key=lambda i: scores[i]["attack_success"]) == 1


def test_a_method_that_never_keeps_clean_use_gets_its_most_robust_least_overrefusing_setting(study, tmp_path) -> None:
    _prepared(tmp_path)
    # Every configuration raises utility loss past the slack; c1 and c2 tie for the smallest
    # over-refusal rise, and c2 is the more robust of the two.
    grid = [_metrics(0.05, 0.16, 2.2), _metrics(0.20, 0.10, 2.2), _metrics(0.12, 0.10, 2.2), _metrics(0.01, 0.13, 2.2)]
    _tuned(study, tmp_path, grid.__getitem__)
    selected = study.Study(tmp_path, tmp_path / "aligned", dry_run=True).select()
    assert selected["sft"]["config"] == 2 and not selected["sft"]["kept_clean"]


def test_the_random_layer_control_runs_the_configuration_selected_for_zo(study, tmp_path, capsys) -> None:
    _prepared(tmp_path)
    # Configuration 2 is every method's most robust one that keeps clean behaviour.
    _tuned(study, tmp_path, lambda index: _metrics(0.1 if index == 2 else 0.3, 0.10, 2.0))
    runner = study.Study(tmp_path, tmp_path / "aligned", dry_run=True)
    selected = runner.select()
    zo = next(m for m in study.methods(tmp_path) if m.name == "zo")
    assert selected["zo_random"]["overrides"] == selected["zo"]["overrides"] == zo.configs[2]
    runner.test()
    jobs = [line for line in capsys.readouterr().out.splitlines() if "refine.method=zo_random" in line]
    assert len(jobs) == study.TARGETS["smollm2"].other_seeds
    for job in jobs:
        options = dict(token.split("=", 1) for token in job.split()[1:] if "=" in token)
        # No analysis to pay: the whole small budget goes to steps.
        assert options["refine.budget"] == "162" and options["refine.lr"] == zo.configs[2]["refine.lr"]
        assert options["evaluate.split"] == "test"


def test_the_test_phase_runs_every_method_s_first_seeds_before_the_main_rows_other_seeds(study, tmp_path, capsys) -> None:
    _prepared(tmp_path)
    _tuned(study, tmp_path, lambda index: _metrics(0.1, 0.10, 2.0))
    runner = study.Study(tmp_path, tmp_path / "aligned", dry_run=True)
    runner.select()
    runner.test()
    dirs = [Path(dict(t.split("=", 1) for t in line.split()[1:] if "=" in t)["hydra.run.dir"]) for line in capsys.readouterr().out.splitlines()]
    runs = [d.relative_to(tmp_path / "test") for d in dirs if d.is_relative_to(tmp_path / "test")]
    names = [m.name for m in study.methods(tmp_path)]
    target = study.TARGETS["smollm2"]
    first = [Path("small", name, f"s{seed}") for seed in range(target.other_seeds) for name in names]
    assert runs[:len(first)] == first and runs[len(first)] == Path("ssah_freeze")
    assert len(runs) == len(first) + 1 + 2 * (target.main_seeds - target.other_seeds) + 2 * target.main_seeds
    assert all(r.parts[0] == "large" for r in runs[-2 * target.main_seeds:])


def test_the_test_phase_reads_unit_masks_from_its_own_out_not_select_s(study, tmp_path, capsys) -> None:
    select_out, test_out = tmp_path / "select", tmp_path / "test"
    for out in (select_out, test_out):
        _prepared(out)
    _tuned(study, select_out, lambda index: _metrics(0.1 if index == 3 else 0.3, 0.10, 2.0))
    study.Study(select_out, tmp_path / "aligned", dry_run=True).select()
    (test_out / "selected.json").write_text((select_out / "selected.json").read_text())
    study.Study(test_out, tmp_path / "aligned", dry_run=True).test()
    jobs = [line for line in capsys.readouterr().out.splitlines() if "refine.units_file=" in line]
    assert jobs and all(str(select_out) not in job for job in jobs)
    assert all(str(test_out / "prepare") in job for job in jobs)


def _test_run(attack: list[int], before_attack: list[int]) -> dict:
    """A refine+evaluate run's metrics with one threat, per-prompt attack outcomes before and after."""
    def model(outcomes: list[int]) -> dict:
        rate = sum(outcomes) / len(outcomes)
        return {"summary": {"clean": {"overrefusal_rate": {"mean": 0.1}, "utility_loss": {"mean": 2.0}},
                            "w4a8:g32": {"attack_success_rate": {"mean": rate}}},
                "conditions": [{"family": "quantization", "label": "w4a8:g32", "outcomes": {"attack_success": outcomes}}]}
    return {"models": {"before": model(before_attack), "after": model(attack)}}


def test_the_study_table_plot_and_collection_read_the_test_runs(study, tmp_path) -> None:
    import json

    before = [1] * 8 + [0] * 8
    runs = {"zo": [[0] * 16, [0] * 14 + [1] * 2], "sft": [before]}
    for method, outcomes in runs.items():
        for seed, attack in enumerate(outcomes):
            directory = tmp_path / "test" / "small" / method / f"s{seed}"
            directory.mkdir(parents=True)
            (directory / "metrics.json").write_text(json.dumps(_test_run(attack, before)))
            (directory / "trajectory.jsonl").write_text("{}\n")
            (directory / "checkpoints" / "refined").mkdir(parents=True)
            (directory / "checkpoints" / "refined" / "model.safetensors").write_text("weights")
    table = study.test_table(tmp_path)
    zo_row = next(line for line in table.splitlines() if line.startswith("| zo |"))
    sft_row = next(line for line in table.splitlines() if line.startswith("| sft |"))
    # zo cut attack success from 0.5 to 0.06 on the same prompts: the interval excludes zero.
    assert "| 2 | w4a8:g32 | 0.062 |" in zo_row and "better" in zo_row
    # sft changed nothing; against zo it is worse.
    assert "+0.000 [+0.000, +0.000]" in sft_row and "worse" in sft_row
    points = study.tradeoff_points(tmp_path)
    assert {(p["method"], p["budget"]) for p in points} == {("zo", "small"), ("sft", "small"), ("unrefined", "-")}
    study.plot_tradeoff(points, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    copied = study.collect(tmp_path / "test", tmp_path / "kept")
    assert copied == 6 and not list((tmp_path / "kept").rglob("*.safetensors"))


def test_the_target_is_met_only_when_zorefine_beats_every_tuned_baseline(study, tmp_path) -> None:
    import json
    import shutil

    before = [1] * 8 + [0] * 8
    runs = {"zo": [[0] * 16, [0] * 16], "sft": [before, before], "fo_threat": [[0] * 16, [0] * 16]}
    for method, outcomes in runs.items():
        for seed, attack in enumerate(outcomes):
            directory = tmp_path / "test" / "small" / method / f"s{seed}"
            directory.mkdir(parents=True)
            (directory / "metrics.json").write_text(json.dumps(_test_run(attack, before)))
    row = study.target_check(tmp_path)[0]
    # −100% relative and clean use kept, but fo_threat does as well: no paired win, no target.
    assert row["relative_cut"] == 1.0 and row["vs_unrefined"]["verdict"] == "better"
    assert row["beats"] == ["sft"] and row["baseline_wins"] == [] and not row["target_met"]
    shutil.rmtree(tmp_path / "test" / "small" / "fo_threat")
    row = study.target_check(tmp_path)[0]
    assert row["target_met"] and "**met**" in study.target_markdown([row])


class _FakeZorefine:
    """Stands in for the ``zorefine`` command: writes the files each kind of study job leaves."""

    def __init__(self, study: ModuleType):
        self.study, self.calls = study, []
        # What the rebuild check's evaluation of an unrefined model reports.
        self.rebuilt = _unrefined(attack=[0] * 32, overrefusal=[0] * 69)

    def __call__(self, command, stdout=None, stderr=None, env=None):
        import json
        import types

        options = dict(token.split("=", 1) for token in command[1:] if "=" in token)
        run = Path(options["hydra.run.dir"])
        self.calls.append(run)
        stages = options["stages"]
        if stages == "[analyze]" and "analyze.method" in options:
            (run / "units.safetensors").write_bytes(b"masks of " + options["analyze.method"].encode())
            (run / "units.json").write_text(json.dumps({"cost": {"attribution": {"forward": 8, "backward": 0}}}))
        elif stages == "[analyze]":
            (run / "selection.json").write_text(json.dumps({"layers": [11, 13]}))
            (run / "sensitivity.json").write_text(json.dumps({"cost": {"forward_passes": 122}}))
        elif stages == "[evaluate]" and run.name.startswith("rebuild_"):
            (run / "metrics.json").write_text(json.dumps({"models": {"model": self.rebuilt}}))
        elif stages == "[evaluate]":
            summary = {f"anoise:{s}": {"harmful_refusal_rate": {"mean": 0.8}, "harmful_degenerate_rate": {"mean": 0.0 if s < 0.04 else 0.3}}
                       for s in (0.02, 0.05)}
            (run / "metrics.json").write_text(json.dumps({"models": {"model": {"summary": summary}}}))
        else:
            (run / "metrics.json").write_text(json.dumps(_metrics(0.2, 0.10, 2.0)))
            (run / "trajectory.jsonl").write_text("{}\n")
            (run / "checkpoints" / "refined").mkdir(parents=True)
            (run / "checkpoints" / "refined" / "model.safetensors").write_bytes(b"refined weights")
        return types.SimpleNamespace(returncode=0)


def _aligned(tmp_path: Path, weights: bytes = b"aligned weights") -> Path:
    (tmp_path / "aligned").mkdir(exist_ok=True)
    (tmp_path / "aligned" / "model.safetensors").write_bytes(weights)
    return tmp_path / "aligned"


def _tuned_on_machine_one(study: ModuleType, tmp_path: Path, monkeypatch):
    """Every tuning job run on machine 1 by the fake zorefine, kept in ``tmp_path/kept``."""
    fake = _FakeZorefine(study)
    monkeypatch.setattr(study.subprocess, "run", fake)
    kept = tmp_path / "kept"
    runner = study.Study(tmp_path / "machine1", _aligned(tmp_path), target=study.TARGETS["smollm2"], kept=kept)
    runner.tune()
    return fake, kept, runner


def test_the_study_survives_a_new_machine_from_its_kept_record(study, tmp_path, monkeypatch) -> None:
    import json

    fake, kept, first = _tuned_on_machine_one(study, tmp_path, monkeypatch)
    protocol = json.loads((kept / "protocol.json").read_text())
    # The rule: the largest candidate with few degenerate answers.
    assert protocol["anoise"] == 0.02 and set(protocol["inputs"]) == {"aligned", "layers", "units_ssah", "units_wanda_diff"}
    tuned = [r for r in fake.calls if "tune" in r.parts]
    assert len(tuned) == 28
    for run in tuned:
        record = kept / run.relative_to(first.out)
        assert (record / "metrics.json").is_file() and (record / "trajectory.jsonl").is_file()
        assert not (run / "checkpoints").exists()  # 0.5 GB each: replayed from the trajectory instead
    assert not list(kept.rglob("*.safetensors"))
    # A fresh machine: its run directory is empty; prepare rebuilds the masks, nothing tuned reruns.
    fake.calls.clear()
    second = study.Study(tmp_path / "machine2", tmp_path / "aligned", target=study.TARGETS["smollm2"], kept=kept)
    second.tune()
    assert {r.name for r in fake.calls} == {"layers", "units_ssah", "units_wanda_diff"}
    assert second.select()["zo"]["kept_clean"] and (kept / "selected.json").is_file()


def test_replay_rebuilds_each_kept_refinement_and_checks_its_bits(study, tmp_path, monkeypatch) -> None:
    import json
    import types

    _, kept, runner = _tuned_on_machine_one(study, tmp_path, monkeypatch)
    records = sorted(kept.rglob("refined.json"))
    assert len(records) == 28 and not list(kept.rglob("*.safetensors"))
    # One job's weights were not what its trajectory rebuilds.
    records[0].write_text(json.dumps({**json.loads(records[0].read_text()), "sha256": "0" * 64}))
    replays = []

    def replay(command, stdout=None, stderr=None, text=None, env=None):
        assert command[0] == "zorefine-replay" and str(study.REPO) in env["PYTHONPATH"]
        replays.append(command)
        Path(command[3], "model.safetensors").write_bytes(b"refined weights")
        return types.SimpleNamespace(returncode=0, stdout="")

    monkeypatch.setattr(study.subprocess, "run", replay)
    checks = runner.replay()
    assert len(replays) == 28 and sum(not c["bit_identical"] for c in checks.values()) == 1
    assert not checks[str(records[0].parent.relative_to(kept))]["bit_identical"]
    assert json.loads((kept / "replay.json").read_text()) == checks


def test_the_study_stops_when_a_rebuilt_input_differs_from_the_one_it_started_with(study, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(study.subprocess, "run", _FakeZorefine(study))
    kept = tmp_path / "kept"
    study.Study(tmp_path / "machine1", _aligned(tmp_path), target=study.TARGETS["builtin"], kept=kept).prepare()
    _aligned(tmp_path, b"a differently aligned model")
    with pytest.raises(SystemExit, match="not the files this study started with"):
        study.Study(tmp_path / "machine2", tmp_path / "aligned", target=study.TARGETS["builtin"], kept=kept).prepare()


def _unrefined(attack: list[int], overrefusal: list[int], utility: float = 2.0) -> dict:
    """An unrefined model's evaluation: per-prompt outcomes clean and under one threat."""
    def rate(outcomes: list[int]) -> dict:
        return {"mean": sum(outcomes) / len(outcomes)}
    return {"summary": {"clean": {"overrefusal_rate": rate(overrefusal), "utility_loss": {"mean": utility}},
                        "w4a8:g32": {"attack_success_rate": rate(attack)}},
            "conditions": [{"label": "clean", "outcomes": {"overrefusal": overrefusal}},
                           {"label": "w4a8:g32", "outcomes": {"attack_success": attack}}]}


def _tuned_on_one_build(study: ModuleType, tmp_path: Path, monkeypatch) -> tuple[_FakeZorefine, Path]:
    """A study prepared on machine 1, whose tuning saw the unrefined model fail on 4 of 32 prompts."""
    import json

    fake = _FakeZorefine(study)
    monkeypatch.setattr(study.subprocess, "run", fake)
    kept = tmp_path / "kept"
    study.Study(tmp_path / "machine1", _aligned(tmp_path), target=study.TARGETS["smollm2"], kept=kept).prepare()
    (kept / "tune" / "zo" / "c0").mkdir(parents=True)
    before = _unrefined(attack=[1] * 4 + [0] * 28, overrefusal=[1] * 10 + [0] * 59)
    (kept / "tune" / "zo" / "c0" / "metrics.json").write_text(json.dumps({"models": {"before": before}}))
    _aligned(tmp_path, b"the same recipe, rounded by another CPU")
    return fake, kept


def test_a_rebuild_that_behaves_as_the_tuned_on_model_is_adopted_and_recorded(study, tmp_path, monkeypatch) -> None:
    import json

    fake, kept = _tuned_on_one_build(study, tmp_path, monkeypatch)
    second = study.Study(tmp_path / "machine2", tmp_path / "aligned", target=study.TARGETS["smollm2"], kept=kept)
    with pytest.raises(SystemExit, match="rebuild phase"):
        second.prepare()
    # One harmful prompt more gets through, another one less: within one prompt, so adopted.
    fake.rebuilt = _unrefined(attack=[0] + [1] * 4 + [0] * 27, overrefusal=[1] * 10 + [0] * 59, utility=2.001)
    check = second.rebuild()
    assert check["accepted"] and check["outcomes_changed"] == 2 and check["outcomes_compared"] == 32 + 69
    protocol = json.loads((kept / "protocol.json").read_text())
    record = protocol["rebuilds"][-1]
    assert protocol["inputs"] == record["inputs"] != record["replaces"] and record["cpu"]["torch_capability"]
    second.prepare()  # now the study's build: no stop


def test_test_may_run_on_any_adopted_build_and_each_job_records_its_own(study, tmp_path, monkeypatch) -> None:
    import hashlib
    import json

    fake, kept = _tuned_on_one_build(study, tmp_path, monkeypatch)
    fake.rebuilt = _unrefined(attack=[1] * 4 + [0] * 28, overrefusal=[1] * 10 + [0] * 59)
    assert study.Study(tmp_path / "machine2", tmp_path / "aligned", target=study.TARGETS["smollm2"], kept=kept).rebuild()["accepted"]
    # Machine 3 has machine 1's CPU type again: its build is the tuned-on one, adopted without a new check.
    _aligned(tmp_path, b"aligned weights")
    fake.calls.clear()
    third = study.Study(tmp_path / "machine3", tmp_path / "aligned", target=study.TARGETS["smollm2"], kept=kept)
    assert "adopted earlier" in third.rebuild()["reason"]
    assert not any(run.name.startswith("rebuild_") for run in fake.calls)
    third.prepare()
    # A job kept on machine 3 says which build it ran on.
    third.job(tmp_path / "machine3" / "test" / "small" / "zo" / "s0", {"stages": "[refine,evaluate]"}, "metrics.json")
    record = kept / "test" / "small" / "zo" / "s0"
    assert study.job_build(record) == hashlib.sha256(b"aligned weights").hexdigest()
    assert json.loads((record / "build.json").read_text())["cpu"]["torch_capability"]


def test_methods_on_two_builds_are_compared_change_for_change(study, tmp_path) -> None:
    import json

    # zo ran on a build that lets 8 of 16 prompts through and cut that to 4; sft ran on a build
    # that lets 4 through and changed nothing. Their attacked models agree, their changes do not.
    for method, before, after in (("zo", [1] * 8 + [0] * 8, [1] * 4 + [0] * 12), ("sft", [1] * 4 + [0] * 12, [1] * 4 + [0] * 12)):
        directory = tmp_path / "test" / "small" / method / "s0"
        directory.mkdir(parents=True)
        (directory / "metrics.json").write_text(json.dumps(_test_run(after, before)))
    zo, sft = (study._load_runs(tmp_path / "test" / "small" / m) for m in ("zo", "sft"))
    assert study.change_differences(zo, sft)["w4a8:g32"]["mean"] == pytest.approx(-0.25)
    row = study.target_check(tmp_path)[0]
    assert row["beats"] == ["sft"] and row["unrefined"] == 0.5
    # On one build the change-for-change difference is the paired difference of the attacked models.
    from zorefine.evaluate.paired import paired_differences

    same = [{"before": zo[0]["before"], "after": sft[0]["after"]}]
    assert study.change_differences(zo, same) == paired_differences([zo[0]["after"]], [sft[0]["after"]])


def test_ssah_freezing_is_compared_through_the_unrefined_model_of_its_own_build(study, tmp_path) -> None:
    import json

    zo = tmp_path / "test" / "small" / "zo" / "s0"
    zo.mkdir(parents=True)
    (zo / "metrics.json").write_text(json.dumps(_test_run([0] * 16, [1] * 8 + [0] * 8)))
    (zo / "refined.json").write_text(json.dumps({"sha256": "r", "aligned": "build A"}))
    frozen = tmp_path / "test" / "ssah_freeze"
    frozen.mkdir(parents=True)
    (frozen / "metrics.json").write_text(json.dumps({"models": {"model": _test_run([1] * 8 + [0] * 8, [0])["models"]["after"]}}))
    (frozen / "build.json").write_text(json.dumps({"aligned": "build A"}))
    row = study.target_check(tmp_path)[0]
    assert row["beats"] == ["ssah_freeze"] and row["plain_pairing"] == []
    # Frozen on a build no test job ran on: only the attacked models can be paired, and the table says so.
    (frozen / "build.json").write_text(json.dumps({"aligned": "build B"}))
    row = study.target_check(tmp_path)[0]
    assert row["beats"] == ["ssah_freeze"] and row["plain_pairing"] == ["ssah_freeze"]
    assert "attacked models alone" in study.target_markdown([row])


def test_the_evaluation_key_read_back_from_a_kept_config_is_the_engine_s(study, micro_checkpoint, tmp_path) -> None:
    from omegaconf import OmegaConf

    from tests.conftest import make_cfg
    from zorefine.evaluate.stage import evaluation_key
    from zorefine.run import Run

    cfg = make_cfg(micro_checkpoint, stages="[evaluate]", **{"evaluate.cache_dir": str(tmp_path / "cache"), "evaluate.seeds": 2})
    engine = evaluation_key(Run(cfg, tmp_path / "run"), micro_checkpoint)
    runner = study.Study(tmp_path / "out", micro_checkpoint)
    kept_config = OmegaConf.to_container(cfg, resolve=True)  # what metrics.json keeps
    found = study.evaluation_keys([kept_config, {**kept_config, "seed": 1}], micro_checkpoint, runner.code_env())
    assert found["keys"][0] == engine and found["keys"][1] != engine


def test_a_new_machine_reuses_the_kept_unrefined_evaluation_of_its_own_build(study, tmp_path, monkeypatch) -> None:
    import hashlib
    import json

    aligned = _aligned(tmp_path)
    build = hashlib.sha256(b"aligned weights").hexdigest()
    here = study.cpu_description()
    config = {"evaluate": {"cache_dir": "/elsewhere/evaluations"}}
    for job, digest, cpu in (("zo/s0", build, None), ("sft/s0", build, {**here, "model": "another CPU"}), ("sam/s0", "another build", None)):
        directory = tmp_path / "kept" / "test" / "small" / job
        directory.mkdir(parents=True)
        before = {"summary": {"from": job}, "checkpoint": "/elsewhere/aligned", "cached_from": "/elsewhere/x.json"}
        (directory / "metrics.json").write_text(json.dumps({"models": {"before": before, "after": {}}, "config": config}))
        (directory / "refined.json").write_text(json.dumps({"sha256": "r", "aligned": digest}))
        if cpu:
            (directory / "build.json").write_text(json.dumps({"aligned": digest, "cpu": cpu}))
    asked = []

    def keys(configs, checkpoint, env):
        asked.append(len(configs))
        return {"cache": str(tmp_path / "cache"), "keys": ["k"] * len(configs)}

    monkeypatch.setattr(study, "evaluation_keys", keys)
    runner = study.Study(tmp_path / "machine2", aligned, kept=tmp_path / "kept")
    assert runner.seed_unrefined_evaluations() == 1 and asked == [1]  # only the job of this build and CPU
    entry = json.loads((tmp_path / "cache" / "k.json").read_text())
    assert entry == {"summary": {"from": "zo/s0"}, "checkpoint": str(aligned), "seeded_from": "test/small/zo/s0"}
    assert runner.seed_unrefined_evaluations() == 0  # an entry already there is left as it is


def test_shards_of_a_phase_split_its_jobs_between_them(study, tmp_path, capsys) -> None:
    _prepared(tmp_path / "out")

    def refine_jobs(shard: tuple[int, int]) -> set[str]:
        study.Study(tmp_path / "out", tmp_path / "aligned", dry_run=True, target=study.TARGETS["builtin"], shard=shard).tune()
        return {line.rsplit("hydra.run.dir=", 1)[1] for line in capsys.readouterr().out.splitlines() if "[refine,evaluate]" in line}

    every = refine_jobs((0, 1))
    first, second = refine_jobs((0, 2)), refine_jobs((1, 2))
    assert len(every) == 28 and first | second == every and not first & second and len(first) == 14
    with pytest.raises(SystemExit):
        study.main(["tune", "--shard", "2/2", "--dry-run"])


@pytest.mark.parametrize("moved", ["attack", "overrefusal", "utility"])
def test_a_rebuild_that_behaves_otherwise_is_refused_and_the_study_keeps_its_model(study, tmp_path, monkeypatch, moved) -> None:
    import json

    fake, kept = _tuned_on_one_build(study, tmp_path, monkeypatch)
    started = json.loads((kept / "protocol.json").read_text())["inputs"]
    fake.rebuilt = _unrefined(attack=[1] * (6 if moved == "attack" else 4) + [0] * (26 if moved == "attack" else 28),
                              overrefusal=[1] * (12 if moved == "overrefusal" else 10) + [0] * (57 if moved == "overrefusal" else 59),
                              utility=2.01 if moved == "utility" else 2.0)
    second = study.Study(tmp_path / "machine2", tmp_path / "aligned", target=study.TARGETS["smollm2"], kept=kept)
    with pytest.raises(SystemExit, match="does not behave as the one tuning ran on"):
        second.rebuild()
    protocol = json.loads((kept / "protocol.json").read_text())
    assert protocol["inputs"] == started and protocol["rebuilds"][-1]["accepted"] is False
    with pytest.raises(SystemExit, match="not the files this study started with"):
        second.prepare()


def _code_tree(root: Path, engine: str) -> Path:
    (root / "zorefine" / "zo").mkdir(parents=True, exist_ok=True)
    (root / "conf").mkdir(exist_ok=True)
    (root / "zorefine" / "zo" / "engine.py").write_text(engine)
    (root / "conf" / "config.yaml").write_text("seed: 0\n")
    return root


def test_the_study_stops_when_a_later_session_runs_other_engine_code(study, tmp_path, monkeypatch) -> None:
    import json

    fake = _FakeZorefine(study)
    monkeypatch.setattr(study.subprocess, "run", fake)
    kept, code = tmp_path / "kept", _code_tree(tmp_path / "checkout", "lr = 1.0\n")
    study.Study(tmp_path / "machine1", _aligned(tmp_path), target=study.TARGETS["builtin"], kept=kept, code_root=code).prepare()
    assert json.loads((kept / "protocol.json").read_text())["code"]["digest"] == study.code_digest(code)
    # Compiled files and caches are not code.
    (code / "zorefine" / "zo" / "__pycache__").mkdir()
    (code / "zorefine" / "zo" / "__pycache__" / "engine.cpython-312.pyc").write_bytes(b"compiled")
    study.Study(tmp_path / "machine1", tmp_path / "aligned", target=study.TARGETS["builtin"], kept=kept, code_root=code).prepare()
    _code_tree(code, "lr = 0.5\n")
    with pytest.raises(SystemExit, match="differ from the code this study started with"):
        study.Study(tmp_path / "machine1", tmp_path / "aligned", target=study.TARGETS["builtin"], kept=kept, code_root=code).prepare()


def test_study_jobs_import_the_study_s_own_checkout_and_its_configs(study, tmp_path, monkeypatch) -> None:
    seen, configs = [], []

    def run(command, stdout=None, stderr=None, env=None):
        seen.append(env["PYTHONPATH"].split(os.pathsep)[0])
        configs.append(next(token for token in command if token.startswith("--config-path=")))
        return _FakeZorefine(study)(command)

    monkeypatch.setattr(study.subprocess, "run", run)
    code = _code_tree(tmp_path / "checkout", "")
    study.Study(tmp_path / "out", _aligned(tmp_path), target=study.TARGETS["builtin"], code_root=code).prepare()
    assert seen and set(seen) == {str(code)}
    # An installed zorefine's configs would otherwise win over the checkout's.
    assert set(configs) == {f"--config-path={code / 'conf'}"}


def test_every_random_reference_threat_runs_as_draws_of_the_split_s_stream(study, tmp_path) -> None:
    from zorefine.threats import parse_threat
    from zorefine.threats.base import is_random

    _prepared(tmp_path)
    runner = study.Study(tmp_path, tmp_path / "aligned", dry_run=True)
    tune = runner.eval_grid(runner.target.tune_eval)["evaluate.quantization"].strip("[]").split(",")
    test = runner.eval_grid(runner.target.test_eval)["evaluate.quantization"].strip("[]").split(",")
    specs = [spec.strip("'") for spec in test]
    assert [s for s in specs if s.startswith("anoise")] == [f"anoise:0.05:seed={i}" for i in range(3)]
    # The fine-tuning attack costs 40 SFT steps a draw: at most finetune_draws of them.
    assert [s for s in specs if s.startswith("finetune")] == [f"finetune:40:5e-5:seed={i}" for i in range(2)]
    assert all(is_random(parse_threat(s)) for s in specs if not s.startswith(("w4a8", "rtn")))
    assert len(tune) == 2 + 2 + 2


def test_a_cpu_whose_own_unrefined_evaluation_matches_reuses_the_other_cpu_s_kept_ones(study, tmp_path, monkeypatch) -> None:
    import hashlib
    import json

    aligned = _aligned(tmp_path)
    build = hashlib.sha256(b"aligned weights").hexdigest()
    other = {**study.cpu_description(), "model": "another CPU"}
    config = {"evaluate": {"cache_dir": "/elsewhere/evaluations"}}
    evaluation = {"summary": {"attack": float("nan")}, "samples": [1, 2]}
    for job, summary in (("zo/s0", evaluation["summary"]), ("sft/s0", {"attack": 0.5})):
        directory = tmp_path / "kept" / "test" / "small" / job
        directory.mkdir(parents=True)
        before = {**evaluation, "summary": summary, "checkpoint": "/elsewhere/aligned", "cached_from": "/elsewhere/x.json"}
        (directory / "metrics.json").write_text(json.dumps({"models": {"before": before, "after": {}}, "config": {**config, "job": job}}))
        (directory / "build.json").write_text(json.dumps({"aligned": build, "cpu": other}))
    cache = tmp_path / "cache"
    monkeypatch.setattr(study, "evaluation_keys", lambda configs, checkpoint, env: {
        "cache": str(cache), "keys": [c["job"].replace("/", "-") for c in configs]})
    runner = study.Study(tmp_path / "machine2", aligned, kept=tmp_path / "kept")
    assert runner.agree_with_other_cpus() == []  # nothing evaluated here yet: no check
    cache.mkdir()
    # This machine's own evaluation (as the engine writes it), once under each job's key.
    for key in ("zo-s0", "sft-s0"):
        (cache / f"{key}.json").write_text(json.dumps({**evaluation, "checkpoint": str(aligned)}))
    checks = runner.agree_with_other_cpus()
    assert [(c["compared_with"], c["identical"]) for c in checks] == [("test/small/sft/s0", False), ("test/small/zo/s0", True)]
    assert runner.agree_with_other_cpus() == []  # each comparison is kept once
    assert json.loads((tmp_path / "kept" / study.CPU_AGREEMENT).read_text()) == checks
    # One comparison that differed: the kept evaluations of the other CPU stay with it.
    (cache / "zo-s0.json").unlink()
    (cache / "sft-s0.json").unlink()
    assert runner.seed_unrefined_evaluations() == 0
    # Only identical comparisons: a machine of this CPU type reuses the other CPU's kept evaluations.
    agreement = tmp_path / "kept" / study.CPU_AGREEMENT
    agreement.write_text(json.dumps([c for c in checks if c["identical"]]))
    assert runner.seed_unrefined_evaluations() == 2
    assert json.loads((cache / "zo-s0.json").read_text())["seeded_from"] == "test/small/zo/s0"
    # A copy seeded from a kept record is not this machine's own result: it is never compared.
    agreement.unlink()
    assert runner.agree_with_other_cpus() == []
