"""The ``zorefine`` command: a Hydra application over the typed config schema."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from zorefine.config import register_configs, validate
from zorefine.config.validate import check_choices
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
        check_choices(cfg, dict(HydraConfig.get().runtime.choices))
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
    diverged = summaries.get("refine", {}).get("diverged")
    if diverged and cfg.refine.on_divergence == "stop":
        # The outputs are there (the last good weights, evaluated), but the run did not do what was asked.
        print(
            f"zorefine: error: refine diverged at step {diverged['step']} ({diverged['reason']}); "
            f"the refined checkpoint holds the weights after {diverged['kept_steps']} steps. "
            "Lower refine.lr, or set refine.on_divergence=continue",
            file=sys.stderr,
        )
        sys.exit(3)


def _output_dir(argv: list[str]) -> Path:
    """Where Hydra will write this run (or sweep), as far as the command line tells before composing."""
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = next((arg[len(key):] for arg in reversed(argv) if arg.startswith(key)), None)
    if given is None:
        return Path.cwd() / ("multirun" if multirun else "outputs")
    if "${" not in given:
        return Path(given).expanduser()
    # An interpolation (e.g. ${now:...}) is resolved by Hydra later: check the folder before it.
    literal = given.split("${", 1)[0]
    if not literal:
        return Path.cwd()
    return Path(literal).expanduser() if literal.endswith("/") else Path(literal).expanduser().parent


def check_output_dir(directory: Path) -> None:
    """Fail with one line, before any work, when the run directory cannot be created or written."""
    # One probe name per process: under torchrun every rank runs this check on the same folder,
    # and a shared name let one rank delete the probe another was still writing.
    probe = directory / f".zorefine-write-check-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 65536)  # a full disk fails here, not minutes later
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise ZorefineError(f"cannot write the output directory {directory}: {error.strerror or error}") from error


def main() -> None:
    """Console-script entry point."""
    argv = sys.argv[1:]
    if not any(arg in ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help", "--shell-completion") for arg in argv):
        try:
            check_output_dir(_output_dir(argv))
        except ZorefineError as error:
            print(f"zorefine: error: {error}", file=sys.stderr)
            sys.exit(2)
    app()


if __name__ == "__main__":
    main()
