"""Benchmark: cost of one ZO step against one forward pass, zorefine vs a MeZO-faithful baseline.

Prints one JSON object of ratios measured in this run (machines are noisy; ratios within one
run are less so). Every step time is divided by a forward pass timed just before it, and the
median of those paired ratios is reported, so slow drifts of a shared machine cancel.

- ``step_over_forward``: seconds per ZO step ÷ seconds per plain forward pass of the batch;
- ``regen_share``: share of the step spent outside forward passes (regenerating directions,
  writing weights), measured as the step with a free loss ÷ the real step;
- ``speedup_vs_mezo``: MeZO-faithful step time ÷ zorefine step time, same selection and batch;
- ``peak_memory_over_inference``: peak RSS while doing ZO steps ÷ peak RSS while doing
  forwards, each in a fresh subprocess (glibc's mmap threshold fixed at 64 KiB, so freed
  blocks leave the RSS) and sampled only after the model is built, with the default (±1)
  directions. The default store keeps an fp32 master copy of the selected tensors (exact
  restores), so a full-model selection costs one extra copy of the weights; the compensated
  store about an eighth of one.
- ``*_rademacher``: the same step with ±1 directions (cheaper to regenerate on CPU);
  ``*_compensated``: with ``store="compensated"`` (fp32 weights moved in place and restored
  exactly from ~half a byte per weight instead of a 4-byte master copy);
  ``*_cached``: with the unperturbed prefix computed once per step (prefix caching).

The MeZO-faithful baseline follows Malladi et al. 2023: one global seed per step, each pass
redraws every tensor's z in order from it; four passes per step (+ε, −2ε, +ε restore, update),
out-of-place adds, no prefix caching.

Usage: ``python bench/zo_step.py [--model builtin|100m|1b] [--batch 8] [--seq 96] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import threading
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zorefine.models.layers import find_decoder_layers
from zorefine.zo.prefix_cache import PrefixCache
from zorefine.zo.engine import ZOEngine, ZOSettings, step_seed

MODELS = {
    "builtin": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4),
    "100m": dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16),
}


def build(name: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[name], num_key_value_heads=MODELS[name]["num_attention_heads"], max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    return model.cuda() if torch.cuda.is_available() else model


def batch_for(model, batch: int, seq: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(model.device)
    return {"input_ids": ids, "labels": ids}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def ratio_to(fn: Callable[[], object], reference: Callable[[], object], repeats: int) -> float:
    """Median over ``repeats`` of (seconds of ``fn``) ÷ (seconds of ``reference`` run just before).

    Pairing each measurement with an adjacent reference cancels the slow drifts of a shared
    machine (other jobs, frequency changes) that separate medians would fold into the ratio.
    """
    fn(), reference()
    ratios = []
    for _ in range(repeats):
        base = _once(reference)
        ratios.append(_once(fn) / base)
    return sorted(ratios)[len(ratios) // 2]


def selection(model, which: str) -> dict[str, torch.nn.Parameter]:
    """"full": every parameter; "top_half": the decoder layers of the second half."""
    if which == "full":
        return dict(model.named_parameters())
    layers = find_decoder_layers(model)
    params: dict[str, torch.nn.Parameter] = {}
    for index in range(len(layers) // 2, len(layers)):
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
    def step(self, step: int, seed: int, lr: float, loss_fn: Callable[[], float]) -> None:
        self._perturb(seed, self.eps)
        loss_plus = float(loss_fn())
        self._perturb(seed, -2 * self.eps)
        loss_minus = float(loss_fn())
        self._perturb(seed, self.eps)
        self._perturb(seed, -lr * (loss_plus - loss_minus) / (2 * self.eps))


def measure(model_name: str, batch: int, seq: int, repeats: int) -> dict[str, float]:
    model = build(model_name)
    inputs = batch_for(model, batch, seq)

    def loss() -> float:
        return float(model(**inputs).loss)

    results: dict[str, float] = {}
    with torch.no_grad():
        results["forward_seconds"] = timed(loss, repeats)
    counter = iter(range(10**9))

    def step_of(engine: ZOEngine, objective: Callable[[], float]) -> Callable[[], object]:
        return lambda: engine.step(0, step_seed(0, next(counter)), 0.0, objective)

    for which in ("full", "top_half"):
        params = selection(model, which)
        baseline = MeZOBaseline(params, eps=1e-3)
        mezo = ratio_to(lambda: baseline.step(0, next(counter), 0.0, loss), loss, repeats)
        results[f"{which}/mezo_step_over_forward"] = mezo
        engine = ZOEngine(params, settings=ZOSettings(eps=1e-3, direction="gaussian"))
        ours = ratio_to(step_of(engine, loss), loss, repeats)
        free = ratio_to(step_of(engine, lambda: 0.0), loss, repeats)
        engine.restore()
        results[f"{which}/step_over_forward"] = ours
        results[f"{which}/regen_share"] = free / ours
        results[f"{which}/speedup_vs_mezo"] = mezo / ours
        first = len(find_decoder_layers(model)) // 2 if which == "top_half" else 0
        variants = [("gaussian", "copy"), ("rademacher", "copy"), ("rademacher", "compensated")]
        for direction, store in variants:
            if first == 0 and direction == "gaussian":
                continue  # measured above
            variant = ZOEngine(params, settings=ZOSettings(eps=1e-3, direction=direction, store=store))
            tag = f"{which}{'_cached' if first else ''}_{direction}{'_compensated' if store == 'compensated' else ''}"
            ratio = ratio_to(step_of(variant, _cached_loss(model, inputs, first)), loss, repeats)
            variant.restore()
            results[f"{tag}/step_over_forward"] = ratio
            results[f"{tag}/speedup_vs_mezo"] = mezo / ratio
    return results


def _cached_loss(model, inputs: dict[str, torch.Tensor], first_layer: int) -> Callable[[], float]:
    """What refine does each step: compute the unperturbed prefix once, replay it per pass."""
    cache = PrefixCache(model, first_layer, keep_all=False)
    cache.capture_prefix([lambda: model(input_ids=inputs["input_ids"])])

    def loss() -> float:
        with cache.replay() if cache.active else contextlib.nullcontext():
            return float(model(**inputs).loss)

    return loss


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


def _peak_rss_child(model_name: str, batch: int, seq: int, mode: str) -> int:
    """Peak RSS (bytes) while running forwards or ZO steps, after the model is built.

    Building a model has its own, higher peak (initialisation temporaries); sampling only the
    work phase keeps that out of the comparison.
    """
    model = build(model_name)
    inputs = batch_for(model, batch, seq)
    gc.collect()
    with torch.no_grad(), _PeakRSS() as rss:
        if mode == "inference":
            for _ in range(3):
                model(**inputs)
        else:
            which, _, store = mode.partition(":")
            engine = ZOEngine(selection(model, which), settings=ZOSettings(eps=1e-3, store=store or "copy"))
            for step in range(3):
                engine.step(step, step_seed(0, step), 1e-6, lambda: float(model(**inputs).loss))
    return rss.peak


def peak_memory_ratios(model_name: str, batch: int, seq: int) -> dict[str, float]:
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
    modes = {"full": "full", "top_half": "top_half", "full_compensated": "full:compensated", "top_half_compensated": "top_half:compensated"}
    return {f"{tag}/peak_memory_over_inference": child(mode) / inference for tag, mode in modes.items()}


def model_arguments(description: str) -> argparse.ArgumentParser:
    """The options every ZO benchmark takes: the model config, the batch, the repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="builtin", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    return parser


def main() -> None:
    parser = model_arguments(__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.child:
        print(_peak_rss_child(args.model, args.batch, args.seq, args.child))
        return
    report = {"model": args.model, "batch": args.batch, "seq": args.seq, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    report.update(measure(args.model, args.batch, args.seq, args.repeats))
    report.update(peak_memory_ratios(args.model, args.batch, args.seq))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}, indent=2))


if __name__ == "__main__":
    main()
