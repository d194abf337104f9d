"""Attribution scores of units and weight entries on a data set: SSAH, Wanda and SNIP.

Each score is computed once on safety data (harmful prompts with their refusals) and once on
utility data (benign prompts with their answers); :mod:`zorefine.analyze.unit_classes` turns the
two into classes.

- **SSAH** (Li et al., arXiv 2410.10862): unit ``j`` of a group (an MLP neuron, an attention
  channel) scores ``Var(x_j) · ‖W[:, j]‖²``, with ``x`` the input of the group's output
  projection over the data's tokens and ``W[:, j]`` the column that writes unit ``j`` back to the
  residual stream.
- **Wanda** (Wei et al., arXiv 2402.05162): entry ``(i, j)`` of every decoder linear map scores
  ``|W_ij| · ‖X_j‖₂``, with ``X_j`` input channel ``j`` over all tokens.
- **SNIP** (same paper): ``|W_ij · ∂L/∂W_ij|`` of the response loss, summed over batches.

Activations are read over every non-padding token (prompt and response: both carry what the
model does with the request); SNIP's loss is the response NLL, the objective alignment trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from zorefine.models.neurons import UnitGroup, weight_axes
from zorefine.models.objectives import encode_batch, response_nll

__all__ = ["ChannelStatistics", "Passes", "channel_statistics", "snip_scores", "ssah_scores", "wanda_scores"]

Pair = tuple[str, str]


@dataclass
class Passes:
    """What an attribution cost: forward and backward passes over batches."""

    forward: int = 0
    backward: int = 0

    def add(self, other: "Passes") -> None:
        """Accumulate ``other``."""
        self.forward += other.forward
        self.backward += other.backward


@dataclass
class ChannelStatistics:
    """Per input channel of one linear map: token count, sum and sum of squares (float64)."""

    count: int
    total: torch.Tensor
    squares: torch.Tensor

    @property
    def variance(self) -> torch.Tensor:
        """Population variance of each channel over the tokens."""
        mean = self.total / max(self.count, 1)
        return (self.squares / max(self.count, 1) - mean**2).clamp(min=0)

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each channel over the tokens."""
        return self.squares.sqrt()


def _batches(tokenizer, pairs: Sequence[Pair], max_length: int, batch_size: int):
    for start in range(0, len(pairs), batch_size):
        yield encode_batch(tokenizer, pairs[start : start + batch_size], max_length)


@torch.no_grad()
def channel_statistics(
    model: nn.Module, tokenizer, pairs: Sequence[Pair], modules: Mapping[str, nn.Module], max_length: int, batch_size: int
) -> tuple[dict[str, ChannelStatistics], Passes]:
    """Input-channel statistics of every module in ``modules`` over the non-padding tokens of ``pairs``."""
    stats: dict[str, ChannelStatistics] = {}
    token_mask: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def record(_module, inputs):
            x = inputs[0]
            rows = x[token_mask["current"].to(x.device)].double()
            entry = stats.get(name)
            if entry is None:
                entry = stats[name] = ChannelStatistics(0, torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device),
                                                        torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device))
            entry.count += rows.shape[0]
            entry.total += rows.sum(0)
            entry.squares += (rows**2).sum(0)
        return record

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
    passes = Passes()
    try:
        for batch in tqdm(list(_batches(tokenizer, pairs, max_length, batch_size)), desc="attribution: activations", leave=False):
            token_mask["current"] = batch["attention_mask"].bool()
            device = next(model.parameters()).device
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            passes.forward += 1
    finally:
        for handle in handles:
            handle.remove()
    return stats, passes


def ssah_scores(groups: Sequence[UnitGroup], stats: Mapping[str, ChannelStatistics], modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """SSAH importance of every unit, per group: ``Var(x_j) · ‖W[:, j]‖²`` (float32 [size])."""
    scores = {}
    for group in groups:
        module = modules[group.output]
        out_axis, _ = weight_axes(module)
        column_norms = module.weight.detach().double().pow(2).sum(dim=out_axis)
        scores[group.key] = (stats[group.output].variance * column_norms).float().cpu()
    return scores


def wanda_scores(module: nn.Module, stats: ChannelStatistics) -> torch.Tensor:
    """Wanda score of every weight entry of one linear map (the weight's shape)."""
    _, in_axis = weight_axes(module)
    shape = [1, 1]
    shape[in_axis] = -1
    return (module.weight.detach().abs().double() * stats.norm.reshape(shape)).float().cpu()


def snip_scores(
    model: nn.Module, tokenizer, pairs: Sequence[Pair], modules: Mapping[str, nn.Module], max_length: int, batch_size: int
) -> tuple[dict[str, torch.Tensor], Passes]:
    """``Σ_batches |W ⊙ ∇W L|`` of the response NLL for the weight of every module in ``modules``."""
    weights = {name: module.weight for name, module in modules.items()}
    scores = {name: torch.zeros_like(weight, dtype=torch.float32) for name, weight in weights.items()}
    previous = {name: weight.requires_grad for name, weight in weights.items()}
    others = [p for p in model.parameters() if all(p is not w for w in weights.values())]
    other_flags = [p.requires_grad for p in others]
    passes = Passes()
    try:
        # Gradients only where scores are needed: the embedding and head cost nothing extra.
        for p in others:
            p.requires_grad_(False)
        for weight in weights.values():
            weight.requires_grad_(True)
        for batch in tqdm(list(_batches(tokenizer, pairs, max_length, batch_size)), desc="attribution: snip", leave=False):
            model.zero_grad(set_to_none=True)
            response_nll(model, batch).backward()
            passes.forward += 1
            passes.backward += 1
            with torch.no_grad():
                for name, weight in weights.items():
                    scores[name] += (weight.detach() * weight.grad).abs().float()
    finally:
        model.zero_grad(set_to_none=True)
        for name, weight in weights.items():
            weight.requires_grad_(previous[name])
        for p, flag in zip(others, other_flags):
            p.requires_grad_(flag)
    return {name: score.cpu() for name, score in scores.items()}, passes
