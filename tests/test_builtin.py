"""The built-in model: offline tokenizer, deterministic build, cache, chat template."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from zorefine.config import BuiltinModelConfig
from zorefine.data.formatting import encode_example, format_prompt
from zorefine.models.builtin import build_tokenizer, ensure_builtin_model
from zorefine.models.layers import find_decoder_layers
from zorefine.models.loading import load_causal_lm

TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, pretrain_epochs=0.03)


def test_tokenizer_is_deterministic_and_has_a_chat_template():
    first, second = build_tokenizer(320), build_tokenizer(320)
    assert first.get_vocab() == second.get_vocab()
    text = format_prompt(first, "Name three colours.")
    assert text == "<|user|>\nName three colours.\n<|assistant|>\n"
    ids = first(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == first.convert_tokens_to_ids("<|user|>")
    assert first.decode(first("Hello world, 42!")["input_ids"]) == "Hello world, 42!"


def test_response_only_labels_mask_the_prompt():
    tokenizer = build_tokenizer(320)
    encoded = encode_example(tokenizer, "Say hi.", "Hi there.", max_length=64)
    prompt_len = len(tokenizer(format_prompt(tokenizer, "Say hi."), add_special_tokens=False)["input_ids"])
    assert all(label == -100 for label in encoded["labels"][:prompt_len])
    assert encoded["labels"][prompt_len:] == encoded["input_ids"][prompt_len:]
    assert encoded["input_ids"][-1] == tokenizer.eos_token_id


def test_builtin_model_is_cached_and_deterministic(tmp_path):
    first_dir = ensure_builtin_model(BuiltinModelConfig(**TINY, cache_dir=str(tmp_path / "a")))
    stamp = (first_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_builtin_model(BuiltinModelConfig(**TINY, cache_dir=str(tmp_path / "a"))) == first_dir
    assert (first_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    second_dir = ensure_builtin_model(BuiltinModelConfig(**TINY, cache_dir=str(tmp_path / "b")))
    first, second = load_file(str(first_dir / "model.safetensors")), load_file(str(second_dir / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other_seed = ensure_builtin_model(BuiltinModelConfig(**TINY, seed=1, cache_dir=str(tmp_path / "a")))
    assert other_seed != first_dir
    model, tokenizer = load_causal_lm(first_dir)
    assert model.config.model_type == "llama" and len(find_decoder_layers(model)) == 2
    assert tokenizer.chat_template
