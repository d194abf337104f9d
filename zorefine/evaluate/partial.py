"""The conditions an interrupted evaluation already measured, so that a resumed run measures the rest.

A real model's threat grid takes an hour on a CPU (the fine-tuning attack alone trains 40 steps
per draw). Each finished condition is appended to a JSON-lines log in the run directory, under
a header holding the evaluation's key (everything its numbers depend on: checkpoint, grid, data,
code version); a resumed run with the same key reads those conditions back and measures only the
others. Conditions are seeded and measured on exactly restored weights, so a condition read back
is the one the run would have measured again. The log is removed once the evaluation is whole.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from zorefine.evaluate.robustness import Condition, ConditionResult

log = logging.getLogger(__name__)


def condition_id(label: str, seed: int | None) -> str:
    """What names one cell of a grid across runs (a label repeats over weight-noise seeds)."""
    return f"{label}|{seed}"


class ConditionLog:
    """Append-only record of one checkpoint's measured conditions, valid for one evaluation key."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key
        self.done = self.finished()

    def lookup(self, condition: Condition) -> ConditionResult | None:
        """The condition's result if it was measured before the interruption."""
        return self.done.get(condition_id(condition.label, condition.seed))

    def finished(self) -> dict[str, ConditionResult]:
        """The conditions measured before an interruption (none if the log is another evaluation's)."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("key") != self.key:
            log.info("[evaluate] %s belongs to another evaluation: measuring every condition anew", self.path)
            self.path.unlink()
            return {}
        results = {}
        for line in lines[1:]:
            try:
                result = ConditionResult(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                break  # the line being written when the run was killed, and anything after it
            results[condition_id(result.label, result.seed)] = result
        if results:
            log.info("[evaluate] resuming: %d condition(s) read back from %s", len(results), self.path)
        return results

    def record(self, result: ConditionResult) -> None:
        """Append one measured condition, durably (a kill right after loses nothing)."""
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            if new:
                handle.write(json.dumps({"key": self.key}) + "\n")
            handle.write(json.dumps(asdict(result)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def close(self) -> None:
        """The evaluation is whole (its result is written elsewhere): the log has done its work."""
        self.path.unlink(missing_ok=True)

