"""Rebuild a refined model from its base checkpoint and trajectory log (``zorefine-replay``).

The log is a few KB: a shareable refinement patch. Replay is bit-exact on the same device
type and torch version as the original run (see :data:`zorefine.zo.trajectory.REPLAY_NOTE`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch

from zorefine.errors import DataError, ZorefineError
from zorefine.zo.trajectory import check_directions_version, read_trajectory
from zorefine.config.refine import zo_settings
from zorefine.models.selection import Selection
from zorefine.zo.engine import ZOEngine, ZOStepRecord


def select_parameters(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The named parameters of ``model``, in the given order; a clear error if one is missing."""
    available = dict(model.named_parameters())
    missing = [n for n in names if n not in available]
    if missing:
        raise DataError(f"the model has no parameter(s) {missing[:3]} named in the trajectory log")
    return {n: available[n] for n in names}


def header_entries(header: Mapping) -> dict[str, torch.Tensor]:
    """The entry positions a unit-set refinement worked on, read back from the file its header names."""
    spec = header.get("entries")
    if not spec:
        return {}
    path = Path(spec["file"])
    if not path.is_file():
        raise DataError(f"the trajectory refined the {spec['set']!r} units of {path}, which is missing: replay needs that file")
    selection = Selection("entries", [spec["set"]], [], list(header["parameters"]), {}, None, str(path), spec["set"], spec.get("digest"))
    try:
        return selection.entry_indices()
    except ZorefineError as error:
        raise DataError(f"cannot replay: {error}") from None


def apply_records(
    engine: ZOEngine, records: Sequence[ZOStepRecord], unit_parameters: Mapping[str, Sequence[str]] | None = None
) -> int:
    """Re-run the updates of ``records`` on ``engine``; returns how many changed the weights.

    A record that names a ``unit`` updates only that unit's parameters (``unit_parameters``,
    from the log header).
    """
    applied = 0
    # Skipped steps too: under store=inplace their moves rounded θ (the engine knows).
    for record in records:
        names = None
        if record.unit is not None:
            if not unit_parameters or record.unit not in unit_parameters:
                raise DataError(f"step {record.step} names unit {record.unit!r}, which the log header does not define")
            names = unit_parameters[record.unit]
        applied += engine.replay(record, names)
    return applied


def replay_device(header: Mapping) -> str:
    """The device type the run used (CPU and CUDA generators draw different directions)."""
    logged = str(header.get("environment", {}).get("device", "cpu"))
    if logged.startswith("cuda") and not torch.cuda.is_available():
        raise DataError("this trajectory was refined on a CUDA device: replay it on one (CPU directions differ)")
    return "cuda" if logged.startswith("cuda") else "cpu"


def replay(base_dir: str | Path, log_path: str | Path, out_dir: str | Path) -> Path:
    """Load ``base_dir``, apply every logged step, save the refined model to ``out_dir``."""
    from zorefine.models.loading import load_causal_lm, save_checkpoint

    header, records = read_trajectory(Path(log_path))
    if header is None:
        raise DataError(f"{log_path}: no trajectory header (is this a zorefine trajectory.jsonl?)")
    check_directions_version(header, log_path)
    model, tokenizer = load_causal_lm(base_dir, dtype=header.get("dtype", "float32"), device=replay_device(header))
    engine = ZOEngine(select_parameters(model, header["parameters"]), settings=zo_settings(header["refine"]), entries=header_entries(header))
    applied = apply_records(engine, records, header.get("unit_parameters"))
    info = {"stage": "replay", "base": str(base_dir), "trajectory": str(log_path), "applied_steps": applied}
    return save_checkpoint(model, tokenizer, out_dir, info)


def main(argv: Sequence[str] | None = None) -> None:
    """``zorefine-replay BASE_DIR TRAJECTORY OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="zorefine-replay", description=__doc__.splitlines()[0])
    parser.add_argument("base_dir", help="the checkpoint the refinement started from")
    parser.add_argument("trajectory", help="the run's trajectory.jsonl")
    parser.add_argument("out_dir", help="where to write the refined checkpoint")
    args = parser.parse_args(argv)
    try:
        out = replay(args.base_dir, args.trajectory, args.out_dir)
    except (ZorefineError, FileNotFoundError) as error:
        print(f"zorefine-replay: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"refined checkpoint written to {out}")


if __name__ == "__main__":
    main()
