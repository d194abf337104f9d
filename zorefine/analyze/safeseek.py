"""SafeSeek-style circuit search: learn which heads and neurons refusal cannot do without.

Every unit (an attention head, an MLP neuron: :mod:`zorefine.models.neurons`) gets a mask logit
``ℓ``. The forward pass multiplies the unit's input to its output projection by the hard mask
``1[σ(ℓ) > 0.5]``, with the straight-through gradient of ``σ(ℓ)``, so what is trained is exactly
what is evaluated: a model with some units removed. Starting from every unit kept, the logits
minimise, with the weights frozen,

- the *unlikelihood* of the refusals on harmful prompts (``−log(1 − p(token))`` per refusal
  token): with the circuit removed, the model should no longer refuse;
- the NLL of benign answers: what is removed must not be what all language needs;
- ``sparsity · mean(1 − σ(ℓ))``: every unit removed costs, so the circuit stays small;
- optionally (``sufficiency`` > 0, SafeSeek's second objective) ``sufficiency ×`` the NLL of the
  refusals with *only* the circuit kept (the complementary mask, straight-through as well):
  the circuit should carry refusal on its own. Off by default: on a small model the circuit is
  a few percent of the units and the model with everything else removed has no language left
  to refuse with, so the term mostly pushes the circuit to grow.

The circuit is the units whose mask ends at zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from zorefine.analyze.attribution import Passes
from zorefine.models.neurons import UnitGroup
from zorefine.models.objectives import encode_batch, token_nll_and_mask

__all__ = ["CircuitSearch", "find_circuit", "unit_width"]

Pair = tuple[str, str]


def unit_width(group: UnitGroup) -> int:
    """Channels per searched unit: a head's width for attention (when known), one for MLP neurons."""
    return group.head_size if group.kind == "attention" and group.head_size else 1


@dataclass
class CircuitSearch:
    """The outcome: per group, which units (heads or neurons) are in the circuit, and the cost."""

    circuit: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]
    losses: list[float]
    passes: Passes

    def channels(self, groups: Sequence[UnitGroup]) -> dict[str, torch.Tensor]:
        """The circuit as channel masks per group (a head expands to its channels)."""
        return {g.key: self.circuit[g.key].repeat_interleave(unit_width(g)) for g in groups}


def _unlikelihood(model, batch) -> torch.Tensor:
    token_nll, mask = token_nll_and_mask(model, batch)
    # Unlabelled positions hold NLL 0, i.e. probability 1: the clamp keeps their log finite.
    probability = torch.exp(-token_nll).clamp(max=1 - 1e-6)
    return (-torch.log1p(-probability) * mask).sum() / mask.sum().clamp(min=1)


def _nll(model, batch) -> torch.Tensor:
    token_nll, mask = token_nll_and_mask(model, batch)
    return (token_nll * mask).sum() / mask.sum().clamp(min=1)


def find_circuit(
    model: nn.Module,
    tokenizer,
    groups: Sequence[UnitGroup],
    modules: dict[str, nn.Module],
    safety: Sequence[Pair],
    utility: Sequence[Pair],
    steps: int = 30,
    lr: float = 0.1,
    sparsity: float = 1.0,
    batch_size: int = 8,
    max_length: int = 256,
    init_logit: float = 3.0,
    sufficiency: float = 0.0,
) -> CircuitSearch:
    """Learn the mask logits (weights untouched) and return the circuit (units whose mask is zero)."""
    device = next(model.parameters()).device
    logits = {g.key: torch.full((g.size // unit_width(g),), init_logit, device=device, requires_grad=True) for g in groups}
    # Whether the forward keeps only the circuit (the complement of the mask).
    only_circuit = [False]

    def hook_for(group: UnitGroup):
        def mask_input(_module, inputs):
            soft = torch.sigmoid(logits[group.key])
            if only_circuit[0]:
                soft = 1 - soft
            hard = (soft > 0.5).to(soft.dtype)
            mask = (hard + soft - soft.detach()).repeat_interleave(unit_width(group))
            return (inputs[0] * mask.to(inputs[0].dtype),) + tuple(inputs[1:])
        return mask_input

    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [modules[g.output].register_forward_pre_hook(hook_for(g)) for g in groups]
    optimizer = torch.optim.Adam(list(logits.values()), lr=lr)
    losses, passes = [], Passes()
    try:
        for step in tqdm(range(steps), desc="analyze: circuit search", leave=False):
            pick = lambda pairs: [pairs[(step * batch_size + i) % len(pairs)] for i in range(min(batch_size, len(pairs)))]  # noqa: E731
            optimizer.zero_grad(set_to_none=True)
            kept = torch.cat([torch.sigmoid(v) for v in logits.values()])
            loss = _unlikelihood(model, encode_batch(tokenizer, pick(list(safety)), max_length)) + sparsity * (1 - kept).mean()
            if utility:
                loss = loss + _nll(model, encode_batch(tokenizer, pick(list(utility)), max_length))
                passes.forward += 1
                passes.backward += 1
            if sufficiency > 0:
                only_circuit[0] = True
                try:
                    loss = loss + sufficiency * _nll(model, encode_batch(tokenizer, pick(list(safety)), max_length))
                finally:
                    only_circuit[0] = False
                passes.forward += 1
                passes.backward += 1
            loss.backward()
            optimizer.step()
            passes.forward += 1
            passes.backward += 1
            losses.append(float(loss.detach()))
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    final = {key: value.detach().cpu() for key, value in logits.items()}
    return CircuitSearch({key: torch.sigmoid(value) <= 0.5 for key, value in final.items()}, final, losses, passes)
