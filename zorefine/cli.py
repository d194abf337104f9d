"""The ``zorefine`` command: a Hydra application over the typed config schema."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from zorefine.config import register_configs, validate
from zorefine.errors import ZorefineError

log = logging.getLogger("zorefine")

register_configs()


def _quiet_libraries() -> None:
    # The tiny default run should show zorefine's own progress, not library chatter.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("transformers", "accelerate", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@hydra.main(config_path="pkg://zorefine.conf", config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    """Run the configured zorefine stages; user errors become one line and exit code 2."""
    _quiet_libraries()
    try:
        validate(cfg)
        from zorefine.pipeline import run_pipeline

        from zorefine import distributed

        # Under a launcher each process composes its own output directory (they may differ by
        # the second in the default timestamped path): all use the main process's.
        run_dir = Path(distributed.current().broadcast(HydraConfig.get().runtime.output_dir))
        log.info("run directory: %s", run_dir)
        summaries = run_pipeline(cfg, run_dir)
        if "evaluate" in summaries:
            log.info("report: %s", summaries["evaluate"].get("report"))
    except ZorefineError as error:
        print(f"zorefine: error: {error}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
