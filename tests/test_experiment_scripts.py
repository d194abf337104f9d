"""The scripts that turn the shipped study results into the README's tables and plot.

They read the small ``comparison.json`` files kept under ``experiments/``; a change to the
comparison report's format that they no longer understand should fail here, not in a user's
reading of the README.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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
