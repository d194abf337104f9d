"""What a finished stage was computed from, so that resuming never reuses a stale result.

A stage's done-marker (``<stage>.json``) records its *identity*: the config fields the stage
reads, the identities of its inputs (the checkpoint it started from, by file name, size, mtime
and inode; the data files, by hash) and the zorefine version. On resume a stage is skipped only
when its marker's identity equals the current one and its outputs are all still there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

import zorefine
from zorefine.config.schema import Stage
from zorefine.config.validate import SELECTING_METHODS
from zorefine.models.fingerprint import checkpoint_fingerprint, file_digest
from zorefine.run import ALIGNED_DIR, MASKS_FILE, METRICS_FILE, REFINED_DIR, SELECTION_FILE, SENSITIVITY_FILE, UNITS_FILE, Run

# The config sections (or single keys) each stage's result depends on.
STAGE_CONFIG: dict[Stage, tuple[str, ...]] = {
    Stage.align: ("model", "data", "align"),
    Stage.analyze: ("model", "data", "analyze", "evaluate.judge", "seed"),  # (whether it runs: see the pipeline)
    Stage.refine: ("model", "data", "refine", "seed"),
    Stage.evaluate: ("model", "data", "evaluate", "seed"),
}
# Settings that change where results are cached or how a step is computed, not what is written
# (the ZO trajectory is the same with or without them; see zorefine.refine.resume).
NOT_IDENTITY = frozenset({
    "align.cache_dir", "evaluate.cache_dir", "refine.targets_cache_dir", "refine.log_every", "refine.prefix_cache", "refine.zo.store", "refine.deepspeed",
})


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: value}


def config_identity(cfg: DictConfig, stage: Stage) -> dict[str, Any]:
    """The flattened config fields ``stage`` depends on (``{"refine.lr": 0.05, ...}``)."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    flat: dict[str, Any] = {}
    for path in STAGE_CONFIG[stage]:
        value: Any = container
        for part in path.split("."):
            value = value[part]
        flat.update(_flatten(value, path))
    return {key: value for key, value in flat.items() if key not in NOT_IDENTITY}


def _checkpoint(path: Path | None) -> Any:
    return None if path is None else {"path": str(path), "files": checkpoint_fingerprint(path)}


def input_identity(run: Run, stage: Stage) -> dict[str, Any]:
    """Identities of what ``stage`` reads: its start checkpoint and its data files."""
    inputs: dict[str, Any] = {"safety_data": file_digest(run.safety_file)}
    if stage is Stage.align:
        inputs["start_model"] = _checkpoint(run.start_checkpoint)
        return inputs
    inputs["model"] = _checkpoint(run.aligned_checkpoint)
    refine = run.cfg.refine
    if stage is Stage.refine and refine.method in SELECTING_METHODS and refine.layers is None:
        selection = Path(refine.selection_file) if refine.selection_file else run.run_dir / SELECTION_FILE
        inputs["selection"] = file_digest(selection) if selection.is_file() else None
    if stage is Stage.evaluate:
        inputs["refined_model"] = _checkpoint(run.refined_checkpoint)
        inputs["overrefusal_data"] = file_digest(run.overrefusal_file) if run.overrefusal_file else None
    return inputs


def stage_identity(run: Run, stage: Stage) -> dict[str, Any]:
    """Everything ``stage``'s result depends on, as recorded in its done-marker."""
    return {
        "config": config_identity(run.cfg, stage),
        "inputs": input_identity(run, stage),
        "zorefine": zorefine.__version__,
    }


def identity_changes(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """What differs between a marker's identity and the current one, one short phrase each."""
    if not recorded:
        return ["its done-marker records no identity (written by an older zorefine)"]
    changes = []
    old_config, new_config = recorded.get("config", {}), current["config"]
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key, "<unset>") != new_config.get(key, "<unset>"):
            changes.append(f"{key}: {old_config.get(key, '<unset>')!r} -> {new_config.get(key, '<unset>')!r}")
    old_inputs, new_inputs = recorded.get("inputs", {}), current["inputs"]
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(key) != new_inputs.get(key):
            changes.append(f"input {key} changed")
    if recorded.get("zorefine") != current["zorefine"]:
        changes.append(f"zorefine {recorded.get('zorefine')} -> {current['zorefine']}")
    return changes


def missing_outputs(run: Run, stage: Stage, summary: Mapping[str, Any]) -> list[str]:
    """The outputs a finished stage wrote that are no longer in the run directory."""
    if stage is Stage.align:
        expected = [ALIGNED_DIR] if summary.get("enabled", True) else []
    elif stage is Stage.analyze:
        if summary.get("skipped"):
            expected = []
        elif summary.get("method", "perturbation") != "perturbation":
            expected = [SELECTION_FILE, UNITS_FILE, MASKS_FILE]
        else:
            expected = [SELECTION_FILE, SENSITIVITY_FILE]
    elif stage is Stage.refine:
        expected = [REFINED_DIR]
    else:
        expected = [METRICS_FILE]
    return [name for name in expected if not (run.run_dir / name).exists()]
