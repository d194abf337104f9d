"""The zeroth-order engine: SPSA / MeZO-style ZO-SGD with the seed trick.

A direction ``z`` is never stored. Each selected tensor regenerates its own direction from
a seed derived from the step seed and the tensor's name (:mod:`zorefine.perturb`), so two
tensors never share a direction and any tensor can be perturbed alone. Weights are written
in place from an fp32 master copy of the selected tensors only, which makes the restore
exact (bit for bit) instead of the drift that restoring by subtraction accumulates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from zorefine.perturb import gaussian_direction, tensor_seed

_STEP_SEED_SPACE = 2**31 - 1


def step_seed(run_seed: int, step: int) -> int:
    """The seed of one step's direction, derived from the run seed (reproducible, no state)."""
    return tensor_seed(run_seed, f"step:{step}") % _STEP_SEED_SPACE


@dataclass
class ZOStepRecord:
    """What one ZO step did: enough to replay it from the previous weights."""

    step: int
    seed: int
    projected_grad: float
    lr: float
    loss_plus: float
    loss_minus: float
    skipped: bool = False

    @property
    def loss(self) -> float:
        """The smoothed loss estimate at the current weights: mean of the ± evaluations."""
        return 0.5 * (self.loss_plus + self.loss_minus)


class ZOEngine:
    """ZO-SGD on a fixed set of parameters, evaluated by a loss closure.

    Args:
        params: the parameters the refiner may touch, by full name.
        eps: perturbation radius (absolute, in weight units).
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], eps: float) -> None:
        if not params:
            raise ValueError("ZOEngine needs at least one parameter to refine")
        self.params = dict(params)
        self.eps = float(eps)
        # fp32 master copy of the selected tensors only: the source of every write, so
        # restores are exact and low-precision models do not lose small updates.
        self.master = {name: p.detach().to(torch.float32).clone() for name, p in self.params.items()}

    @property
    def num_parameters(self) -> int:
        """How many scalar weights the engine refines."""
        return sum(p.numel() for p in self.params.values())

    @torch.no_grad()
    def _write(self, seed: int, scale: float) -> None:
        """Set every selected weight to ``master + scale * z`` in place."""
        for name, param in self.params.items():
            master = self.master[name]
            direction = gaussian_direction(master, tensor_seed(seed, name))
            param.copy_(master.add(direction, alpha=scale))

    @torch.no_grad()
    def restore(self) -> None:
        """Write the master weights back (exact)."""
        for name, param in self.params.items():
            param.copy_(self.master[name])

    @torch.no_grad()
    def apply_update(self, seed: int, projected_grad: float, lr: float) -> None:
        """``master <- master - lr * g * z``, then write the weights. Used by steps and replay."""
        for name, param in self.params.items():
            master = self.master[name]
            direction = gaussian_direction(master, tensor_seed(seed, name))
            master.add_(direction, alpha=-lr * projected_grad)
            param.copy_(master)

    @torch.no_grad()
    def step(self, step: int, seed: int, lr: float, loss_fn: Callable[[], torch.Tensor | float]) -> ZOStepRecord:
        """One SPSA step: two forward passes at ``θ ± εz``, then update along ``z``.

        A non-finite loss skips the update and leaves the weights exactly as they were.
        """
        self._write(seed, self.eps)
        loss_plus = float(loss_fn())
        self._write(seed, -self.eps)
        loss_minus = float(loss_fn())
        projected_grad = (loss_plus - loss_minus) / (2.0 * self.eps)
        if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
            self.restore()
            return ZOStepRecord(step, seed, float("nan"), lr, loss_plus, loss_minus, skipped=True)
        self.apply_update(seed, projected_grad, lr)
        return ZOStepRecord(step, seed, projected_grad, lr, loss_plus, loss_minus)
