"""The ``zorefine`` command end to end, and its answers to bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_SAFETY

pytestmark = pytest.mark.integration

SMALL = [
    f"data.safety_file={TINY_SAFETY}",
    "data.max_length=96",
    "align.epochs=1",
    "align.batch_size=8",
    "analyze.seeds=1",
    "analyze.num_prompts=4",
    "analyze.num_benign=4",
    "analyze.max_new_tokens=4",
    "analyze.top_k=1",
    "refine.steps=2",
    "refine.batch_size=4",
    "evaluate.max_prompts=4",
    "evaluate.clean_max_prompts=8",
    "evaluate.max_new_tokens=4",
    "evaluate.sigmas=[0.1]",
    "evaluate.seeds=1",
    "evaluate.quantization=[]",
]


def zorefine(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "zorefine", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture()
def llama_checkpoint(tmp_path, micro_tokenizer):
    from tests.conftest import save_micro_checkpoint

    return save_micro_checkpoint("llama", micro_tokenizer, tmp_path / "micro-llama")


def test_whole_pipeline_then_each_stage_alone(llama_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    done = zorefine(f"model.path={llama_checkpoint}", f"hydra.run.dir={run_dir}", *SMALL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ["metrics.json", "report.md", "robustness.png", "sensitivity.json", "sensitivity.png", "trajectory.jsonl"]:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints/aligned/model.safetensors").is_file()
    assert (run_dir / "checkpoints/refined/model.safetensors").is_file()
    assert "Before vs after refinement" in (run_dir / "report.md").read_text()

    aligned = run_dir / "checkpoints" / "aligned"
    alone = zorefine("stages=[evaluate]", f"model.path={aligned}", f"hydra.run.dir={tmp_path / 'eval'}", *SMALL, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert set(json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"]) == {"model"}

    dropin = zorefine(
        "stages=[analyze,refine,evaluate]", "align.enabled=false", f"model.path={aligned}",
        f"hydra.run.dir={tmp_path / 'dropin'}", *SMALL, cwd=tmp_path,
    )
    assert dropin.returncode == 0, dropin.stderr[-3000:]
    metrics = json.loads((tmp_path / "dropin" / "metrics.json").read_text())
    assert metrics["models"]["before"]["checkpoint"] == str(aligned)


def test_budget_sweep_runs_one_job_per_value(llama_checkpoint, tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = zorefine(
        "-m", "refine.steps=1,2", "stages=[analyze,refine]", f"model.path={llama_checkpoint}",
        f"hydra.sweep.dir={sweep_dir}", *[a for a in SMALL if not a.startswith("refine.steps=")], cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads((sweep_dir / str(i) / "refine.json").read_text())["steps"] for i in (0, 1)]
    assert steps == [1, 2]


def _assert_one_clear_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert fragment in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_unknown_config_key_fails_clearly(tmp_path):
    result = zorefine("refine.stepz=3", cwd=tmp_path)
    _assert_one_clear_error(result, "stepz")


_MODEL_STACK = ("transformers.modeling_utils", "deepspeed", "bitsandbytes", "matplotlib.pyplot")


def test_a_config_error_is_found_before_the_model_libraries_are_imported(tmp_path):
    # Importing transformers' model classes, DeepSpeed or matplotlib takes seconds: a typo in a
    # setting is answered without them. The run below stops in validation, as a typo would.
    probe = (
        "import sys\nfrom zorefine import cli\n"
        "sys.argv = ['zorefine', 'model=local']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {_MODEL_STACK!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "model=local needs model.path" in done.stderr, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_missing_model_path(tmp_path):
    result = zorefine(f"model.path={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL, cwd=tmp_path)
    _assert_one_clear_error(result, "zorefine: error: model path not found")
    assert result.returncode == 2


def test_path_without_a_causal_lm(tmp_path):
    not_lm = tmp_path / "t5"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    result = zorefine(f"model.path={not_lm}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL, cwd=tmp_path)
    _assert_one_clear_error(result, "not a causal language model")


def test_malformed_jsonl_row_names_file_and_line(llama_checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = TINY_SAFETY.read_text().splitlines()
    lines[2] = '{"prompt": "hi", "kind": "benign", "split": "train"}'
    bad.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    args = [f"model.path={llama_checkpoint}", f"hydra.run.dir={run_dir}", *SMALL, f"data.safety_file={bad}"]
    result = zorefine(*args, cwd=tmp_path)
    _assert_one_clear_error(result, "bad.jsonl:3")
    assert not (run_dir / "checkpoints").exists()


def test_empty_dataset(llama_checkpoint, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [f"model.path={llama_checkpoint}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL, f"data.safety_file={empty}"]
    _assert_one_clear_error(zorefine(*args, cwd=tmp_path), "no examples")


def test_dataset_missing_a_split(llama_checkpoint, tmp_path):
    only_train = tmp_path / "train_only.jsonl"
    only_train.write_text("\n".join(l for l in TINY_SAFETY.read_text().splitlines() if '"split": "train"' in l) + "\n")
    args = ["stages=[analyze]", f"model.path={llama_checkpoint}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL, f"data.safety_file={only_train}"]
    _assert_one_clear_error(zorefine(*args, cwd=tmp_path), "no harmful examples in split 'val'")


def test_multirun_sweep_ends_in_one_comparison(llama_checkpoint, tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = zorefine(
        "-m", f"model.path={llama_checkpoint}", f"hydra.sweep.dir={sweep_dir}", *SMALL,
        "stages=[refine,evaluate]", "refine.layers=[1]", "refine.steps=1,3", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((sweep_dir / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "zo", "zo"] and rows[0]["forward_passes"] == 0
    # All a run spent: its ZO steps (2 passes each) and the decoding of its self targets.
    for row in rows[1:]:
        refine = json.loads((Path(row["run_dir"]) / "refine.json").read_text())
        assert row["forward_passes"] == refine["total_forward_passes"] == refine["forward_passes"] + refine["target_decode_calls"]
    assert rows[2]["forward_passes"] - rows[1]["forward_passes"] == 4
    assert "refine.steps=3" in rows[2]["label"]
    assert (sweep_dir / "comparison.html").is_file() and (sweep_dir / "gain_vs_forwards.png").is_file()
