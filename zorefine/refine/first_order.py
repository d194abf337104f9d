"""First-order baselines the ZO refiner is compared against, at an equal forward-pass budget.

Three ways to keep training the aligned model with backprop, each one step rule on the same
per-step batches the ZO refiner sees:

- ``sft``: continued supervised fine-tuning (AdamW on the response loss);
- ``sam``: sharpness-aware minimisation (Foret et al. 2021): the gradient is taken at
  ``θ + ρ·g/‖g‖``, the worst case in a ρ-ball, then applied at θ;
- ``rwp``: random weight perturbation (noise-injection) training: the gradient is taken under
  a fresh relative Gaussian weight-noise sample each step (the same
  :class:`~zorefine.threats.WeightNoise` threat the evaluation uses), then applied at θ;
- ``fo_threat``: the threat-aware first-order patch (Q-resafe-like): the gradient of the loss of
  the model under a threat spec (``rtn:int4``, ``w4a4:g32``, ``wnoise:0.05``, ...; a fresh
  sample each step for random threats), taken at the threatened weights and applied at θ. For a
  quantizer that is the straight-through estimator: ∂L(Q(θ))/∂Q(θ) stands in for ∂L(Q(θ))/∂θ.

SAM's ρ is absolute (a ball of radius ρ in parameter space) or, with ``sam_rho_mode="relative"``,
relative to the weights (adaptive SAM, Kwon et al. 2021: the ball is scaled entry-wise by |θ|,
so a layer's move is proportional to its own scale, as the threats' relative noise is).

Any method can be restricted to a set of entries (``trainable`` masks, e.g. safety-critical
units): the other entries get a zero gradient and do not move.

Cost, in forward-pass equivalents per micro-batch (a backward counts as two forwards):
``sft``, ``rwp`` and ``fo_threat`` 3, ``sam`` 6. A ZO step costs 2 per direction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from zorefine.errors import ConfigError
from zorefine.models.param_masks import freeze_masked
from zorefine.threats import Threat, WeightNoise, parse_threat, threatened
from zorefine.threats.base import is_random
from zorefine.threats.streams import stream_seed

FIRST_ORDER_METHODS = ("sft", "sam", "rwp", "fo_threat")
FORWARD_COST = {"sft": 3, "sam": 6, "rwp": 3, "fo_threat": 3}
SAM_RHO_MODES = ("absolute", "relative")

# One step's loss: called with gradients enabled, returns a scalar tensor to backpropagate.
LossFn = Callable[[], torch.Tensor]


@dataclass
class FirstOrderSettings:
    """Hyper-parameters of a first-order baseline."""

    method: str = "sft"
    lr: float = 1e-4
    weight_decay: float = 0.0
    sam_rho: float = 0.05  # SAM ball radius (in parameter space, or relative to |θ| entry-wise)
    rwp_sigma: float = 0.05  # RWP noise, relative to each tensor's RMS
    sam_rho_mode: str = "absolute"
    threat: Optional[str] = None  # fo_threat's threat spec

    def __post_init__(self) -> None:
        if self.method not in FIRST_ORDER_METHODS:
            raise ValueError(f"first-order method must be one of {FIRST_ORDER_METHODS}, got {self.method!r}")
        if self.sam_rho_mode not in SAM_RHO_MODES:
            raise ValueError(f"sam_rho_mode must be one of {SAM_RHO_MODES}, got {self.sam_rho_mode!r}")
        if self.method == "fo_threat" and not self.threat:
            raise ValueError("fo_threat needs a threat spec (refine.objective_threat)")


HALF_DTYPES = (torch.bfloat16, torch.float16)


class FirstOrderTrainer:
    """Backprop steps on ``params`` with one of the baseline step rules.

    Args:
        model: the model; only ``params`` are trained (the rest are frozen for the run).
        params: the trainable parameters by name.
        settings: the step rule and its hyper-parameters.
        seed: seeds the RWP and threat samples (one per step, from the training noise stream).
        trainable: boolean masks per parameter name: only those entries move (the names must be
            in ``params``; parameters without a mask are not trained). ``None``: all of ``params``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: Mapping[str, torch.nn.Parameter],
        settings: FirstOrderSettings,
        seed: int = 0,
        trainable: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.model, self.settings, self.seed = model, settings, seed
        self.params = dict(params) if trainable is None else {name: params[name] for name in trainable if name in params}
        if trainable is not None and settings.weight_decay:
            # Decoupled weight decay shrinks every entry the optimizer holds, gradient or not.
            raise ConfigError("training a unit set needs weight decay 0 (refine.fo_weight_decay): it would move the frozen entries")
        for param in model.parameters():
            param.requires_grad_(False)
        for param in self.params.values():
            param.requires_grad_(True)
        self._hooks = [] if trainable is None else freeze_masked(self.params, {n: ~m.bool() for n, m in trainable.items() if n in self.params})
        # Half-precision weights are stepped through an fp32 master copy: AdamW's small updates
        # would mostly round away if applied to bf16 weights directly, step after step.
        self.masters = {name: p.detach().float().clone() for name, p in self.params.items() if p.dtype in HALF_DTYPES}
        stepped = [self.masters.get(name, param) for name, param in self.params.items()]
        self.optimizer = torch.optim.AdamW(stepped, lr=settings.lr, weight_decay=settings.weight_decay)
        self._threat = parse_threat(settings.threat) if settings.method == "fo_threat" else None

    def _step_threat(self, step: int) -> Threat:
        """This step's threat: random threats get a fresh draw of the training stream."""
        threat = self._threat
        if is_random(threat):
            threat = dataclasses.replace(threat, seed=stream_seed("train", self.seed * 1_000_003 + step))
        return threat

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
        self._zero_grad()
        try:
            method = self.settings.method
            if method == "sft":
                loss = self._backward(loss_fns)
            elif method == "rwp":
                # The training noise stream: never a draw that analysis or evaluation uses.
                noise = WeightNoise(self.settings.rwp_sigma, "relative", seed=stream_seed("train", self.seed * 1_000_003 + step))
                with threatened(self.model, noise, self.params):
                    loss = self._backward(loss_fns)
            elif method == "fo_threat":
                # Decoder weights, as the evaluation threatens them; restored exactly before the
                # optimizer step, so the threatened point's gradient moves the clean weights.
                with threatened(self.model, self._step_threat(step)):
                    loss = self._backward(loss_fns)
            else:
                loss = self._sam_gradient(loss_fns)
            grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params.values())
            if not (math.isfinite(loss) and grads_finite):
                # Same rule as the ZO loop: a non-finite step changes nothing.
                return float("nan")
            self._optimizer_step()
            return loss
        finally:
            self._zero_grad()
            self.model.eval()

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for param in self.params.values():
            param.grad = None

    @torch.no_grad()
    def _optimizer_step(self) -> None:
        """AdamW on the fp32 weights (the masters of half-precision ones, written back rounded)."""
        for name, master in self.masters.items():
            grad = self.params[name].grad
            master.grad = None if grad is None else grad.float()
        self.optimizer.step()
        for name, master in self.masters.items():
            self.params[name].copy_(master)

    def _sam_gradient(self, loss_fns: Sequence[LossFn]) -> float:
        """Leave in ``.grad`` the gradient at the worst point of the ρ-ball; returns L(θ)."""
        loss = self._backward(loss_fns)
        relative = self.settings.sam_rho_mode == "relative"
        with torch.no_grad():
            # Adaptive SAM: ε = ρ·T²g/‖Tg‖ with T = |θ|; plain SAM: ε = ρ·g/‖g‖.
            scaled = {name: p.grad * p.abs() if relative else p.grad for name, p in self.params.items() if p.grad is not None}
            norm = torch.norm(torch.stack([g.float().norm() for g in scaled.values()])) if scaled else torch.tensor(0.0)
            scale = self.settings.sam_rho / (float(norm) + 1e-12)
            moves: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
            for name, direction in scaled.items():
                param = self.params[name]
                move = direction * param.abs() * scale if relative else direction * scale
                param.add_(move)
                moves.append((param, move))
        self._zero_grad()
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
        self.masters.clear()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for param in self.params.values():
            param.grad = None
            param.requires_grad_(False)
