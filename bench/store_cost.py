"""Benchmark: what each weight store (``copy``, ``inplace``, ``compensated``) adds to a ZO step.

With ±1 directions, plus ``tiled_inplace``: the ``inplace`` store with ``direction="tiled"``.

Prints one JSON object measured in this run, per selection (``full``, ``top_half``) and store:

- ``engine_seconds``: the median seconds of a step whose loss costs nothing, i.e. only the
  store's own work (regenerating directions, moving and restoring weights);
- ``step_over_forward``: the real step ÷ an inference forward timed just before it (median of
  paired ratios, as in ``zo_step.py``);
- ``weight_pass_seconds`` and ``engine_passes``: one in-place pass over the selected weights
  (read and write each, no direction: the least any move can cost, bounded by memory bandwidth),
  and the store's engine seconds in units of that pass. The two-forward floor leaves room for
  ``(limit - 2) × forward ÷ pass`` such passes per step.

With ``--profile [ROW]`` it also prints the ten functions where that engine's full-model step
(default ``compensated``) spends its time (cProfile, two steps, free loss), to stderr. It exists
because ``zo_step.py``'s run of
2026-12-04 reported 13.9 forwards for the compensated full-model step, far from the other
stores; this isolates the stores from the rest of that benchmark.

Usage: ``python bench/store_cost.py [--model 100m] [--batch 8] [--seq 128] [--repeats 3] [--profile [ROW]]``
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zo_step import Clock, Steps, batch_for, build, model_arguments, selection  # noqa: E402

STORES = ("copy", "inplace", "compensated")
# Each store with ±1 directions, and the fastest store with tiled ±1 directions: (row, direction, store).
ENGINES = tuple((store, "rademacher", store) for store in STORES) + (("tiled_inplace", "tiled", "inplace"),)


def measure(model_name: str, batch: int, seq: int, repeats: int) -> dict[str, float]:
    """Engine-only seconds and step ÷ forward ratios of every store, on CPU."""
    model = build(model_name, "cpu")
    steps, clock = Steps(model, batch_for(model, batch, seq)), Clock("cpu")
    results = {"inference_forward_seconds": round(clock.median(steps.inference, repeats), 4)}
    for which in ("top_half", "full"):
        weights = list(selection(model, which).values())
        pass_seconds = clock.median(lambda: weight_pass(weights), repeats)
        results[f"{which}/weight_pass_seconds"] = round(pass_seconds, 4)
        for row, direction, store in ENGINES:
            engine = steps.engine(which, direction, store)
            engine_seconds = clock.median(steps.zo(engine, free=True), repeats)
            results[f"{which}/{row}/engine_seconds"] = round(engine_seconds, 4)
            results[f"{which}/{row}/engine_passes"] = round(engine_seconds / pass_seconds, 2)
            results[f"{which}/{row}/step_over_forward"] = round(clock.ratio(steps.zo(engine), steps.inference, repeats), 3)
    return results


@torch.no_grad()
def weight_pass(weights: list[torch.Tensor]) -> None:
    """Read and write every weight once, leaving it as it was (an fp32 weight of N(0, 0.02)
    absorbs 1e-30 without changing a bit)."""
    for weight in weights:
        weight.add_(1e-30)


def profile_engine(model_name: str, batch: int, seq: int, row: str = "compensated") -> str:
    """cProfile's ten most expensive functions of two full-model engine steps of ``row`` (an
    :data:`ENGINES` row), with a free loss."""
    direction, store = next((d, s) for name, d, s in ENGINES if name == row)
    model = build(model_name, "cpu")
    steps = Steps(model, batch_for(model, batch, seq))
    step = steps.zo(steps.engine("full", direction, store), free=True)
    step()
    profiler = cProfile.Profile()
    profiler.enable()
    step(), step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(10)
    return text.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = model_arguments(__doc__.splitlines()[0])
    parser.add_argument("--profile", nargs="?", const="compensated", choices=[row for row, _, _ in ENGINES],
                        help="also profile two full-model steps of this engine row (default: compensated)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model, args.batch, args.seq, args.repeats), indent=2))
    if args.profile:
        print(profile_engine(args.model, args.batch, args.seq, args.profile), file=sys.stderr)


if __name__ == "__main__":
    main()
