"""The Hydra callback that compares every job of a multirun when the sweep ends (set in conf/config.yaml).

Hydra builds its callbacks before any job runs, for single runs too, so this module imports
nothing heavy: the comparison (plots, reports, the evaluation code) is loaded only at the end
of a sweep, and a run that stops at a config error stops in a second or two.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)


class CompareCallback(Callback):
    """At the end of a multirun, :func:`zorefine.evaluate.compare.compare` the sweep directory."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from zorefine.errors import ZorefineError
        from zorefine.evaluate.compare import compare

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            written = compare([sweep_dir])
        except ZorefineError as error:
            log.warning("[compare] no comparison for %s: %s", sweep_dir, error)
            return
        log.info("[compare] %s", written["markdown"])
        print(f"comparison: {written['markdown']} (and {written['html'].name})")
