"""Batched greedy generation: left padding, KV cache, stop at EOS."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from zorefine.data.formatting import format_prompt


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 64,
    max_prompt_tokens: int = 256,
) -> list[str]:
    """Greedy responses to ``prompts`` (chat-formatted), decoded without special tokens."""
    return generate_with_ends(model, tokenizer, prompts, max_new_tokens, batch_size, max_prompt_tokens)[0]


@torch.no_grad()
def generate_with_ends(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 64,
    max_prompt_tokens: int = 256,
) -> tuple[list[str], list[bool]]:
    """Greedy responses, and for each whether the model ended it (EOS) rather than running out of tokens."""
    responses: list[str] = []
    ended: list[bool] = []
    previous_side = tokenizer.padding_side
    # Left padding keeps every prompt's last token at the same position, which batched
    # decoding with a KV cache needs.
    tokenizer.padding_side = "left"
    previous_truncation_side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [format_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            encoded = tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_prompt_tokens,
                add_special_tokens=False,
            ).to(model.device)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            eos = tokenizer.eos_token_id
            ended.extend(bool((row == eos).any()) if eos is not None else True for row in new_tokens)
    finally:
        tokenizer.padding_side = previous_side
        tokenizer.truncation_side = previous_truncation_side
    return [r.strip() for r in responses], ended
