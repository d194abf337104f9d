"""Benchmark: cost of one ZO step against one inference forward pass, zorefine vs MeZO.

Prints one JSON object of ratios measured in this run (machines are noisy; ratios within one
run are less so). Method, so that every figure means what its name says:

- **The reference is an inference forward**: the batch's loss under ``torch.no_grad()``, same
  batch, dtype and device as the step (a ZO step builds no autograd graph, so neither does its
  reference). Every step is timed against a reference run just before it and the median of those
  paired ratios is reported, so slow drifts of a shared machine cancel.
- **A step is what ``refine`` runs**: a real (non-zero) learning rate, so the update pass is paid;
  with the prefix cache, the unperturbed prefix is captured *inside* every timed step, as
  :func:`zorefine.refine.objective.step_objective` does each step.
- **"vs MeZO" is like for like**: MeZO-faithful Gaussian steps against zorefine's Gaussian steps,
  same selection, batch and ε (``speedup_vs_mezo``). The ±1 directions zorefine uses by default
  are their own row (``rademacher_gain``: zorefine Gaussian step ÷ zorefine ±1 step); the prefix
  cache is a third (``cache_gain``).

Keys, per selection (``full``: every parameter; ``top_half``: the decoder layers of the second
half; ``default``: what the default run selects on the built-in model, its first and last
decoder layers, where the prefix cache has nothing to skip):

- ``mezo/step_over_forward``: the MeZO-faithful step (Malladi et al. 2023: one global seed per
  step, each pass redraws every tensor's Gaussian z in order from it; four passes per step,
  +ε, −2ε, +ε restore, update; out-of-place adds; no prefix cache);
- ``gaussian/step_over_forward``, ``gaussian_inplace/step_over_forward`` (``store="inplace"``),
  ``rademacher/step_over_forward`` (the default engine),
  ``rademacher_compensated/step_over_forward`` (``store="compensated"``): zorefine's steps;
- ``rademacher_inplace/step_over_forward`` (``store="inplace"``: no copy of θ at all);
- ``tiled_inplace/step_over_forward`` (``direction="tiled"``, ``store="inplace"``: ±1 blocks read
  as signed shifts of one pool per step, so a move is one add per block and no direction is
  drawn entry by entry; ``tiled_inplace/engine_share`` as below);
- ``defer_gain``: the default step writing each update at once (``settle=True``) ÷ the default
  step, which leaves it to the next step's first move as ``refine`` does (paired: each settled
  step timed right after a deferred one, median of ``repeats`` pairs);
- ``*_cached/step_over_forward``: the same with the prefix cache, capture included (``top_half``);
- ``speedup_vs_mezo``: a MeZO step ÷ a zorefine Gaussian step run just before it (paired, median
  of ``repeats`` pairs; the two ``step_over_forward`` rows are each paired with the forward
  instead, so their quotient can differ a little); ``speedup_vs_mezo_inplace``: the same against
  zorefine's Gaussian step with ``store="inplace"``, which like MeZO keeps no copy of θ and moves
  the weights themselves (the default ``copy`` store also reads and writes an fp32 master copy);
  ``rademacher_gain`` = gaussian ÷ rademacher;
  ``cache_gain`` = rademacher ÷ rademacher_cached;
- ``rademacher/engine_share``: the share of the default step spent outside forward passes
  (drawing directions, writing weights), measured as the step with a free loss ÷ the real step
  run just before it (median of ``repeats`` such pairs);
- ``full/rademacher/step_over_grad_forward``: the default full-model step against a forward that
  builds the autograd graph, the reference earlier versions of this benchmark used by mistake
  (kept to show how much that flattered the ratio);
- ``*/peak_memory_over_inference``: peak memory while doing ZO steps ÷ peak while doing
  inference forwards. On CPU: resident memory of a fresh subprocess (glibc's mmap threshold fixed
  at 64 KiB, so freed blocks leave the RSS), sampled only after the model is built; on CUDA:
  ``torch.cuda.max_memory_allocated``.

``--device cuda`` runs the same on a GPU in bf16 (fp32 master copies for the selected tensors,
which the engine keeps for half-precision weights anyway), timed with CUDA events, and adds
``tokens_per_second`` of the inference forward and of the default full-model step.

Usage: ``python bench/zo_step.py [--model builtin|100m|1b] [--batch 8] [--seq 96] [--repeats 5]
[--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zorefine.models.layers import find_decoder_layers
from zorefine.zo.engine import ZOEngine, ZOSettings, step_seed
from zorefine.zo.prefix_cache import PrefixCache

MODELS = {
    "builtin": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4),
    "100m": dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16),
}
SELECTIONS = ("full", "top_half", "default")
EPS, LR = 1e-3, 1e-7  # a real update (lr > 0) every step, too small to move the loss


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(name: str, device: str | None = None) -> LlamaForCausalLM:
    """The benchmark's random Llama (bf16 on CUDA, fp32 on CPU)."""
    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[name], num_key_value_heads=MODELS[name]["num_attention_heads"], max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    device = device or default_device()
    return model.to(device=device, dtype=torch.bfloat16) if device == "cuda" else model


def batch_for(model, batch: int, seq: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(model.device)
    return {"input_ids": ids, "labels": ids}


class Clock:
    """Seconds of one call: wall clock on CPU, CUDA events on a GPU (queued work included)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def seconds(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000.0

    def median(self, fn: Callable[[], object], repeats: int) -> float:
        """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
        fn()
        times = sorted(self.seconds(fn) for _ in range(repeats))
        return times[len(times) // 2]

    def ratio(self, fn: Callable[[], object], reference: Callable[[], object], repeats: int) -> float:
        """Median over ``repeats`` of (seconds of ``fn``) ÷ (seconds of ``reference`` run just before)."""
        fn(), reference()
        ratios = []
        for _ in range(repeats):
            base = self.seconds(reference)
            ratios.append(self.seconds(fn) / base)
        return sorted(ratios)[len(ratios) // 2]


def first_refined_layer(model, which: str) -> int:
    """The lowest decoder layer a selection touches (0 for the full model: the embeddings)."""
    return len(find_decoder_layers(model)) // 2 if which == "top_half" else 0


def selection(model, which: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``which`` (see the module docstring)."""
    if which == "full":
        return dict(model.named_parameters())
    layers = find_decoder_layers(model)
    indices = range(len(layers) // 2, len(layers)) if which == "top_half" else (0, len(layers) - 1)
    params: dict[str, torch.nn.Parameter] = {}
    for index in indices:
        params.update(layers.parameters(index))
    return params


class MeZOBaseline:
    """The reference MeZO step: global seed per step, 4 regeneration passes, out-of-place adds."""

    def __init__(self, params: dict[str, torch.nn.Parameter], eps: float) -> None:
        self.params, self.eps = params, eps

    @torch.no_grad()
    def _perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for param in self.params.values():
            z = torch.normal(mean=0, std=1, size=param.shape, device=param.device, dtype=param.dtype)
            param.data = param.data + scale * z

    @torch.no_grad()
    def step(self, seed: int, lr: float, loss_fn: Callable[[], float]) -> None:
        self._perturb(seed, self.eps)
        loss_plus = float(loss_fn())
        self._perturb(seed, -2 * self.eps)
        loss_minus = float(loss_fn())
        self._perturb(seed, self.eps)
        self._perturb(seed, -lr * (loss_plus - loss_minus) / (2 * self.eps))


class Steps:
    """Step closures over one model and batch, each a fresh step seed."""

    def __init__(self, model, inputs: dict[str, torch.Tensor]) -> None:
        self.model, self.inputs, self._count = model, inputs, iter(range(10**9))

    def loss(self) -> float:
        return float(self.model(**self.inputs).loss.detach())

    def inference(self) -> float:
        with torch.no_grad():
            return self.loss()

    def engine(self, which: str, direction: str, store: str = "copy") -> ZOEngine:
        settings = ZOSettings(eps=EPS, direction=direction, store=store)
        return ZOEngine(selection(self.model, which), settings=settings)

    def zo(self, engine: ZOEngine, first_layer: int = 0, free: bool = False, settle: bool = False) -> Callable[[], object]:
        """One refine step: capture the prefix (when ``first_layer`` > 0), then ±ε and the update.

        ``free``: a loss that costs nothing, so the step times only the engine's own work.
        ``settle``: write each update at once instead of in the next step's first move.
        """
        cache = PrefixCache(self.model, first_layer, keep_all=False) if first_layer and not free else None
        ids = self.inputs["input_ids"]

        def objective() -> float:
            if free:
                return 0.0
            with cache.replay() if cache is not None else contextlib.nullcontext():
                return self.loss()

        def step() -> None:
            if cache is not None:
                cache.capture_prefix([lambda: self.model(input_ids=ids)])
            # As refine runs it: each step's update is written by the next step's first move.
            engine.step(0, step_seed(0, next(self._count)), LR, objective, settle=settle)

        return step

    def mezo(self, which: str) -> Callable[[], object]:
        baseline = MeZOBaseline(selection(self.model, which), EPS)
        return lambda: baseline.step(next(self._count), LR, self.loss)


def measure(model_name: str, batch: int, seq: int, repeats: int, device: str | None = None) -> dict[str, float]:
    device = device or default_device()
    model = build(model_name, device)
    steps, clock = Steps(model, batch_for(model, batch, seq)), Clock(device)
    ratio = lambda fn: clock.ratio(fn, steps.inference, repeats)  # noqa: E731
    results: dict[str, float] = {"inference_forward_seconds": clock.median(steps.inference, repeats)}
    for which in SELECTIONS:
        first = first_refined_layer(model, which)
        rows = {"mezo": ratio(steps.mezo(which))}
        for tag, direction, store in (("gaussian", "gaussian", "copy"), ("gaussian_inplace", "gaussian", "inplace"),
                                      ("rademacher", "rademacher", "copy"),
                                      ("rademacher_compensated", "rademacher", "compensated"),
                                      ("rademacher_inplace", "rademacher", "inplace"),
                                      ("tiled_inplace", "tiled", "inplace")):
            engine = steps.engine(which, direction, store)
            rows[tag] = ratio(steps.zo(engine))
            if first:
                rows[f"{tag}_cached"] = ratio(steps.zo(engine, first))
            if tag in ("rademacher", "tiled_inplace"):
                # Paired with the real step run just before it: two ratios to the forward measured
                # apart let one slow sample (a busy CI machine) push the share past 1.
                results[f"{which}/{tag}/engine_share"] = clock.ratio(steps.zo(engine, free=True), steps.zo(engine), repeats)
            if tag == "rademacher":
                results[f"{which}/defer_gain"] = clock.ratio(steps.zo(engine, settle=True), steps.zo(engine), repeats)
                if which == "full":
                    results["full/rademacher/step_over_grad_forward"] = clock.ratio(steps.zo(engine), steps.loss, repeats)
            engine.restore()
        for tag, value in rows.items():
            results[f"{which}/{tag}/step_over_forward"] = value
        # Paired like the shares: the verdict rests on this figure, and a quotient of two ratios
        # measured minutes apart carries both their noises.
        for store, key in (("copy", "speedup_vs_mezo"), ("inplace", "speedup_vs_mezo_inplace")):
            gaussian = steps.engine(which, "gaussian", store)
            results[f"{which}/{key}"] = clock.ratio(steps.mezo(which), steps.zo(gaussian), repeats)
            gaussian.restore()
        results[f"{which}/rademacher_gain"] = rows["gaussian"] / rows["rademacher"]
        if first:
            results[f"{which}/cache_gain"] = rows["rademacher"] / rows["rademacher_cached"]
    if device == "cuda":
        tokens = batch * seq
        results["inference_tokens_per_second"] = tokens / results["inference_forward_seconds"]
        results["full/rademacher/step_tokens_per_second"] = (
            tokens / (results["full/rademacher/step_over_forward"] * results["inference_forward_seconds"]))
    return results


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class _PeakRSS:
    """Samples this process's resident memory every millisecond while active."""

    def __enter__(self) -> "_PeakRSS":
        self.peak, self._running = _rss_bytes(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _work(model, inputs: dict[str, torch.Tensor], mode: str) -> None:
    """Three inference forwards, or three default refine steps of selection ``which[:store]``."""
    steps = Steps(model, inputs)
    if mode == "inference":
        for _ in range(3):
            steps.inference()
        return
    which, store, direction = (mode.split(":") + ["", ""])[:3]
    step = steps.zo(steps.engine(which, direction or "rademacher", store or "copy"), first_refined_layer(model, which))
    for _ in range(3):
        step()


def _peak_rss_child(model_name: str, batch: int, seq: int, mode: str) -> int:
    """Peak RSS (bytes) while running forwards or ZO steps, after the model is built.

    Building a model has its own, higher peak (initialisation temporaries); sampling only the
    work phase keeps that out of the comparison.
    """
    model = build(model_name, "cpu")
    inputs = batch_for(model, batch, seq)
    gc.collect()
    with _PeakRSS() as rss:
        _work(model, inputs, mode)
    return rss.peak


MEMORY_MODES = {"full": "full", "top_half": "top_half", "default": "default",
                "full_compensated": "full:compensated", "top_half_compensated": "top_half:compensated",
                "full_inplace": "full:inplace", "top_half_inplace": "top_half:inplace",
                "full_tiled_inplace": "full:inplace:tiled", "top_half_tiled_inplace": "top_half:inplace:tiled"}


def _cuda_peak(model_name: str, batch: int, seq: int, mode: str) -> int:
    model = build(model_name, "cuda")
    inputs = batch_for(model, batch, seq)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _work(model, inputs, mode)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, inputs
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def peak_memory_ratios(model_name: str, batch: int, seq: int, device: str | None = None) -> dict[str, float]:
    if (device or default_device()) == "cuda":
        inference = _cuda_peak(model_name, batch, seq, "inference")
        return {f"{tag}/peak_memory_over_inference": _cuda_peak(model_name, batch, seq, mode) / inference
                for tag, mode in MEMORY_MODES.items()}
    # A fixed mmap threshold makes glibc hand large blocks back to the system when freed,
    # so RSS follows what is allocated rather than what the allocator chose to keep cached.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

    def child(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--model", model_name, "--batch", str(batch), "--seq", str(seq)],
            capture_output=True, text=True, check=True, env=env,
        )
        return int(out.stdout.strip().splitlines()[-1])

    inference = child("inference")
    return {f"{tag}/peak_memory_over_inference": child(mode) / inference for tag, mode in MEMORY_MODES.items()}


def model_arguments(description: str) -> argparse.ArgumentParser:
    """The options every ZO benchmark takes: the model config, the batch, the repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="builtin", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = model_arguments(__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.child:
        print(_peak_rss_child(args.model, args.batch, args.seq, args.child))
        return
    device = args.device or default_device()
    report = {"model": args.model, "batch": args.batch, "seq": args.seq, "device": device,
              "dtype": "bfloat16" if device == "cuda" else "float32"}
    report.update(measure(args.model, args.batch, args.seq, args.repeats, device))
    report.update(peak_memory_ratios(args.model, args.batch, args.seq, device))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}, indent=2))


if __name__ == "__main__":
    main()
