"""A run never lies: resume checks what it resumes, bad input fails up front, divergence is caught.

One test per case of docs/run-integrity.md (the table names them).
"""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.conftest import TINY_SAFETY, make_cfg, save_micro_checkpoint
from tests.test_cli import SMALL, zorefine
from zorefine.config import validate
from zorefine.errors import ConfigError, DataError, ModelError
from zorefine.models.checkpoint_dir import check_causal_lm_dir
from zorefine.models.loading import load_causal_lm
from zorefine.pipeline import run_pipeline
from zorefine.refine.divergence import WINDOW, DivergenceGuard, roll_back
from zorefine.zo.engine import ZOEngine, ZOSettings, ZOStepRecord
from zorefine.zo.trajectory import read_trajectory


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _measured(run_dir: Path) -> dict:
    """What evaluate measured, without paths, times and the config echo."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("checkpoint", "seconds", "cached_from")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads((run_dir / "metrics.json").read_text())["models"])


# ---- 1. resume ignores the config --------------------------------------------------------------


def test_a_changed_setting_reruns_its_stage_and_everything_after_it(micro_checkpoint, tmp_path):
    run_pipeline(make_cfg(micro_checkpoint), tmp_path / "run")
    aligned_before = (tmp_path / "run" / "checkpoints/aligned/model.safetensors").stat().st_mtime_ns
    changed = make_cfg(micro_checkpoint, **{"refine.lr": 0.5, "evaluate.sigmas": "[0.05,0.2]"})
    run_pipeline(changed, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"wnoise σ=0.05", "wnoise σ=0.2"} <= set(metrics["models"]["after"]["summary"])
    assert metrics["config"]["refine"]["lr"] == 0.5
    # align and analyze were current: not redone.
    assert (tmp_path / "run" / "checkpoints/aligned/model.safetensors").stat().st_mtime_ns == aligned_before
    run_pipeline(changed, tmp_path / "fresh")
    assert _measured(tmp_path / "run") == _measured(tmp_path / "fresh")


def test_resume_strict_stops_on_a_changed_setting_with_one_line(micro_checkpoint, tmp_path):
    run_pipeline(make_cfg(micro_checkpoint, stages="[align]"), tmp_path)
    with pytest.raises(ConfigError, match=r"resume=strict: align .*align\.lr: 0\.003 -> 0\.01"):
        run_pipeline(make_cfg(micro_checkpoint, stages="[align]", resume="strict", **{"align.lr": 0.01}), tmp_path)
    run_pipeline(make_cfg(micro_checkpoint, stages="[align]", resume="strict"), tmp_path)  # same settings: fine


def test_a_changed_upstream_stage_that_is_not_requested_is_an_error(micro_checkpoint, tmp_path):
    run_pipeline(make_cfg(micro_checkpoint, stages="[align,evaluate]"), tmp_path)
    with pytest.raises(ConfigError, match="align .* is not in stages"):
        run_pipeline(make_cfg(micro_checkpoint, stages="[evaluate]", **{"align.epochs": 2}), tmp_path)


def test_the_same_settings_skip_every_stage(micro_checkpoint, tmp_path, caplog):
    run_pipeline(make_cfg(micro_checkpoint), tmp_path)
    caplog.set_level("INFO")
    run_pipeline(make_cfg(micro_checkpoint), tmp_path)
    assert caplog.text.count("with the same settings and inputs, skipping") == 4


CHANGES = [
    {"refine.lr": 0.2},
    {"refine.steps": 5},
    {"refine.steps": 1},
    {"refine.zo.eps": 0.1},
    {"analyze.top_k": 2},
    {"align.epochs": 2},
    {"evaluate.sigmas": "[0.3]"},
    {"evaluate.max_new_tokens": 6},
    {"seed": 1},
    {"refine.lr_schedule": "cosine"},
]


# One draw per architecture by default (each draw runs the pipeline three times); `-m slow` adds two more.
@pytest.mark.parametrize("draw", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_any_small_change_between_two_runs_gives_what_a_fresh_run_gives(micro_checkpoint, tmp_path, draw):
    rng = random.Random(f"change:{draw}:{micro_checkpoint.name}")
    first, second = rng.sample(CHANGES, 2)
    run_pipeline(make_cfg(micro_checkpoint, **first), tmp_path / "reused")
    run_pipeline(make_cfg(micro_checkpoint, **second), tmp_path / "reused")
    run_pipeline(make_cfg(micro_checkpoint, **second), tmp_path / "fresh")
    assert _measured(tmp_path / "reused") == _measured(tmp_path / "fresh"), (first, second)


# ---- 2. resume ignores missing outputs -----------------------------------------------------------


def test_a_deleted_checkpoint_reruns_its_stage(micro_checkpoint, tmp_path):
    import shutil

    run_pipeline(make_cfg(micro_checkpoint, stages="[align,analyze]"), tmp_path)
    aligned = _weights(tmp_path / "checkpoints/aligned")
    shutil.rmtree(tmp_path / "checkpoints/aligned")
    summaries = run_pipeline(make_cfg(micro_checkpoint, stages="[align,analyze,refine]"), tmp_path)
    assert summaries["refine"]["base"] == str(tmp_path / "checkpoints/aligned")
    again = _weights(tmp_path / "checkpoints/aligned")
    assert all(torch.equal(aligned[k], again[k]) for k in aligned)


def test_a_marker_without_its_checkpoint_never_falls_back_to_the_start_model(micro_checkpoint, tmp_path):
    import shutil

    run_pipeline(make_cfg(micro_checkpoint, stages="[align]"), tmp_path)
    shutil.rmtree(tmp_path / "checkpoints/aligned")
    with pytest.raises(DataError, match="marks align done but .*checkpoints/aligned is missing"):
        run_pipeline(make_cfg(micro_checkpoint, stages="[refine]", **{"refine.layers": "[0]"}), tmp_path)


# ---- 3. model=local without a path ---------------------------------------------------------------


def test_model_local_without_a_path_fails_with_one_line(tmp_path):
    done = zorefine("model=local", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "zorefine: error: model=local needs model.path=/path/to/checkpoint (a local Hugging Face causal LM directory)"
    ]


# ---- 4. non-chat models ------------------------------------------------------------------------


def _bert(tmp_path: Path, head: bool, tokenizer=None) -> Path:
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = transformers.BertLMHeadModel(config) if head else transformers.BertModel(config)
    model.save_pretrained(tmp_path / "bert", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.mark.parametrize("head", [False, True])
def test_encoder_only_models_are_refused(tmp_path, micro_tokenizer, head):
    directory = _bert(tmp_path, head, micro_tokenizer)
    with pytest.raises(ModelError, match="'bert' encoder model, not a decoder-only causal language model"):
        check_causal_lm_dir(directory)


def test_a_folder_without_tokenizer_files_is_refused(tmp_path, micro_tokenizer):
    directory = save_micro_checkpoint("llama", micro_tokenizer, tmp_path / "llama")
    for name in os.listdir(directory):
        if "token" in name or name in ("vocab.json", "merges.txt"):
            os.remove(directory / name)
    with pytest.raises(ModelError, match="has no tokenizer files"):
        check_causal_lm_dir(directory)


def test_a_decoder_saved_without_its_lm_head_is_refused(tmp_path, micro_tokenizer):
    config = transformers.LlamaConfig(vocab_size=len(micro_tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaModel(config).save_pretrained(tmp_path / "base", safe_serialization=True)
    micro_tokenizer.save_pretrained(tmp_path / "base")
    with pytest.raises(ModelError, match="LlamaModel without a language-model head"):
        check_causal_lm_dir(tmp_path / "base")


def test_the_cli_refuses_a_bert_folder_before_any_stage(tmp_path):
    directory = _bert(tmp_path, head=False)
    done = zorefine(f"model.path={directory}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL, cwd=tmp_path)
    assert done.returncode == 2
    assert "encoder model, not a decoder-only causal language model" in done.stderr
    assert not (tmp_path / "run" / "align.json").exists()


# ---- 6. unreadable weights ---------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_safetensors_file_is_one_line_naming_it(tmp_path, micro_tokenizer, damage):
    directory = save_micro_checkpoint("llama", micro_tokenizer, tmp_path / "llama")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a tensor file" * 100)
    with pytest.raises(ModelError, match=f"{weights}: not a readable safetensors file"):
        check_causal_lm_dir(directory)
    done = zorefine(f"model.path={directory}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL, cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


# ---- 7. custom code ------------------------------------------------------------------------------

_CUSTOM_CONFIG = '''
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"
'''
_CUSTOM_MODEL = '''
from transformers import LlamaForCausalLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''


def test_a_custom_causal_lm_loads_with_trust_remote_code(tmp_path, micro_tokenizer):
    directory = save_micro_checkpoint("llama", micro_tokenizer, tmp_path / "custom")
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyCustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny.TinyCustomConfig", "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM",
    })
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_tiny.py").write_text(_CUSTOM_CONFIG)
    (directory / "modeling_tiny.py").write_text(_CUSTOM_MODEL)
    with pytest.raises(ModelError, match="set model.trust_remote_code=true if you trust it"):
        check_causal_lm_dir(directory)
    model, _ = load_causal_lm(directory, device="cpu", trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM"


# ---- 5. divergence -------------------------------------------------------------------------------


def test_a_divergent_learning_rate_is_stopped_and_the_start_weights_kept(micro_checkpoint, tmp_path):
    cfg = make_cfg(micro_checkpoint, stages="[refine]", **{"refine.layers": "[0]", "refine.lr": 1e6, "refine.steps": 6})
    summaries = run_pipeline(cfg, tmp_path)
    diverged = summaries["refine"]["diverged"]
    assert diverged["step"] == 0 and "RMS" in diverged["reason"] and diverged["kept_steps"] == 0
    start, refined = _weights(micro_checkpoint), _weights(tmp_path / "checkpoints/refined")
    assert all(torch.equal(start[k], refined[k]) for k in start)
    assert read_trajectory(tmp_path / "trajectory.jsonl")[1] == []


def test_on_divergence_continue_only_warns(micro_checkpoint, tmp_path):
    cfg = make_cfg(micro_checkpoint, stages="[refine]", **{
        "refine.layers": "[0]", "refine.lr": 1e6, "refine.steps": 3, "refine.on_divergence": "continue"})
    summary = run_pipeline(cfg, tmp_path)["refine"]
    assert summary["diverged"]["step"] == 0 and summary["steps"] == 3


def test_the_cli_exits_non_zero_after_a_divergence_and_says_so(llama_checkpoint_for_cli, tmp_path):
    args = [f"model.path={llama_checkpoint_for_cli}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL, "refine.lr=1e6"]
    done = zorefine(*args, cwd=tmp_path)
    assert done.returncode == 3
    assert "zorefine: error: refine diverged at step 0" in done.stderr
    assert "DIVERGED at step 0" in (tmp_path / "run" / "report.md").read_text()
    assert zorefine(*args, cwd=tmp_path).returncode == 3  # resumed: still reported


@pytest.fixture()
def llama_checkpoint_for_cli(tmp_path, micro_tokenizer):
    return save_micro_checkpoint("llama", micro_tokenizer, tmp_path / "micro-llama")


def _record(step: int, loss: float, skipped: bool = False) -> ZOStepRecord:
    return ZOStepRecord(step=step, seed=step, projected_grad=0.0, lr=0.0, loss_plus=loss, loss_minus=loss, skipped=skipped)


def test_the_guard_names_the_last_good_step_of_a_runaway_loss():
    guard = DivergenceGuard({}, loss_factor=2.0)
    losses = [1.0, 0.9, 1.1, 5.0, 5.0, 5.0, 5.0, 5.0]
    found = [guard.observe(_record(i, loss)) for i, loss in enumerate(losses)]
    assert found[:-1] == [None] * (len(losses) - 1)
    assert found[-1].step == 7 and found[-1].kept_steps == 3 and "stayed above 2.000" in found[-1].reason
    assert DivergenceGuard({}).observe(_record(0, 1.0)) is None
    noisy = DivergenceGuard({})
    assert all(noisy.observe(_record(i, 1.0 + (2.5 if i % 2 else 0.0))) is None for i in range(20))  # spikes, not a run-away
    skipping = DivergenceGuard({})
    results = [skipping.observe(_record(i, float("nan"), skipped=True)) for i in range(WINDOW)]
    assert results[-1] is not None and results[-1].kept_steps == 0


def test_roll_back_rebuilds_exactly_the_weights_of_the_kept_steps():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 8))
    start = weight.detach().clone()
    settings = ZOSettings(eps=1e-2, optimizer="adam")

    def loss() -> float:
        return float((weight.detach() ** 2).sum())

    engine = ZOEngine({"w": weight}, settings=settings)
    records, after_three = [], None
    for step in range(6):
        records.append(engine.step(step, step + 11, 0.01, loss))
        if step == 2:
            after_three = weight.detach().clone()
    roll_back({"w": weight}, {"w": start}, settings, records[:3], None)
    assert torch.equal(weight.detach(), after_three)


# ---- 8. output directory -----------------------------------------------------------------------


def test_an_output_directory_that_cannot_be_created_is_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = zorefine(f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"zorefine: error: cannot write the output directory {blocker / 'run'}: Not a directory"]


def _check_many_times(directory: str) -> int:
    from zorefine.cli import check_output_dir

    for _ in range(200):
        check_output_dir(Path(directory))
    return os.getpid()


def test_every_process_of_a_launch_can_check_the_same_output_directory_at_once(tmp_path):
    # torchrun starts each rank with the same hydra.run.dir: their write checks must not collide.
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(4) as pool:
        pids = pool.map(_check_many_times, [str(tmp_path / "run")] * 4)
    assert len(pids) == 4 and list((tmp_path / "run").iterdir()) == []


def test_the_output_directory_is_read_from_the_command_line():
    from zorefine.cli import _output_dir

    assert _output_dir(["hydra.run.dir=/x/y"]) == Path("/x/y")
    assert _output_dir(["-m", "hydra.sweep.dir=/s", "hydra.run.dir=/x"]) == Path("/s")
    assert _output_dir(["hydra.run.dir=/runs/${now:%H}"]) == Path("/runs")
    assert _output_dir(["hydra.run.dir=/runs/job_${now:%H}"]) == Path("/runs")
    assert _output_dir([]) == Path.cwd() / "outputs"


# ---- 9. validation before the first stage --------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ({"evaluate.quantization": "[rtn:int3]"}, "bad threat spec 'rtn:int3'"),
        ({"refine.objective_threat": "wnoise:abc"}, "bad threat spec 'wnoise:abc'"),
        ({"analyze.threats": "[rtn:int3]"}, "bad threat spec"),
        ({"evaluate.judge": "model"}, "evaluate.judge=model needs evaluate.judge_path=DIR"),
        ({"evaluate.judge": "model", "evaluate.judge_path": "/no/such/judge"}, "evaluate.judge_path: no such directory"),
        ({"evaluate.judge": "magic"}, "unknown judge 'magic'"),
        ({"resume": "maybe"}, "resume must be true, false or strict"),
        ({"refine.on_divergence": "ignore"}, "refine.on_divergence must be stop or continue"),
        ({"align.deepspeed": "/no/such/zero3.json"}, "align.deepspeed: no such file"),
        ({"refine.deepspeed": "/no/such/zero3.json"}, "refine.deepspeed: no such file"),
        ({"refine.selection_file": "/no/such/selection.json"}, "refine.selection_file: no such file"),
    ],
)
def test_every_config_value_is_checked_up_front(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(None, **override))


def test_a_split_the_run_needs_is_checked_before_align_runs(micro_checkpoint, tmp_path):
    rows = [json.loads(line) for line in TINY_SAFETY.read_text().splitlines() if line.strip()]
    no_val = tmp_path / "no_val.jsonl"
    no_val.write_text("".join(json.dumps(r) + "\n" for r in rows if r["split"] != "val"))
    with pytest.raises(DataError, match="no harmful examples in split 'val'"):
        run_pipeline(make_cfg(micro_checkpoint, **{"data.safety_file": str(no_val)}), tmp_path / "run")
    assert not (tmp_path / "run" / "align.json").exists()


# ---- crash leftovers and permissions -----------------------------------------------------------


def test_leftovers_of_a_killed_checkpoint_write_are_removed_and_checkpoints_follow_the_umask(micro_checkpoint, tmp_path):
    leftover = tmp_path / "checkpoints" / ".aligned.partial-abc123"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    old = os.umask(0o022)
    try:
        run_pipeline(make_cfg(micro_checkpoint, stages="[align]"), tmp_path)
    finally:
        os.umask(old)
    assert not leftover.exists()
    mode = stat.S_IMODE((tmp_path / "checkpoints" / "aligned").stat().st_mode)
    assert mode == 0o755


def test_zero_initialised_tensors_do_not_count_as_exploding():
    weight, bias = torch.nn.Parameter(torch.randn(16, 16)), torch.nn.Parameter(torch.zeros(16))
    guard = DivergenceGuard({"w": weight, "b": bias})
    with torch.no_grad():
        bias.add_(0.05)  # an ordinary update of a bias that started at zero
    assert guard.observe(_record(0, 1.0)) is None
    with torch.no_grad():
        bias.add_(100.0)
    assert "RMS of b" in guard.observe(_record(1, 1.0)).reason
