"""Scale-out: several processes (gloo on CPU) give what one process gives.

The multi-process tests launch the real ``zorefine`` command under ``torch.distributed.run``
(the ``torchrun`` module) and DeepSpeed's real ZeRO engines: nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_SAFETY, save_micro_checkpoint
from zorefine.distributed.processes import Processes
from zorefine.distributed.partitions import LocalEntries, local_entries, whole_rms
from zorefine.zo.directions import Direction
from zorefine.refine.resume import trajectory_settings

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def test_a_window_of_a_direction_is_that_slice_of_the_whole_direction(monkeypatch):
    import zorefine.zo.directions as perturb

    monkeypatch.setitem(perturb._CHUNK_BY_DEVICE_TYPE, "cpu", 128)  # windows straddle chunk edges
    for kind in ("rademacher", "gaussian"):
        whole = Direction(kind, (25, 40), "cpu", seed=7).full().view(-1)
        for offset, length in [(0, 500), (500, 500), (130, 300), (900, 200)]:  # the last one runs past the end
            window = Direction(kind, (25, 40), "cpu", seed=7, window=(offset, length)).full()
            valid = max(0, min(length, whole.numel() - offset))
            assert window.shape == (length,)
            assert torch.equal(window[:valid], whole[offset : offset + valid])
            assert not window[valid:].any()  # partition padding gets no direction


def test_one_process_shares_nothing_and_keeps_item_order():
    processes = Processes()
    assert processes.is_main and not processes.distributed
    assert processes.shard([1, 2, 3]) == [1, 2, 3]
    assert processes.sum([1.5, 2]) == [1.5, 2.0] and processes.bytes_communicated == 0
    assert processes.map_sharded([1, 2, 3], lambda x: x * 10) == [10, 20, 30]
    two = Processes(rank=1, world_size=3)
    assert two.shard(list(range(7))) == [1, 4] and not two.is_main


def test_whole_parameters_are_their_own_entries_and_rms():
    weight = torch.nn.Parameter(torch.full((4, 5), 2.0))
    entries = local_entries(weight)
    assert entries.tensor is weight and entries.offset == 0 and not entries.partitioned and entries.window() is None
    assert whole_rms(entries, Processes()) == pytest.approx(2.0)
    # A padded last partition: only the entries inside the tensor count.
    padded = LocalEntries(torch.tensor([3.0, 4.0, 99.0]), offset=2, shape=torch.Size([4]), partitioned=False)
    assert padded.valid == 2


# ---- launch presets -------------------------------------------------------------------------


def test_every_launch_preset_parses_and_says_what_it_is_for():
    import yaml

    files = sorted(p for p in (REPO / "launch").rglob("*") if p.is_file() and p.name != "README.md")
    kinds = {p.suffix for p in files}
    assert {".json", ".yaml", ".sbatch"} <= kinds and len(files) >= 7
    for path in files:
        text = path.read_text()
        if path.suffix == ".json":
            config = json.loads(text)  # JSON has no comments: the README documents these
            assert config["zero_optimization"]["stage"] in (2, 3)
            assert path.name in (REPO / "launch" / "README.md").read_text()
        elif path.suffix == ".yaml":
            assert text.startswith("#") and "Edit:" in text
            assert yaml.safe_load(text)["num_processes"] >= 1
        else:
            assert text.startswith("#!/bin/bash") and "Edit:" in text and "#SBATCH --gpus-per-node" in text
            assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
            assert "-m zorefine" in text


def test_the_slurm_launcher_preset_composes_with_a_sweep():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    command = [sys.executable, "-m", "zorefine", "+experiment=budget_sweep", "hydra/launcher=zorefine_slurm",
               "hydra.launcher.partition=debug", "--cfg", "hydra"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "submitit_launcher.SlurmLauncher" in done.stdout and "partition: debug" in done.stdout
    assert "gpus_per_node: 1" in done.stdout


# ---- several processes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_llama(tmp_path_factory, micro_tokenizer) -> Path:
    return save_micro_checkpoint("llama", micro_tokenizer, tmp_path_factory.mktemp("micro-dist"))


def _zorefine(processes: int, run_dir: Path, *overrides: str) -> None:
    """Run the ``zorefine`` command in ``processes`` processes (torchrun, gloo) into ``run_dir``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", "zorefine", f"hydra.run.dir={run_dir}", f"data.safety_file={TINY_SAFETY}", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _weights(run_dir: Path, stage: str = "refined") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / stage / "model.safetensors")


def _steps(run_dir: Path) -> tuple[dict, list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "trajectory.jsonl").read_text().splitlines()]
    return rows[0], rows[1:]


REFINE = ["stages=[refine]", "refine.layers=[0,1]", "refine.steps=6", "refine.batch_size=8", "refine.lr=0.01"]


@pytest.fixture(scope="module")
def one_process_refine(micro_llama, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    _zorefine(1, run_dir, f"model.path={micro_llama}", *REFINE)
    return run_dir


def _assert_same_refinement(run_dir: Path, reference: Path) -> None:
    ours, theirs = _weights(run_dir), _weights(reference)
    assert set(ours) == set(theirs)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6
    header, steps = _steps(run_dir)
    reference_header, reference_steps = _steps(reference)
    # The same run but for how it was computed (e.g. refine.deepspeed).
    assert trajectory_settings(header) == trajectory_settings(reference_header)
    header.pop("refine"), reference_header.pop("refine")
    assert header == reference_header
    assert [(s["step"], s["seed"], s["lr"], s["skipped"]) for s in steps] == [
        (s["step"], s["seed"], s["lr"], s["skipped"]) for s in reference_steps
    ]
    for step, reference_step in zip(steps, reference_steps):
        assert step["projected_grad"] == pytest.approx(reference_step["projected_grad"], abs=1e-5)
        assert step["loss_plus"] == pytest.approx(reference_step["loss_plus"], abs=1e-5)


def test_two_process_data_parallel_zo_equals_one_process(one_process_refine, micro_llama, tmp_path, micro_tokenizer):
    run_dir = tmp_path / "run"
    _zorefine(2, run_dir, f"model.path={micro_llama}", *REFINE)
    _assert_same_refinement(run_dir, one_process_refine)
    # The refinement did move the weights (the equality above is not two untouched copies).
    start = load_file(micro_llama / "model.safetensors")
    refined = _weights(run_dir)
    assert max(float((refined[k] - start[k]).abs().max()) for k in start) > 1e-4
    # One run directory, one log: the second process wrote no files of its own.
    assert len((run_dir / "trajectory.jsonl").read_text().splitlines()) == 7
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run"]


def test_zero3_partitioned_zo_equals_unpartitioned(one_process_refine, micro_llama, tmp_path):
    # DeepSpeed's default persistence threshold would keep small tensors whole and blind to
    # partition updates; zorefine must partition every tensor whatever the user's file says.
    config = json.loads((REPO / "launch/deepspeed/zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 100000
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    _zorefine(2, run_dir, f"model.path={micro_llama}", *REFINE, f"refine.deepspeed={tmp_path / 'zero3.json'}")
    _assert_same_refinement(run_dir, one_process_refine)


def test_two_process_analysis_and_evaluation_equal_one_process(micro_llama, tmp_path):
    stages = ["stages=[analyze,evaluate]", "analyze.seeds=2", "analyze.num_prompts=4", "analyze.num_benign=4",
              "analyze.max_new_tokens=4", "evaluate.max_prompts=4", "evaluate.max_new_tokens=4",
              "evaluate.sigmas=[0.1,0.3]", "evaluate.seeds=2", "evaluate.quantization=[rtn:int8]"]
    _zorefine(1, tmp_path / "one", f"model.path={micro_llama}", *stages)
    _zorefine(2, tmp_path / "two", f"model.path={micro_llama}", *stages)
    one, two = (json.loads((tmp_path / d / "sensitivity.json").read_text()) for d in ("one", "two"))
    assert two["scores"] == one["scores"] and two["ranking"] == one["ranking"]
    assert two["cost"]["forward_passes"] >= one["cost"]["forward_passes"]  # each process also measures the clean model
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text())["models"]["model"] for d in ("one", "two"))
    assert two["conditions"] == one["conditions"] and two["summary"] == one["summary"]
    assert len(one["conditions"]) == 1 + 2 * 2 + 1


@pytest.mark.parametrize("zero_config", ["zero2.json", "zero3.json"])
def test_align_under_deepspeed_on_two_processes_saves_a_loadable_checkpoint(micro_llama, tmp_path, zero_config):
    import transformers

    run_dir = tmp_path / "run"
    _zorefine(2, run_dir, f"model.path={micro_llama}", "stages=[align]", "align.epochs=1",
              f"align.deepspeed={REPO / 'launch/deepspeed' / zero_config}")
    aligned = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "aligned")
    start = transformers.AutoModelForCausalLM.from_pretrained(micro_llama)
    trained = {k: v for k, v in aligned.state_dict().items()}
    assert set(trained) == set(start.state_dict())
    assert any(not torch.equal(trained[k], v) for k, v in start.state_dict().items())  # it did train
    assert json.loads((run_dir / "align.json").read_text())["enabled"] is True


def test_a_batch_smaller_than_the_number_of_processes_is_a_clear_error(micro_llama, tmp_path, monkeypatch):
    import zorefine.distributed.processes as distributed
    from tests.conftest import make_cfg
    from zorefine.errors import ConfigError
    from zorefine.run import Run
    from zorefine.refine import stage as refine

    monkeypatch.setattr(distributed, "_CURRENT", Processes(rank=0, world_size=8))
    with pytest.raises(ConfigError, match="at least the number of processes"):
        refine.run(Run(make_cfg(micro_llama, **{"refine.batch_size": 4, "refine.layers": "[0]"}), tmp_path))
    assert not (tmp_path / "trajectory.jsonl").exists()


def test_a_killed_two_process_refinement_resumes_to_the_same_weights(one_process_refine, micro_llama, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    first_half = [o if not o.startswith("refine.steps=") else "refine.steps=3" for o in REFINE]
    _zorefine(2, run_dir, f"model.path={micro_llama}", *first_half)
    # As if killed after step 3: the log is there, the stage never finished.
    (run_dir / "refine.json").unlink()
    shutil.rmtree(run_dir / "checkpoints")
    _zorefine(2, run_dir, f"model.path={micro_llama}", *REFINE)
    _assert_same_refinement(run_dir, one_process_refine)
    assert json.loads((run_dir / "refine.json").read_text())["steps"] == 6


def test_two_process_refinement_towards_own_responses_equals_one_process(micro_llama, tmp_path):
    # Self targets are decoded in shards and gathered: every process must score the same pairs.
    own = [*REFINE, "refine.targets=self", "refine.target_tokens=4"]
    _zorefine(1, tmp_path / "one", f"model.path={micro_llama}", *own)
    _zorefine(2, tmp_path / "two", f"model.path={micro_llama}", *own)
    _assert_same_refinement(tmp_path / "two", tmp_path / "one")
    one, two = (json.loads((tmp_path / d / "refine_targets.json").read_text()) for d in ("one", "two"))
    assert one == two and one["targets"] == "self"
