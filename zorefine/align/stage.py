"""align: first-order safety SFT (harmful -> refusal, benign -> helpful), response-only loss."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from zorefine.data.contrast import contrast_path, load_contrast_prompts
from zorefine.models.generation import generate_with_ends
from zorefine.models.fingerprint import checkpoint_fingerprint, content_key, file_digest
from zorefine.distributed.partitions import gathered
from zorefine.run import ALIGNED_DIR, Run
from zorefine.models.param_masks import count_entries, load_masks
from zorefine.models.sft import SFTSettings, run_sft
from zorefine.errors import ConfigError
from zorefine.files import in_turn

log = logging.getLogger(__name__)


def run(run: Run) -> dict[str, Any]:
    """Align the start checkpoint (or pass it through when ``align.enabled=false``)."""
    cfg = run.cfg.align
    if not cfg.enabled:
        log.info("[align] disabled: starting from %s as it is", run.start_checkpoint)
        return {"enabled": False, "checkpoint": str(run.start_checkpoint)}
    started = time.perf_counter()
    cached = Path(cfg.cache_dir) / cache_key(run) if cfg.cache_dir else None
    if cached is None:
        return _align_or_reuse(run, None, started)
    # Jobs of a sweep side by side align the same way: one trains, the others wait and reuse it.
    return in_turn(cached, (cached / _COMPLETE).is_file, lambda: _align_or_reuse(run, cached, started),
                   alone=not run.processes.distributed)


def _align_or_reuse(run: Run, cached: Path | None, started: float) -> dict[str, Any]:
    cfg = run.cfg.align
    out_dir = run.run_dir / ALIGNED_DIR
    if cached is not None and (cached / _COMPLETE).is_file():
        if run.processes.is_main:
            _link_tree(cached, out_dir)
        run.processes.barrier()
        log.info("[align] reused the aligned checkpoint cached at %s", cached)
        summary = json.loads((cached / _COMPLETE).read_text())
        return {**summary, "checkpoint": str(out_dir), "cached_from": str(cached), "seconds": round(time.perf_counter() - started, 1)}
    model, tokenizer = run.load_model(run.start_checkpoint)
    harmful = run.split("train", "harmful")
    benign = run.split("train", "benign")
    pairs: list[tuple] = [(e.prompt, e.response) for e in harmful + benign]
    contrast = contrast_pairs(model, tokenizer, cfg.contrast_tokens, contrast_file(run)) if cfg.contrast else []
    pairs += contrast * cfg.contrast_repeats
    random.Random(cfg.seed).shuffle(pairs)
    log.info("[align] SFT on %d harmful + %d benign + %d contrast training examples", len(harmful), len(benign), len(contrast))
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
    trainable = unit_set(cfg.units_file, cfg.units_set) if cfg.units_file else None
    if trainable is not None:
        log.info("[align] training only the %s units of %s: %d entries", cfg.units_set, cfg.units_file, count_entries(trainable))
    metrics = run_sft(model, tokenizer, pairs, settings, trainable=trainable)
    info = {"stage": "align", "base": str(run.start_checkpoint), "train_metrics": metrics}
    # Under ZeRO-3 the trained weights are partitioned: gather them to save one whole checkpoint.
    with gathered(model):
        run.save_checkpoint(model, tokenizer, out_dir, info)
    summary = {
        "enabled": True,
        "checkpoint": str(out_dir),
        "base": str(run.start_checkpoint),
        "num_examples": len(pairs),
        "num_contrast": len(contrast),
        "contrast_repeats": cfg.contrast_repeats,
        "train_loss": metrics.get("train_loss"),
    }
    if cached is not None and run.processes.is_main:
        _publish(out_dir, cached, summary)
    return {**summary, "seconds": round(time.perf_counter() - started, 1)}


def unit_set(path: str, label: str) -> dict[str, torch.Tensor]:
    """The entry masks of one set of a ``units.safetensors`` file."""
    sets = load_masks(Path(path))
    if label not in sets:
        raise ConfigError(f"align.units_set={label!r} is not in {path}; it holds {sorted(sets)}")
    return sets[label]


def contrast_file(run: Run) -> Path:
    """The contrast prompts' file: ``align.contrast_file`` (a path or a shipped set's name), else the shipped one."""
    return contrast_path(run.cfg.align.contrast_file)


def contrast_pairs(model, tokenizer, max_new_tokens: int, path: Path | None = None) -> list[tuple[str, str, bool]]:
    """The contrast prompts (default: the shipped ones) with the start model's own greedy answers (cut ones marked)."""
    prompts = load_contrast_prompts(path)
    log.info("[align] answering %d contrast prompts with the start model", len(prompts))
    answers, ended = generate_with_ends(model, tokenizer, prompts, max_new_tokens)
    return [(p, a, e) for p, a, e in zip(prompts, answers, ended) if a]


# Written last into a cache entry: an entry without it is incomplete and ignored.
_COMPLETE = "align-summary.json"


def cache_key(run: Run) -> str:
    """A hash of everything the aligned weights depend on."""
    start = Path(run.start_checkpoint)
    align = {k: v for k, v in OmegaConf.to_container(run.cfg.align, resolve=True).items() if k != "cache_dir"}
    for key, neutral in (("contrast_repeats", 1), ("units_set", "ru")):
        # Added after checkpoints were cached: at their neutral values they must not orphan them.
        if align.get(key) == neutral:
            del align[key]
    # The unit and contrast files' contents (their digests, below) decide the weights, not where they lie.
    align.pop("units_file", None)
    align.pop("contrast_file", None)
    identity = {
        "start": str(start.resolve()),
        # Name, size and mtime only: the start model is never hard-linked, and its inode may
        # change when a cache directory is copied between machines.
        "start_files": [entry[:3] for entry in checkpoint_fingerprint(start)],
        "align": align,
        "data": file_digest(run.safety_file),
        "contrast": file_digest(contrast_file(run)) if run.cfg.align.contrast else None,
        "max_length": run.cfg.data.max_length,
        "dtype": run.cfg.model.dtype,
        "torch": torch.__version__,
    }
    if run.cfg.align.units_file:
        identity["units"] = file_digest(run.cfg.align.units_file)
    return content_key(identity)


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link (or, across file systems, copy) a checkpoint directory."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, copy_function=link_or_copy)


def _publish(out_dir: Path, cached: Path, summary: dict[str, Any]) -> None:
    """Put a finished checkpoint into the cache atomically (concurrent jobs: first one wins)."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cached.parent))
    _link_tree(out_dir, staging / "entry")
    (staging / "entry" / _COMPLETE).write_text(json.dumps(summary))
    try:
        os.rename(staging / "entry", cached)
    except OSError:
        pass  # another job published the same entry first
    shutil.rmtree(staging, ignore_errors=True)
