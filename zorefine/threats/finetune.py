"""The fine-tuning attack (``finetune:STEPS[:LR][:bN][:seed=N]`` specs): a few steps of benign SFT, then measure.

Benign fine-tuning erodes alignment (Qi et al., 2023): a user adapting an aligned model to
ordinary instructions loses much of its refusal within tens of steps. As a threat, the decoder
layers are trained for ``steps`` AdamW steps on the run's benign training pairs (their
reference answers), measured, and restored bit for bit by :func:`zorefine.threats.threatened`
like any other weight threat. The data is bound by the stage that runs the threat
(:meth:`FineTuneAttack.with_data`): a spec names only the schedule.

Without ``seed=`` the batches come in one fixed shuffled order, the same wherever the attack
runs. With ``seed=N`` the order is a draw: the evaluate grid maps N to draw N of its split's
noise stream, so a study's validation and test attacks never train on the same batch order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from zorefine.errors import ConfigError
from zorefine.models.finetune import finetune_steps
from zorefine.threats.base import _float_label

__all__ = ["FineTuneAttack"]


@dataclass(frozen=True)
class FineTuneAttack:
    """``steps`` AdamW steps at ``lr`` on benign (prompt, answer) pairs, training the threatened parameters."""

    steps: int
    lr: float = 1e-4
    batch_size: int = 8
    # None: the fixed order (finetune_steps' seed 0), not re-drawn per stream; see the module docstring.
    seed: int | None = None
    # The bound data is not part of the threat's identity: a spec parses to an equal threat.
    pairs: Sequence[tuple[str, str]] = field(default=(), repr=False, compare=False)
    tokenizer: Any = field(default=None, repr=False, compare=False)
    max_length: int = field(default=256, compare=False)
    # Entry masks kept fixed while the rest trains (a defence: freeze the safety units).
    frozen: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"finetune steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0 or self.batch_size < 1:
            raise ConfigError("finetune lr must be > 0 and batch size >= 1")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"finetune seed must be a non-negative integer, got {self.seed!r}")

    @property
    def name(self) -> str:
        """``finetune_<steps>steps_lr<lr>``."""
        drawn = "" if self.seed is None else f"_seed{self.seed}"
        return f"finetune_{self.steps}steps_lr{_float_label(self.lr)}{drawn}"

    @property
    def spec(self) -> str:
        """Canonical spec string: ``parse_threat(t.spec) == t``."""
        drawn = "" if self.seed is None else f":seed={self.seed}"
        return f"finetune:{self.steps}:{_float_label(self.lr)}:b{self.batch_size}{drawn}"

    def with_data(self, tokenizer, pairs: Sequence[tuple[str, str]], max_length: int) -> "FineTuneAttack":
        """The same attack, training on ``pairs``."""
        return replace(self, tokenizer=tokenizer, pairs=list(pairs), max_length=max_length)

    def apply(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        """Fine-tune ``params`` in place (the caller restores them)."""
        if self.tokenizer is None or not self.pairs:
            raise ConfigError(f"the {self.name} threat has no training data: the stage running it must bind it with with_data()")
        frozen = {name: mask for name, mask in (self.frozen or {}).items() if name in params}
        # The caller holds no_grad for the other threats; training needs gradients.
        with torch.enable_grad():
            finetune_steps(model, self.tokenizer, self.pairs, params, self.steps, self.lr, self.batch_size, self.max_length, frozen,
                           seed=self.seed or 0)
