"""A few steps of first-order fine-tuning, optionally with unit sets frozen.

What a user does after alignment (adapt the model to their benign data) and what the
fine-tuning attack threat simulates. A plain AdamW loop rather than the Trainer: tens of steps
on a chosen parameter subset, seeded batch order, no checkpoints, and gradient masks on frozen
slices (:func:`zorefine.models.param_masks.freeze_masked`). With ``weight_decay=0`` a frozen entry
never moves: its gradient is zero at every step, so Adam's moments and its update stay zero.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from zorefine.models.objectives import encode_batch, response_nll
from zorefine.models.param_masks import freeze_masked

__all__ = ["finetune_steps"]


def finetune_steps(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    params: Mapping[str, nn.Parameter],
    steps: int,
    lr: float,
    batch_size: int = 8,
    max_length: int = 256,
    frozen: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> list[float]:
    """Train ``params`` (only those) for ``steps`` AdamW steps on ``pairs``; returns the step losses.

    Batches are drawn in a seeded shuffled order, cycling through ``pairs``; ``frozen`` entry
    masks keep those entries fixed. The model is left in eval mode with ``requires_grad`` as found.
    """
    if steps < 1 or not pairs:
        raise ValueError("fine-tuning needs at least one step and one pair")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    trained = list({id(p): p for p in params.values()}.values())
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    handles = freeze_masked(params, frozen) if frozen else []
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    try:
        for step in range(steps):
            picks = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
            batch = encode_batch(tokenizer, [pairs[i] for i in picks], max_length)
            optimizer.zero_grad(set_to_none=True)
            loss = response_nll(model, batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for handle in handles:
            handle.remove()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    return losses
