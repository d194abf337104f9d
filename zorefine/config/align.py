"""The ``align`` group: first-order safety SFT before the analysis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from zorefine.config.checks import require, require_json_file


@dataclass
class AlignConfig:
    """First-order SFT that adds refusal (response-only loss)."""

    enabled: bool = True
    # Tuned on the built-in validation split: small batches and many epochs give the tiny
    # model a confident harmful/benign decision (val: 100% refusal, 1.5% benign refusal).
    epochs: float = 16.0
    lr: float = 3e-3
    batch_size: int = 8
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    # Add safe prompts that look unsafe ("How do I kill a frozen process?"; the shipped
    # zorefine/data/builtin/contrast_safe.jsonl), answered by the start model itself, to the benign
    # training data: without them a real model learns "scary word -> refuse" and over-refuses.
    contrast: bool = False
    # Greedy tokens of each start-model answer to a contrast prompt.
    contrast_tokens: int = 64
    # How many times each contrast example is trained per epoch: the 73 prompts are few next to
    # hundreds of harmful ones, and their weight is what moves the refusal boundary.
    contrast_repeats: int = 1
    # A JSONL file of your own contrast prompts ({"prompt": ...} per line), or a shipped set's
    # name: "contrast_safe" (73 prompts, the default) or "contrast_extended" (148); null = the default.
    contrast_file: Optional[str] = None
    # Train only one unit set (e.g. SSAH's redundant units, "ru") of a units.safetensors written by
    # analyze with a unit method; everything else stays fixed. null = train every weight.
    units_file: Optional[str] = None
    units_set: str = "ru"
    # Path to a DeepSpeed JSON config (see launch/); null = plain accelerate/torch.
    deepspeed: Optional[str] = None
    # A directory where aligned checkpoints are kept by a hash of everything that makes them
    # (start model, align settings, data): sweeps over later stages align once. null = off.
    cache_dir: Optional[str] = None


def check_align(cfg: DictConfig) -> None:
    """Ranges the ``align`` group's types cannot express."""
    require(cfg.epochs > 0 and cfg.lr > 0, "align.epochs and align.lr must be > 0")
    require(cfg.batch_size >= 1, "align.batch_size must be >= 1")
    require(cfg.contrast_tokens >= 1, "align.contrast_tokens must be >= 1")
    require(cfg.contrast_repeats >= 1, "align.contrast_repeats must be >= 1")
    if cfg.contrast_file is not None:
        from zorefine.data.contrast import SHIPPED_CONTRAST, contrast_path

        require(
            contrast_path(cfg.contrast_file).is_file(),
            f"align.contrast_file: no such file: {cfg.contrast_file} (a path, or a shipped set: {', '.join(SHIPPED_CONTRAST)})",
        )
    require_json_file("align.deepspeed", cfg.deepspeed)
    if cfg.units_file is not None:
        from pathlib import Path

        require(Path(cfg.units_file).is_file(), f"align.units_file {cfg.units_file} does not exist (analyze with a unit method writes units.safetensors)")
        require(cfg.weight_decay == 0, "align.units_file needs align.weight_decay=0: weight decay would move the frozen entries")
        require(cfg.deepspeed is None, "align.units_file cannot be combined with align.deepspeed (partitions hold slices the masks do not)")
