"""A first-order baseline's loop: every parameter, by backprop, on refinement's per-step batches."""

from __future__ import annotations

import functools
from typing import Any

from tqdm.auto import tqdm

from zorefine.models.layers import find_decoder_layers
from zorefine.models.objectives import response_nll
from zorefine.refine.batches import batch_sampler
from zorefine.refine.budget import steps_for
from zorefine.refine.first_order import FirstOrderSettings, FirstOrderTrainer
from zorefine.refine.targets import TrainingPairs
from zorefine.run import Run


def refine_first_order(run: Run, model, tokenizer, pairs: TrainingPairs) -> dict[str, Any]:
    """A first-order baseline on every parameter, for the steps the budget allows."""
    cfg = run.cfg.refine
    steps = steps_for(cfg)
    settings = FirstOrderSettings(cfg.method, cfg.fo_lr, cfg.fo_weight_decay, cfg.sam_rho, cfg.rwp_sigma)
    params = dict(model.named_parameters())
    trainer = FirstOrderTrainer(model, params, settings, seed=cfg.seed)
    sample = batch_sampler(run, pairs)
    losses: list[float] = []
    progress = tqdm(range(steps), desc=f"refine ({cfg.method})")
    for step in progress:
        micro = sample(step).micro_batches(tokenizer, run.cfg.data.max_length, cfg.grad_accum)
        loss_fns = [functools.partial(response_nll, model, b, w) for b, w in micro]
        losses.append(trainer.step(step, loss_fns))
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
    trainer.release()
    finite = [loss for loss in losses if loss == loss]
    return {
        "layers": list(range(len(find_decoder_layers(model)))),
        "num_parameters": sum(p.numel() for p in params.values()),
        "steps": steps,
        "skipped_steps": len(losses) - len(finite),
        "first_loss": finite[0] if finite else None,
        "last_loss": finite[-1] if finite else None,
    }
