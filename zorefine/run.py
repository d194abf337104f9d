"""The run: its directory, the files and checkpoints its stages pass on, and which stages are done.

Every stage reads a checkpoint and writes one (or a small JSON of what it found) into the
run directory, and marks itself done with ``<stage>.json``. Re-running in the same
directory (``hydra.run.dir=DIR``) skips finished stages, so a killed run resumes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from zorefine import distributed
from zorefine.config.schema import Stage
from zorefine.config.validate import analyze_needed
from zorefine.data import Example, builtin_path, load_examples, select
from zorefine.errors import DataError
from zorefine.models.checkpoint_dir import check_causal_lm_dir
from zorefine.files import write_json_atomic
from zorefine.models.loading import cache_root, load_causal_lm, remove_stale_staging, save_checkpoint

log = logging.getLogger(__name__)

# Every file one stage writes and another reads is named here, once.
ALIGNED_DIR = "checkpoints/aligned"
REFINED_DIR = "checkpoints/refined"
SENSITIVITY_FILE = "sensitivity.json"
SELECTION_FILE = "selection.json"
UNITS_FILE = "units.json"
MASKS_FILE = "units.safetensors"
TRAJECTORY_FILE = "trajectory.jsonl"
TARGETS_FILE = "refine_targets.json"
METRICS_FILE = "metrics.json"


def needed_splits(cfg: DictConfig, stages: list[Stage]) -> list[tuple[str, str]]:
    """The (split, kind) rows of the safety data that the requested stages read."""
    needed: list[tuple[str, str]] = []
    if Stage.align in stages and cfg.align.enabled:
        needed += [("train", "harmful"), ("train", "benign")]
    if Stage.analyze in stages and analyze_needed(cfg):
        needed += [("val", "harmful")] + ([("val", "benign")] if cfg.analyze.num_benign else [])
    if Stage.refine in stages:
        needed += [("train", "harmful"), ("train", "benign")]
    if Stage.evaluate in stages:
        needed += [(cfg.evaluate.split, "harmful"), (cfg.evaluate.split, "benign")]
    return list(dict.fromkeys(needed))


@dataclass
class Run:
    """One pipeline run: its config, its directory and the checkpoints its stages pass on."""

    cfg: DictConfig
    run_dir: Path
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # ---- checkpoints -------------------------------------------------------------
    @cached_property
    def start_checkpoint(self) -> Path:
        """The model the run starts from: ``model.path``, a (cached) GGUF conversion, or the built-in model."""
        if self.cfg.model.path is not None:
            return check_causal_lm_dir(self.cfg.model.path, self.cfg.model.trust_remote_code)
        gguf = self.cfg.model.gguf
        if gguf.file is not None:
            from zorefine.models.gguf import ensure_gguf_model

            return ensure_gguf_model(cache_root(gguf.cache_dir), gguf.file, gguf.package, gguf.system_prompt)
        from zorefine.models.builtin import ensure_builtin_model

        return ensure_builtin_model(OmegaConf.to_object(self.cfg.model.builtin))

    @property
    def aligned_checkpoint(self) -> Path:
        """What analyze and refine start from: the align output when align ran, else the start."""
        if not self.is_done(Stage.align) or not self.stage_summary(Stage.align).get("enabled", True):
            return self.start_checkpoint
        return self._stage_output(Stage.align, ALIGNED_DIR)

    @property
    def refined_checkpoint(self) -> Path | None:
        """The refine output, when refine ran in this run."""
        return self._stage_output(Stage.refine, REFINED_DIR) if self.is_done(Stage.refine) else None

    def _stage_output(self, stage: Stage, name: str) -> Path:
        # A marker without its output must never fall back to another model silently.
        path = self.run_dir / name
        if not path.is_dir():
            raise DataError(
                f"{self.marker(stage)} marks {stage.value} done but {path} is missing: "
                f"add {stage.value} to stages to compute it again"
            )
        return path

    def load_model(self, path: Path):
        """Load a checkpoint with the run's dtype/device settings."""
        model_cfg = self.cfg.model
        return load_causal_lm(path, model_cfg.dtype, model_cfg.device, model_cfg.trust_remote_code)

    # ---- data ----------------------------------------------------------------------
    @cached_property
    def safety_file(self) -> Path:
        """The safety JSONL in use (the user's file or the built-in one)."""
        return Path(self.cfg.data.safety_file) if self.cfg.data.safety_file else builtin_path("safety")

    @cached_property
    def examples(self) -> list[Example]:
        """All rows of the safety file (validated on load)."""
        return load_examples(self.safety_file)

    def split(self, split: str, kind: str, limit: int | None = None) -> list[Example]:
        """Rows of one split and kind, in file order; a clear error when there are none."""
        rows = select(self.examples, split=split, kind=kind)
        if not rows:
            raise DataError(f"{self.safety_file}: no {kind} examples in split '{split}'")
        return rows[:limit] if limit is not None else rows

    @cached_property
    def overrefusal_file(self) -> Path | None:
        """The over-refusal JSONL in use (built-in XSTest unless configured; None when turned off)."""
        configured = self.cfg.data.overrefusal_file
        if configured == "":
            return None
        return Path(configured) if configured else builtin_path("xstest_safe")

    @cached_property
    def overrefusal_examples(self) -> list[Example]:
        """Safe prompts that should not be refused (built-in XSTest unless configured)."""
        if self.overrefusal_file is None:
            return []
        return [e for e in load_examples(self.overrefusal_file) if e.kind == "benign"]

    def overrefusal_prompts(self, split: str) -> list[str]:
        """The over-refusal prompts of ``split``; a file without that split gives all its prompts.

        The built-in XSTest file is split ``val`` / ``test``, so tuning on ``val`` never reads
        the prompts the final over-refusal number is measured on.
        """
        rows = [e for e in self.overrefusal_examples if e.split == split]
        return [e.prompt for e in (rows or self.overrefusal_examples)]

    # ---- stage bookkeeping ---------------------------------------------------------------
    def marker(self, stage: Stage) -> Path:
        return self.run_dir / f"{stage.value}.json"

    def is_done(self, stage: Stage) -> bool:
        return self.marker(stage).is_file()

    def stage_summary(self, stage: Stage) -> dict[str, Any]:
        """What a finished stage recorded in its marker (this run's summary once it ran here)."""
        if stage.value not in self.summaries:
            try:
                self.summaries[stage.value] = json.loads(self.marker(stage).read_text())
            except (OSError, ValueError) as error:
                raise DataError(f"{self.marker(stage)}: unreadable stage marker ({error}); delete it to run the stage again") from error
        return self.summaries[stage.value]

    def remove_stale_staging(self) -> None:
        """Delete half-written checkpoints a killed run left behind (the main process, before any stage)."""
        if self.processes.is_main:
            for path in remove_stale_staging(self.run_dir / "checkpoints"):
                log.info("removed %s, left by a checkpoint write that was killed", path)
        self.processes.barrier()

    def forget(self, stage: Stage) -> None:
        """Drop a stage's done-marker before it runs (again): a crash mid-way leaves it not done."""
        if self.processes.is_main:
            self.marker(stage).unlink(missing_ok=True)
        self.summaries.pop(stage.value, None)
        self.processes.barrier()

    def preflight(self, stages: list[Stage]) -> None:
        """Check the inputs the requested stages will need before any work starts (fail fast, lose nothing)."""
        if self.cfg.model.path is not None or self.cfg.model.gguf.file is not None:
            _ = self.start_checkpoint
        _ = self.overrefusal_examples
        for split, kind in needed_splits(self.cfg, stages):
            self.split(split, kind)

    def finish(self, stage: Stage, summary: dict[str, Any]) -> None:
        """Record a finished stage; its JSON is the last thing it writes (by the main process)."""
        if self.processes.is_main:
            write_json_atomic(self.marker(stage), summary)
        self.summaries[stage.value] = summary
        self.processes.barrier()

    @property
    def processes(self) -> distributed.Processes:
        """The processes running this run (one, unless started by a launcher)."""
        return distributed.current()

    def save_checkpoint(self, model, tokenizer, out_dir: Path, info: dict[str, Any]) -> Path:
        """Save a stage's checkpoint once (main process); the others wait until it is there."""
        if self.processes.is_main:
            save_checkpoint(model, tokenizer, out_dir, info)
        self.processes.barrier()
        return out_dir
