"""Divergence: a ZO run whose loss runs away or whose weights explode is stopped and rolled back.

A learning rate far too large does not crash: it drives the refined weights to huge values and
the model to uniform output (loss ln(vocab)), and the run would report done. The guard watches
each step and names the last step whose weights were still good; :func:`roll_back` rebuilds
exactly those weights from the start checkpoint and the logged steps (replay is bit-exact).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from zorefine.zo.engine import ZOEngine, ZOSettings, ZOStepRecord
from zorefine.zo.replay import apply_records

# Steps a loss must stay above its limit (or stay non-finite) before the run counts as diverged:
# one noisy ZO estimate is not a divergence.
WINDOW = 5
# Below this rise (nats) a loss is never called diverged, however small its start.
MIN_LOSS_RISE = 1.0


@dataclass
class Divergence:
    """Why a run was stopped, and how many of its steps produced the weights that are kept."""

    step: int
    reason: str
    kept_steps: int


def _rms(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float32)) / math.sqrt(max(tensor.numel(), 1))


@dataclass
class DivergenceGuard:
    """Watches the steps of one ZO run (``loss_factor`` × the first loss; ``weight_factor`` × each
    tensor's starting RMS). ``params`` empty: the weights are not checked (ZeRO-3 partitions)."""

    params: Mapping[str, torch.Tensor]
    loss_factor: float = 2.0
    weight_factor: float = 10.0
    start_loss: float | None = None
    _recent: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    _non_finite: int = 0

    def __post_init__(self) -> None:
        self._start_rms = {name: _rms(p) for name, p in self.params.items()}
        # Zero-initialised tensors (biases, GPT-2's norms) have no scale of their own: they are
        # measured against the selection's overall RMS instead.
        sizes = {name: p.numel() for name, p in self.params.items()}
        total = sum(sizes.values())
        self._floor = math.sqrt(sum(self._start_rms[n] ** 2 * sizes[n] for n in sizes) / total) if total else 0.0

    def prime(self, records: Sequence[ZOStepRecord]) -> None:
        """Take the start loss and the recent window from steps replayed on resume."""
        for record in records:
            self._watch_loss(record)

    def _watch_loss(self, record: ZOStepRecord) -> str | None:
        if record.skipped or not math.isfinite(record.loss):
            self._non_finite += 1
            return f"{WINDOW} steps in a row had a non-finite loss" if self._non_finite >= WINDOW else None
        self._non_finite = 0
        if self.start_loss is None:
            self.start_loss = record.loss
        self._recent.append(record.loss)
        limit = max(self.loss_factor * self.start_loss, self.start_loss + MIN_LOSS_RISE)
        if len(self._recent) == WINDOW and min(self._recent) > limit:
            return f"the loss stayed above {limit:.3f} for {WINDOW} steps (it started at {self.start_loss:.3f})"
        return None

    def _watch_weights(self) -> str | None:
        for name, param in self.params.items():
            rms, start = _rms(param), self._start_rms[name]
            if not math.isfinite(rms) or rms > self.weight_factor * max(start, self._floor, 1e-12):
                return f"the RMS of {name} grew from {start:.3g} to {rms:.3g}"
        return None

    def observe(self, record: ZOStepRecord) -> Divergence | None:
        """After ``record``'s step: a :class:`Divergence` when the run has diverged, else None.

        The loss of step t is measured at the weights before its update; the weights after it
        are checked here. Kept: the weights before the first step of the bad stretch.
        """
        reason = self._watch_loss(record)
        if reason is not None:
            return Divergence(record.step, reason, max(record.step + 1 - WINDOW, 0))
        reason = self._watch_weights()
        if reason is not None:
            return Divergence(record.step, reason, record.step)
        return None


def roll_back(
    params: Mapping[str, torch.nn.Parameter],
    start_values: Mapping[str, torch.Tensor],
    settings: ZOSettings,
    records: Sequence[ZOStepRecord],
    unit_parameters: Mapping[str, Sequence[str]] | None,
    entries: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Set ``params`` to the start weights moved by ``records`` (the steps that are kept)."""
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(start_values[name])
    apply_records(ZOEngine(params, settings=settings, entries=entries), records, unit_parameters)
