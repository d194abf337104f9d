"""The trajectory log: a few KB that turn a base checkpoint into the refined one.

JSON lines, appended and flushed as the run goes: a header (config, selection, library
versions) and one line per ZO step ``(step, seed, projected_grad, lr, loss...)``. A killed
run resumes by replaying the steps it finds; a refined model can be rebuilt from the base
checkpoint and this file alone.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers

from zorefine.errors import DataError
from zorefine.zo.directions import DIRECTIONS_VERSION
from zorefine.zo.engine import ZOStepRecord


def environment() -> dict[str, Any]:
    """Library versions and device: a replay is bit-exact only on the same ones."""
    return {
        "replay": REPLAY_NOTE,
        "directions_version": DIRECTIONS_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


_STEP_FIELDS = ("step", "seed", "projected_grad", "lr", "loss_plus", "loss_minus", "skipped", "projected_grads", "eps", "loss_clean", "unit")

REPLAY_NOTE = (
    "Replay re-runs the recorded updates with the same arithmetic: it is bit-exact on the same "
    "device type and torch version (random directions come from torch.Generator, whose streams "
    "differ between CPU and CUDA and may change across torch releases)."
)


def check_directions_version(header: dict[str, Any], source: object) -> None:
    """Refuse a log whose seeds stood for other random numbers than this zorefine draws."""
    logged = header.get("environment", {}).get("directions_version", 1)
    if logged != DIRECTIONS_VERSION:
        raise DataError(
            f"{source}: made with direction generator / update rule v{logged}, this zorefine uses v{DIRECTIONS_VERSION}; "
            "replay or resume it with the zorefine release that wrote it"
        )


def read_trajectory(path: Path) -> tuple[dict[str, Any] | None, list[ZOStepRecord]]:
    """Header and step records of a log; a torn last line (killed mid-write) is dropped."""
    if not path.is_file():
        return None, []
    header, steps = None, []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise DataError(f"{path}:{number}: corrupt trajectory line ({error.msg})") from error
        if row.get("type") == "header":
            header = row
        elif row.get("type") == "step":
            fields = {k: row[k] for k in _STEP_FIELDS if k in row}
            steps.append(ZOStepRecord(**fields))
    return header, steps


class TrajectoryWriter:
    """Appends header and step lines, flushing each so a kill loses at most one step."""

    def __init__(self, path: Path, header: dict[str, Any], existing_steps: int, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:  # a process that is not the one keeping the log
            return
        header_line = json.dumps({"type": "header", **header})
        if existing_steps == 0:
            path.write_text(header_line + "\n")
        else:
            self._truncate_to(existing_steps, header_line)
        self._file = path.open("a")

    def _truncate_to(self, num_steps: int, header_line: str) -> None:
        # Drop a torn or extra tail so the file holds exactly the steps that were replayed, under
        # this run's header: a resumed run may differ in how it runs (its step count, the
        # store), and the log must say what this run was asked for, not what the killed one was.
        kept, seen = [header_line], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if row.get("type") == "header":
                continue
            if row.get("type") == "step":
                if seen == num_steps:
                    break
                seen += 1
            kept.append(line)
        self.path.write_text("\n".join(kept) + "\n")

    def append(self, record: ZOStepRecord) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"type": "step", **asdict(record)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

