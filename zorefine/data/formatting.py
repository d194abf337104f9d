"""Turn (prompt, response) pairs into model inputs with the tokenizer's chat template."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # the CLI checks a config before it pays for transformers' model classes
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# Used only when a tokenizer ships no chat template (e.g. a base GPT-2).
FALLBACK_TEMPLATE = "### User:\n{prompt}\n### Assistant:\n"


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text a chat model sees before it answers ``prompt``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return FALLBACK_TEMPLATE.format(prompt=prompt)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # Special tokens already sit in the chat template text; adding BOS again would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    max_length: int,
    train_on_prompt: bool = False,
    ends: bool = True,
) -> dict[str, list[int]]:
    """Token ids and labels for one example; the loss sees only the response by default.

    ``ends=False``: the response was cut (e.g. a greedy target at its token limit), so no end
    of sequence follows it.

    Prompt and response are tokenized apart and concatenated so that the boundary never
    merges into one token, which would blur which tokens belong to the response. Long
    prompts are cut from the left so the response (what is learned) survives truncation.
    """
    prompt_ids = _ids(tokenizer, format_prompt(tokenizer, prompt))
    response_ids = _ids(tokenizer, response)
    if ends and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    response_ids = response_ids[: max(1, max_length // 2)] if len(prompt_ids) + len(response_ids) > max_length else response_ids
    prompt_ids = prompt_ids[-(max_length - len(response_ids)) :]
    input_ids = prompt_ids + response_ids
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return {"input_ids": input_ids, "labels": prompt_labels + response_ids}


def collate(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of encoded examples (padding is masked out of attention and loss)."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        input_ids[row, :length] = torch.tensor(feature["input_ids"])
        labels[row, :length] = torch.tensor(feature["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class SFTCollator:
    """A picklable collator for ``transformers.Trainer`` (dataloader workers need pickling)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return collate(features, self.pad_token_id)
