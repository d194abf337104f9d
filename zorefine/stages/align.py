"""align: first-order safety SFT (harmful -> refusal, benign -> helpful), response-only loss."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from zorefine.pipeline import ALIGNED_DIR, Run
from zorefine.models.loading import save_checkpoint
from zorefine.sft import SFTSettings, run_sft

log = logging.getLogger(__name__)


def run(run: Run) -> dict[str, Any]:
    """Align the start checkpoint (or pass it through when ``align.enabled=false``)."""
    cfg = run.cfg.align
    if not cfg.enabled:
        log.info("[align] disabled: starting from %s as it is", run.start_checkpoint)
        return {"enabled": False, "checkpoint": str(run.start_checkpoint)}
    started = time.perf_counter()
    model, tokenizer = run.load_model(run.start_checkpoint)
    harmful = run.split("train", "harmful")
    benign = run.split("train", "benign")
    pairs = [(e.prompt, e.response) for e in harmful + benign]
    random.Random(cfg.seed).shuffle(pairs)
    log.info("[align] SFT on %d harmful + %d benign training examples", len(harmful), len(benign))
    settings = SFTSettings(
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        max_length=run.cfg.data.max_length,
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        deepspeed=cfg.deepspeed,
    )
    metrics = run_sft(model, tokenizer, pairs, settings)
    out_dir = run.run_dir / ALIGNED_DIR
    info = {"stage": "align", "base": str(run.start_checkpoint), "train_metrics": metrics}
    save_checkpoint(model, tokenizer, out_dir, info)
    return {
        "enabled": True,
        "checkpoint": str(out_dir),
        "base": str(run.start_checkpoint),
        "num_examples": len(pairs),
        "train_loss": metrics.get("train_loss"),
        "seconds": round(time.perf_counter() - started, 1),
    }
