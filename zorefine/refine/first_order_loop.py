"""A first-order baseline's loop: every parameter (or one unit set), by backprop, on refinement's per-step batches."""

from __future__ import annotations

import functools
from typing import Any

from tqdm.auto import tqdm

from zorefine.models.layers import find_decoder_layers
from zorefine.models.objectives import response_nll
from zorefine.models.param_masks import count_entries, load_masks
from zorefine.models.selection import Selection
from zorefine.refine.batches import batch_sampler
from zorefine.refine.budget import steps_for
from zorefine.refine.first_order import FirstOrderSettings, FirstOrderTrainer
from zorefine.refine.selection import units_path
from zorefine.refine.targets import TrainingPairs
from zorefine.run import Run


def refine_first_order(run: Run, model, tokenizer, pairs: TrainingPairs) -> dict[str, Any]:
    """A first-order baseline on every parameter, or on ``refine.units_file``'s set, for the steps the budget allows."""
    cfg = run.cfg.refine
    steps = steps_for(cfg)
    settings = FirstOrderSettings(cfg.method, cfg.fo_lr, cfg.fo_weight_decay, cfg.sam_rho, cfg.rwp_sigma,
                                  cfg.sam_rho_mode, cfg.objective_threat)
    params = dict(model.named_parameters())
    layers = list(range(len(find_decoder_layers(model))))
    trainable = None
    if cfg.units_file is not None:
        path = units_path(run)
        layers = Selection.of_entries(path, cfg.units_set, model).layers
        trainable = {name: mask for name, mask in load_masks(path)[cfg.units_set].items() if bool(mask.any())}
    trainer = FirstOrderTrainer(model, params, settings, seed=cfg.seed, trainable=trainable)
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
        "layers": layers,
        "units": [cfg.units_set] if trainable is not None else None,
        "num_parameters": count_entries(trainable) if trainable is not None else sum(p.numel() for p in params.values()),
        "steps": steps,
        "skipped_steps": len(losses) - len(finite),
        "first_loss": finite[0] if finite else None,
        "last_loss": finite[-1] if finite else None,
    }
