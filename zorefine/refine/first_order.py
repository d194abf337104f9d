"""First-order baselines the ZO refiner is compared against, at an equal forward-pass budget.

Three ways to keep training the aligned model with backprop, each one step rule on the same
per-step batches the ZO refiner sees:

- ``sft``: continued supervised fine-tuning (AdamW on the response loss);
- ``sam``: sharpness-aware minimisation (Foret et al. 2021): the gradient is taken at
  ``θ + ρ·g/‖g‖``, the worst case in a ρ-ball, then applied at θ;
- ``rwp``: random weight perturbation (noise-injection) training: the gradient is taken under
  a fresh relative Gaussian weight-noise sample each step (the same
  :class:`~zorefine.threats.WeightNoise` threat the evaluation uses), then applied at θ.

Cost, in forward-pass equivalents per micro-batch (a backward counts as two forwards):
``sft`` and ``rwp`` 3, ``sam`` 6. A ZO step costs 2 per direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from zorefine.threats import WeightNoise, threatened
from zorefine.threats.streams import stream_seed

FIRST_ORDER_METHODS = ("sft", "sam", "rwp")
FORWARD_COST = {"sft": 3, "sam": 6, "rwp": 3}

# One step's loss: called with gradients enabled, returns a scalar tensor to backpropagate.
LossFn = Callable[[], torch.Tensor]


@dataclass
class FirstOrderSettings:
    """Hyper-parameters of a first-order baseline."""

    method: str = "sft"
    lr: float = 1e-4
    weight_decay: float = 0.0
    sam_rho: float = 0.05  # SAM ball radius (absolute, in parameter space)
    rwp_sigma: float = 0.05  # RWP noise, relative to each tensor's RMS

    def __post_init__(self) -> None:
        if self.method not in FIRST_ORDER_METHODS:
            raise ValueError(f"first-order method must be one of {FIRST_ORDER_METHODS}, got {self.method!r}")


class FirstOrderTrainer:
    """Backprop steps on ``params`` with one of the baseline step rules.

    Args:
        model: the model; only ``params`` are trained (the rest are frozen for the run).
        params: the trainable parameters by name.
        settings: the step rule and its hyper-parameters.
        seed: seeds the RWP noise samples (one per step).
    """

    def __init__(self, model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter], settings: FirstOrderSettings, seed: int = 0) -> None:
        self.model, self.params, self.settings, self.seed = model, dict(params), settings, seed
        for param in model.parameters():
            param.requires_grad_(False)
        for param in self.params.values():
            param.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=settings.lr, weight_decay=settings.weight_decay)

    def _backward(self, loss_fns: Sequence[LossFn]) -> float:
        """Accumulate the mean gradient of the micro-batch losses; returns the mean loss."""
        total = 0.0
        for loss_fn in loss_fns:
            loss = loss_fn() / len(loss_fns)
            loss.backward()
            total += float(loss.detach())
        return total

    def step(self, step: int, loss_fns: Sequence[LossFn]) -> float:
        """One step on a batch (given as micro-batch losses); returns the loss at θ, or NaN if skipped."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            method = self.settings.method
            if method == "sft":
                loss = self._backward(loss_fns)
            elif method == "rwp":
                # The training noise stream: never a draw that analysis or evaluation uses.
                noise = WeightNoise(self.settings.rwp_sigma, "relative", seed=stream_seed("train", self.seed * 1_000_003 + step))
                with threatened(self.model, noise, self.params):
                    loss = self._backward(loss_fns)
            else:
                loss = self._sam_gradient(loss_fns)
            grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params.values())
            if not (math.isfinite(loss) and grads_finite):
                # Same rule as the ZO loop: a non-finite step changes nothing.
                return float("nan")
            self.optimizer.step()
            return loss
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()

    def _sam_gradient(self, loss_fns: Sequence[LossFn]) -> float:
        """Leave in ``.grad`` the gradient at the worst point of the ρ-ball; returns L(θ)."""
        loss = self._backward(loss_fns)
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norm = torch.norm(torch.stack([g.float().norm() for g in grads])) if grads else torch.tensor(0.0)
        scale = self.settings.sam_rho / (float(norm) + 1e-12)
        moves: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        with torch.no_grad():
            for param in self.params.values():
                if param.grad is not None:
                    move = param.grad * scale
                    param.add_(move)
                    moves.append((param, move))
        self.optimizer.zero_grad(set_to_none=True)
        try:
            self._backward(loss_fns)
        finally:
            with torch.no_grad():
                # Back to θ by copy of the exact original would need a second copy of the
                # weights; subtraction is off by at most rounding, as in every SAM implementation.
                for param, move in moves:
                    param.sub_(move)
        return loss

    def release(self) -> None:
        """Drop optimizer state and gradients, and freeze the model again for evaluation."""
        self.optimizer.state.clear()
        for param in self.params.values():
            param.grad = None
            param.requires_grad_(False)
