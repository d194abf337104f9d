"""Shared fixtures: offline micro checkpoints of two architectures and small run configs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from zorefine.config import ZorefineConfig

TESTS_DIR = Path(__file__).parent
TINY_SAFETY = TESTS_DIR / "data" / "tiny_safety.jsonl"

# Tiny tensors: one thread avoids the scheduling overhead that dominates at this size.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def micro_tokenizer():
    """The built-in BPE tokenizer at a small vocabulary (trained offline on the shipped text)."""
    from zorefine.models.builtin import build_tokenizer

    return build_tokenizer(384)


def _micro_config(arch: str, tokenizer) -> transformers.PretrainedConfig:
    common = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **common,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=3, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    raise ValueError(arch)


def save_micro_checkpoint(arch: str, tokenizer, out_dir: Path, seed: int = 0) -> Path:
    """Write a random micro causal LM of ``arch`` with the built-in tokenizer (safetensors)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_micro_config(arch, tokenizer))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def micro_checkpoint(request, tmp_path_factory, micro_tokenizer) -> Path:
    """A saved micro checkpoint, once per architecture."""
    return save_micro_checkpoint(request.param, micro_tokenizer, tmp_path_factory.mktemp(f"micro-{request.param}"))


def make_cfg(model_path: Path | None, **overrides):
    """A small, fast run config on the tiny test data (dotlist overrides as keyword args)."""
    base = OmegaConf.structured(ZorefineConfig)
    small = {
        "model.path": str(model_path) if model_path else None,
        "data.safety_file": str(TINY_SAFETY),
        "data.max_length": 96,
        "align.epochs": 1,
        "align.batch_size": 8,
        "analyze.seeds": 2,
        "analyze.num_prompts": 4,
        "analyze.num_benign": 4,
        "analyze.max_new_tokens": 4,
        "analyze.top_k": 1,
        "refine.steps": 3,
        "refine.batch_size": 4,
        "evaluate.max_prompts": 4,
        "evaluate.clean_max_prompts": 8,
        "evaluate.max_new_tokens": 4,
        "evaluate.sigmas": [0.1],
        "evaluate.seeds": 1,
        "evaluate.quantization": ["rtn:int8"],
    }
    small.update({k.replace("__", "."): v for k, v in overrides.items()})
    dotlist = OmegaConf.from_dotlist([f"{k}={'null' if v is None else v}" for k, v in small.items()])
    return OmegaConf.merge(base, dotlist)
