"""Tiny random Hugging Face causal LMs for tests: built from a config, offline, in milliseconds.

Shared helper: ``tiny_model("llama")`` returns a 2-3 layer model with hidden size 32 and a
128-token vocabulary, float32, in eval mode. The same ``(arch, seed)`` always gives the same
weights, and building one does not disturb the caller's global RNG state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

VOCAB = 128
HIDDEN = 32


def _llama() -> PretrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def _gpt2() -> PretrainedConfig:
    # Dropout off in the config as well as eval mode: nothing random may leak into tests.
    return transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=128,
        n_embd=HIDDEN,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # GPT-2's defaults (50256) lie outside the tiny vocabulary and make transformers warn.
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )


def _qwen2() -> PretrainedConfig:
    return transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def _mistral() -> PretrainedConfig:
    return transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=None,
    )


def _gemma() -> PretrainedConfig:
    return transformers.GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
    )


def _opt() -> PretrainedConfig:
    return transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
    )


def _gpt_neox() -> PretrainedConfig:
    return transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama,
    "gpt2": _gpt2,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "gemma": _gemma,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
}

ARCHS: tuple[str, ...] = tuple(CONFIGS)


def tiny_config(arch: str) -> PretrainedConfig:
    """The config of a tiny model of architecture ``arch`` (one of :data:`ARCHS`)."""
    try:
        return CONFIGS[arch]()
    except KeyError:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}") from None


def num_layers(config: PretrainedConfig) -> int:
    """Number of decoder layers a config asks for, whatever the architecture calls it."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise AttributeError(f"{type(config).__name__} has no layer count")


def tiny_model(arch: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random causal LM of architecture ``arch``: fp32, eval mode, deterministic in ``seed``."""
    config = tiny_config(arch)
    # fork_rng: seeding the init must not change the random stream of the calling test.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_input_ids(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    """Deterministic random token ids valid for every tiny model (avoiding id 0, often padding)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)
