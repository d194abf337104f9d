"""The built-in model: a tiny Llama-architecture chat model built offline and cached.

It mirrors how real chat models get their safety. A base model is first trained on benign
instruction data only (built once, cached); the align stage then adds refusal with a short
SFT, so safety is a thin layer on top of the model's language ability.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from zorefine.config import BuiltinModelConfig
from zorefine.data import builtin_path, load_examples, select
from zorefine.files import build_once
from zorefine.models.loading import cache_root, holds_checkpoint, save_checkpoint
from zorefine.models.sft import SFTSettings, run_sft

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Bump when the recipe changes so stale cached models are not reused.
RECIPE_VERSION = 1


def _fingerprint(cfg: BuiltinModelConfig) -> str:
    recipe = {k: v for k, v in asdict(cfg).items() if k != "cache_dir"}
    recipe["recipe_version"] = RECIPE_VERSION
    recipe["data_sha256"] = hashlib.sha256(builtin_path("safety").read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def builtin_model_dir(cfg: BuiltinModelConfig) -> Path:
    """The cache directory of the base model that ``cfg`` describes (built or not)."""
    return cache_root(cfg.cache_dir) / f"builtin-base-{_fingerprint(cfg)}"


def _training_texts() -> list[str]:
    # Only train/val text: test prompts must not shape even the tokenizer.
    examples = [e for e in load_examples(builtin_path("safety")) if e.split != "test"]
    return [text for e in examples for text in (e.prompt, e.response)]


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the shipped training text (offline, deterministic)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a build is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_model(cfg: BuiltinModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised Llama of the configured size (deterministic for ``cfg.seed``)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    seed_everything(cfg.seed)
    return LlamaForCausalLM(config)


def benign_pairs() -> list[tuple[str, str]]:
    """Benign instruction/answer pairs of the training split: the base model's only data."""
    examples = select(load_examples(builtin_path("safety")), split="train", kind="benign")
    return [(e.prompt, e.response) for e in examples]


def build_base_model(cfg: BuiltinModelConfig, out_dir: Path) -> Path:
    """Build tokenizer and model, pretrain on benign instructions, save to ``out_dir``."""
    log.info("building the built-in base model (first run only) into %s", out_dir)
    tokenizer = build_tokenizer(cfg.vocab_size)
    model = init_model(cfg, tokenizer)
    settings = SFTSettings(
        epochs=cfg.pretrain_epochs,
        lr=cfg.pretrain_lr,
        batch_size=cfg.pretrain_batch_size,
        max_length=cfg.pretrain_max_length,
        seed=cfg.seed,
        # The base model learns the language from whole sequences, as pretraining does.
        train_on_prompt=True,
    )
    metrics = run_sft(model, tokenizer, benign_pairs(), settings)
    info = {"stage": "builtin-base", "config": asdict(cfg), "train_metrics": metrics}
    return save_checkpoint(model, tokenizer, out_dir, info)


def ensure_builtin_model(cfg: BuiltinModelConfig) -> Path:
    """Path of the cached built-in base model, building it on first use."""
    out_dir = builtin_model_dir(cfg)
    return build_once(out_dir, holds_checkpoint, lambda: build_base_model(cfg, out_dir))
