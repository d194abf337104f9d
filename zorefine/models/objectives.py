"""Objectives: ``(model, batch) -> scalar``. The safety-alignment loss lives here.

Objectives need no gradient: the ZO refiner calls them under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from zorefine.data.formatting import IGNORE_INDEX, collate, encode_example

if TYPE_CHECKING:  # the CLI checks a config before it pays for transformers' model classes
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def token_nll_and_mask(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL ``(B, T-1)`` (zero on unlabelled tokens) and the label mask."""
    batch = {key: value.to(model.device) for key, value in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Token t predicts token t+1: (B, T-1, V) against (B, T-1).
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = batch["labels"][:, 1:]
    token_nll = torch.nn.functional.cross_entropy(
        shifted_logits.transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return token_nll, shifted_labels != IGNORE_INDEX


def response_nll(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], example_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean negative log-likelihood of the labelled (response) tokens of a batch.

    With ``example_weights`` (one per row) every token of row i counts ``example_weights[i]``
    times in the mean: how the refiner trades the refusal term against the benign-utility term.
    """
    total, weight = response_nll_terms(model, batch, example_weights)
    return total / weight.clamp(min=1 if example_weights is None else 1e-12)


def response_nll_terms(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], example_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted sum of response-token NLLs and the total token weight of a batch.

    Their ratio is :func:`response_nll`; kept apart, the terms of several micro-batches or of
    several processes' shares add up to the loss of the whole batch, however it was split.
    """
    token_nll, mask = token_nll_and_mask(model, batch)
    if example_weights is None:
        return token_nll.sum(), mask.sum().to(token_nll.dtype)
    weights = example_weights.to(device=token_nll.device, dtype=token_nll.dtype).unsqueeze(1)
    return (token_nll * weights).sum(), (mask * weights).sum()


def encode_batch(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str] | tuple[str, str, bool]],
    max_length: int,
) -> dict[str, torch.Tensor]:
    """Encode (prompt, response) pairs into one right-padded, response-labelled batch.

    A third element ``False`` marks a response that was cut: no end of sequence is appended."""
    features = [encode_example(tokenizer, pair[0], pair[1], max_length, ends=pair[2] if len(pair) > 2 else True) for pair in pairs]
    return collate(features, tokenizer.pad_token_id)


@torch.no_grad()
def mean_response_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
    batch_size: int = 32,
) -> float:
    """Response NLL averaged over examples (each example weighs the same, whatever its length)."""
    if not pairs:
        return float("nan")
    return sum(per_example_nll(model, tokenizer, pairs, max_length, batch_size, ends=True)) / len(pairs)


@torch.no_grad()
def per_example_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
    batch_size: int = 32,
    ends: bool = False,
) -> list[float]:
    """The mean response-token NLL of each (prompt, response) pair, in order.

    ``ends``: score the end of sequence after each response too (a reference answer ends; a
    generated one may have been cut at its token limit, so by default it is not).
    """
    values: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = [(p, r, ends) for p, r in pairs[start : start + batch_size]]
        values.extend(float(v) for v in _per_example_nll(model, encode_batch(tokenizer, chunk, max_length)))
    return values


def _per_example_nll(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    token_nll, mask = token_nll_and_mask(model, batch)
    return token_nll.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
