"""refine.targets: the objective scores the data's responses or the start model's own."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_cfg
from zorefine.errors import ConfigError
from zorefine.config import validate
from zorefine.models.generation import generate_responses
from zorefine.run import TARGETS_FILE, Run
from zorefine.refine import batches
from zorefine.refine import stage as refine
from zorefine.refine.targets import training_pairs
from zorefine.zo.trajectory import read_trajectory


def _reference(run: Run):
    pairs = batches.reference_pairs(run)
    return pairs.harmful, pairs.benign


@pytest.mark.parametrize("mode", ["self", "self_benign"])
def test_self_targets_are_the_start_models_greedy_responses(micro_checkpoint, tmp_path, mode):
    run = Run(make_cfg(micro_checkpoint), tmp_path)
    model, tokenizer = run.load_model(micro_checkpoint)
    harmful, benign = _reference(run)
    pairs = training_pairs(model, tokenizer, harmful, benign, mode, max_new_tokens=5, batch_size=3)
    assert [pair[0] for pair in pairs.benign] == [p for p, _ in benign]
    own = generate_responses(model, tokenizer, [p for p, _ in benign], max_new_tokens=5)
    assert [pair[1] for pair in pairs.benign] == own
    # The data's benign answers are real text; a random micro model's greedy babble is not them.
    assert [pair[1] for pair in pairs.benign] != [r for _, r in benign]
    if mode == "self_benign":
        assert pairs.harmful == harmful
    else:
        assert [pair[1] for pair in pairs.harmful] == generate_responses(model, tokenizer, [p for p, _ in harmful], max_new_tokens=5)
    # Decoding is counted: one call per token per batch of 3 prompts.
    decoded = len(benign) + (len(harmful) if mode == "self" else 0)
    assert pairs.generation_forward_passes >= 5 * -(-decoded // 3) - 5


def test_reference_targets_leave_the_data_as_it_is(micro_checkpoint, tmp_path):
    run = Run(make_cfg(micro_checkpoint), tmp_path)
    model, tokenizer = run.load_model(micro_checkpoint)
    harmful, benign = _reference(run)
    pairs = training_pairs(model, tokenizer, harmful, benign, "reference", max_new_tokens=5)
    assert (pairs.harmful, pairs.benign, pairs.generation_forward_passes) == (harmful, benign, 0)


def test_refining_towards_own_responses_changes_the_trajectory_and_resumes(micro_checkpoint, tmp_path):
    overrides = {"refine.layers": "[0]", "refine.lr": 1e-2, "refine.steps": 3, "refine.target_tokens": 4}
    plain = refine.run(Run(make_cfg(micro_checkpoint, **overrides, **{"refine.targets": "reference"}), tmp_path / "reference"))
    own = refine.run(Run(make_cfg(micro_checkpoint, **overrides, **{"refine.targets": "self"}), tmp_path / "self"))
    assert plain["target_decode_calls"] == 0 and own["target_decode_calls"] > 0
    _, plain_steps = read_trajectory(tmp_path / "reference" / "trajectory.jsonl")
    header, own_steps = read_trajectory(tmp_path / "self" / "trajectory.jsonl")
    assert header["refine"]["targets"] == "self"
    written = json.loads((tmp_path / "self" / TARGETS_FILE).read_text())
    assert written["targets"] == "self" and len(written["benign"]) == len(batches.reference_pairs(Run(make_cfg(micro_checkpoint), tmp_path)).benign)
    assert not (tmp_path / "reference" / TARGETS_FILE).exists()
    # Same seeds, other losses: the objective really scored other responses.
    assert [s.seed for s in plain_steps] == [s.seed for s in own_steps]
    assert [s.loss for s in plain_steps] != [s.loss for s in own_steps]
    # A log made with other targets is not continued as if it were this run's.
    longer = {**overrides, "refine.targets": "self", "refine.steps": 4}
    again = refine.run(Run(make_cfg(micro_checkpoint, **longer), tmp_path / "self"))
    assert again["steps"] == 4
    _, continued = read_trajectory(tmp_path / "self" / "trajectory.jsonl")
    assert [s.loss for s in continued[:3]] == [s.loss for s in own_steps]


def test_unknown_targets_fail_before_any_work(micro_checkpoint):
    with pytest.raises(ConfigError, match="refine.targets must be one of reference, self, self_benign"):
        validate(make_cfg(micro_checkpoint, **{"refine.targets": "mine"}))
    with pytest.raises(ConfigError, match="target_tokens"):
        validate(make_cfg(micro_checkpoint, **{"refine.target_tokens": 0}))


def test_a_self_target_cut_at_its_token_limit_is_not_taught_to_end(micro_checkpoint, tmp_path):
    from zorefine.models.objectives import encode_batch

    run = Run(make_cfg(micro_checkpoint), tmp_path)
    model, tokenizer = run.load_model(micro_checkpoint)
    harmful, benign = _reference(run)
    pairs = training_pairs(model, tokenizer, harmful, benign, "self_benign", max_new_tokens=3, batch_size=4)
    cut = [pair for pair in pairs.benign if len(pair) == 3]
    assert cut and all(pair[2] is False for pair in cut)  # a random micro model never stops within 3 tokens
    open_ended, closed = encode_batch(tokenizer, cut[:1], 96), encode_batch(tokenizer, [cut[0][:2]], 96)
    assert tokenizer.eos_token_id not in open_ended["labels"][0].tolist()
    assert tokenizer.eos_token_id in closed["labels"][0].tolist()


def test_self_targets_are_decoded_once_per_start_model_and_read_back(micro_checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "targets"
    cfg = make_cfg(micro_checkpoint, **{"refine.target_tokens": 4, "refine.targets_cache_dir": str(cache)})
    first_run = Run(cfg, tmp_path / "first")
    model, tokenizer = first_run.load_model(micro_checkpoint)
    first = batches.refinement_pairs(first_run, model, tokenizer)
    assert len(list(cache.glob("*.json"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(batches, "training_pairs", no_decoding)
    second = batches.refinement_pairs(Run(cfg, tmp_path / "second"), model, tokenizer)
    assert second.benign == first.benign and second.harmful == first.harmful
    # Still charged: a run refining once would have spent it.
    assert second.generation_forward_passes == first.generation_forward_passes > 0
    # Another setting is another entry: it decodes.
    other = make_cfg(micro_checkpoint, **{"refine.target_tokens": 5, "refine.targets_cache_dir": str(cache)})
    with pytest.raises(AssertionError, match="decoded again"):
        batches.refinement_pairs(Run(other, tmp_path / "third"), model, tokenizer)
