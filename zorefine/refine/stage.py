"""refine: MeZO-style zeroth-order refinement of the selected layers, forward passes only."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
import functools
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from zorefine.distributed import processes as distributed
from zorefine.refine.curvature import CurvatureTracker
from zorefine.errors import ConfigError
from zorefine.refine.first_order import FIRST_ORDER_METHODS, FORWARD_COST, FirstOrderSettings, FirstOrderTrainer
from zorefine.distributed.processes import Processes
from zorefine.models.layers import find_decoder_layers
from zorefine.models.loading import write_json_atomic
from zorefine.models.objectives import encode_batch, response_nll, response_nll_terms
from zorefine.distributed.partitions import gathered, is_partitioned, partition_model
from zorefine.run import REFINED_DIR, SELECTION_FILE, SENSITIVITY_FILE, TARGETS_FILE, TRAJECTORY_FILE, Run
from zorefine.zo.prefix_cache import PrefixCache
from zorefine.config.refine import zo_settings
from zorefine.zo.replay import apply_records
from zorefine.models.selection import Selection, SelectionPolicy
from zorefine.refine.targets import TrainingPairs, training_pairs
from zorefine.threats import parse_threat, threatened
from zorefine.models.units import discover_units
from zorefine.zo.trajectory import TrajectoryWriter, environment, read_trajectory
from zorefine.zo.engine import ZOEngine, scheduled, step_seed

log = logging.getLogger(__name__)

# Keeps the stream that picks units apart from the one that draws directions.
_UNIT_SEED_OFFSET = 104729



def selection_for(run: Run, model: torch.nn.Module) -> Selection:
    """What to refine: ``refine.layers`` when given, else ``refine.selection_file``, else analyze's choice."""
    cfg = run.cfg.refine
    if cfg.layers is not None:
        decoder = find_decoder_layers(model)
        bad = [i for i in cfg.layers if not 0 <= i < len(decoder)]
        if bad:
            raise ConfigError(f"refine.layers {bad} out of range: the model has {len(decoder)} decoder layers")
        units = [unit for unit in discover_units(model, "layer") if unit.layer in set(cfg.layers)]
        return Selection.of(units, "layer", SelectionPolicy("names", names=[u.name for u in units]), None)
    path = Path(cfg.selection_file) if cfg.selection_file else run.run_dir / SELECTION_FILE
    if not path.is_file():
        raise ConfigError(f"no selection: {path} is missing; run analyze, or set refine.layers or refine.selection_file")
    return Selection.load(path)


def selection_for_method(run: Run, model: torch.nn.Module) -> Selection:
    """The units a ZO method refines: the analyzer's choice, every layer, or as many random units."""
    cfg = run.cfg.refine
    if cfg.method == "zo_full":
        units = discover_units(model, "layer")
        return Selection.of(units, "layer", SelectionPolicy("names", names=[u.name for u in units]), None)
    chosen = selection_for(run, model)
    if cfg.method != "zo_random":
        return chosen
    # The control for layer selection: as many units of the same granularity, chosen blindly.
    candidates = discover_units(model, chosen.granularity)
    rng = random.Random(f"{cfg.seed}:random-units")
    picked = sorted(rng.sample(range(len(candidates)), len(chosen.units)))
    units = [candidates[i] for i in picked]
    return Selection.of(units, chosen.granularity, SelectionPolicy("names", names=[u.name for u in units]), "random")


def _zo_step_cost(cfg) -> int:
    """Forward passes of one ZO step: 2 per direction (+1 for L(θ) under the curvature schedule)."""
    return (2 * cfg.zo.num_directions + (cfg.unit_schedule == "curvature")) * cfg.grad_accum


def step_cost(cfg) -> int:
    """Forward-pass equivalents one step of ``cfg.method`` spends (a backward counts as two)."""
    if cfg.method in FIRST_ORDER_METHODS:
        return FORWARD_COST[cfg.method] * cfg.grad_accum
    return _zo_step_cost(cfg)


def steps_for(cfg) -> int:
    """Steps of ``cfg.method`` within the budget: ``refine.budget`` forward passes, else what
    ``refine.steps`` ZO steps of this configuration would spend (so baselines match ZO's cost)."""
    budget = cfg.budget if cfg.budget is not None else cfg.steps * _zo_step_cost(cfg)
    return budget // step_cost(cfg)


def analyzer_curvature(run: Run) -> dict[str, float]:
    """The analyze stage's ZO-curvature per unit, when this run has one (the tracker's prior)."""
    path = run.run_dir / SENSITIVITY_FILE
    if not path.is_file():
        return {}
    curvature = (json.loads(path.read_text()).get("curvature") or {}).get("units", {})
    return {unit: value["mean"] for unit, value in curvature.items() if value.get("mean") is not None}


def _observe(tracker: CurvatureTracker, record) -> None:
    if record.unit is not None and not record.skipped and record.loss_clean is not None:
        tracker.observe(record.unit, record.loss_plus, record.loss_minus, record.loss_clean, record.eps)


@dataclass
class StepBatch:
    """One step's training pairs and the weight of each in the objective."""

    pairs: list[tuple[str, str]]
    weights: list[float]

    def shard(self, processes: Processes) -> "StepBatch":
        """This process's share of the batch (data-parallel ZO: each process scores its share)."""
        return StepBatch(processes.shard(self.pairs), processes.shard(self.weights))

    def micro_batches(self, tokenizer, max_length: int, grad_accum: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        """``grad_accum`` encoded micro-batches with their example weights (None: all weigh 1)."""
        chunk = max(1, -(-len(self.pairs) // grad_accum))
        uniform = all(w == 1.0 for w in self.weights)
        return [
            (
                encode_batch(tokenizer, self.pairs[i : i + chunk], max_length),
                None if uniform else torch.tensor(self.weights[i : i + chunk]),
            )
            for i in range(0, len(self.pairs), chunk)
        ]


def reference_pairs(run: Run) -> TrainingPairs:
    """The ``train`` split's harmful->refusal and benign->answer pairs, as the data gives them."""
    harmful = [(e.prompt, e.response) for e in run.split("train", "harmful")]
    benign = [(e.prompt, e.response) for e in run.split("train", "benign")]
    return TrainingPairs(harmful, benign)


def refinement_pairs(run: Run, model, tokenizer) -> TrainingPairs:
    """The pairs of ``refine.targets``: the data's responses, or the starting model's own."""
    cfg = run.cfg.refine
    reference = reference_pairs(run)
    if cfg.targets == "reference":
        return reference
    started = time.perf_counter()
    pairs = training_pairs(model, tokenizer, reference.harmful, reference.benign, cfg.targets, cfg.target_tokens)
    log.info("[refine] %s targets: the start model's greedy responses in %.1f s", cfg.targets, time.perf_counter() - started)
    if run.processes.is_main:
        # What the objective asked for, to read next to the trajectory.
        write_json_atomic(run.run_dir / TARGETS_FILE, {"targets": cfg.targets, "harmful": pairs.harmful, "benign": pairs.benign})
    return pairs


def batch_sampler(run: Run, pairs: TrainingPairs | None = None) -> Callable[[int], StepBatch]:
    """Per-step training batches: half harmful->refusal, half benign->answer, seeded by step.

    Benign pairs weigh ``refine.benign_weight`` in the objective (1: every token counts the same).
    ``pairs`` defaults to the data's own (reference) responses.
    """
    pairs = pairs if pairs is not None else reference_pairs(run)
    harmful, benign = pairs.harmful, pairs.benign
    size = run.cfg.refine.batch_size
    seed = run.cfg.refine.seed
    benign_weight = float(run.cfg.refine.benign_weight)

    def sample(step: int) -> StepBatch:
        rng = random.Random(f"{seed}:{step}")
        n_harmful = (size + 1) // 2
        chosen_harmful = rng.sample(harmful, min(n_harmful, len(harmful)))
        chosen_benign = rng.sample(benign, min(size - n_harmful, len(benign)))
        return StepBatch(chosen_harmful + chosen_benign, [1.0] * len(chosen_harmful) + [benign_weight] * len(chosen_benign))

    return sample


def step_objective(
    run: Run, model, tokenizer, batch: StepBatch, step: int, cache: PrefixCache | None = None
) -> Callable[[], float]:
    """The alignment loss of one step's batch, over ``grad_accum`` micro-batches.

    The loss is the weighted mean over every response token of the batch. Under a launcher
    each process scores its share and only the two sums behind the mean are added across
    processes, so every process gets the same loss as one process scoring the whole batch.

    With ``refine.objective_threat`` the loss is that of the threatened model; the threat's
    seed is fixed for the step, so the + and − passes see the same noise sample. With an
    active ``cache`` (no layer below its first layer is refined) the unperturbed prefix is
    computed once here and every evaluation of the returned closure runs only the rest.
    """
    cfg = run.cfg.refine
    processes = distributed.current()
    micro = batch.shard(processes).micro_batches(tokenizer, run.cfg.data.max_length, cfg.grad_accum)
    threat = None
    if cfg.objective_threat:
        threat = parse_threat(cfg.objective_threat)
        if hasattr(threat, "seed"):
            threat = dataclasses.replace(threat, seed=step_seed(cfg.seed + 7919, step))

    # A threat on every decoder layer changes the prefix too: nothing to cache then.
    use_cache = cache is not None and cache.active and threat is None
    if use_cache:
        cache.capture_prefix([functools.partial(_forward, model, b) for b, _ in micro])

    def loss() -> float:
        with threatened(model, threat) if threat is not None else contextlib.nullcontext():
            with cache.replay() if use_cache else contextlib.nullcontext():
                terms = [response_nll_terms(model, b, w) for b, w in micro]
                total, weight = processes.sum([sum(float(t) for t, _ in terms), sum(float(w) for _, w in terms)])
                return total / max(weight, 1e-12)

    return loss


def _forward(model, batch: dict[str, torch.Tensor]) -> None:
    model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device))


# Refine settings that change how a step is computed, not its result.
HOW_NOT_WHAT = ("steps", "budget", "log_every", "prefix_cache", "store", "deepspeed")


def _same_trajectory(previous: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a logged run can be continued: same start, parameters and settings but the step count.

    Settings that change how, not what, is computed (prefix cache, weight store, ZeRO
    partitioning) may differ.
    """

    def settings(header: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in header.get("refine", {}).items() if k not in HOW_NOT_WHAT}

    def version(header: dict[str, Any]) -> int:
        return header.get("environment", {}).get("directions_version", 1)

    return (
        previous.get("base_checkpoint") == current["base_checkpoint"]
        and previous.get("parameters") == current["parameters"]
        and settings(previous) == settings(current)
        and version(previous) == version(current)
    )


def resume_records(engine: ZOEngine, log_path, header: dict[str, Any], max_steps: int) -> list:
    """Replay the steps a killed run logged (when its settings match) and return them."""
    previous_header, previous_steps = read_trajectory(log_path)
    if previous_header is not None and not _same_trajectory(previous_header, header):
        log.warning("[refine] %s belongs to another configuration; starting over", log_path)
        return []
    previous_steps = previous_steps[:max_steps]
    if previous_steps:
        apply_records(engine, previous_steps, header.get("unit_parameters"))
        log.info("[refine] resumed: replayed %d logged steps", len(previous_steps))
    return previous_steps


def run(run: Run) -> dict[str, Any]:
    """Refine with ``refine.method`` and write the refined checkpoint.

    ZO methods append each step to ``trajectory.jsonl`` (and resume from it); first-order
    baselines train every parameter by backprop on the same per-step batches.
    """
    started = time.perf_counter()
    checkpoint = run.aligned_checkpoint
    method = run.cfg.refine.method
    processes = run.processes
    if processes.distributed and method not in FIRST_ORDER_METHODS and run.cfg.refine.batch_size < processes.world_size:
        raise ConfigError(
            f"refine.batch_size={run.cfg.refine.batch_size} is smaller than the {processes.world_size} processes "
            "sharing each step's batch: raise it to at least the number of processes"
        )
    if processes.distributed and method in FIRST_ORDER_METHODS:
        log.warning("[refine] %s is not split across processes: each of the %d runs the whole batch", method, processes.world_size)
    model, tokenizer = run.load_model(checkpoint)
    # Self targets are decoded from the whole model, before ZeRO-3 splits it.
    pairs = refinement_pairs(run, model, tokenizer)
    if run.cfg.refine.deepspeed and method not in FIRST_ORDER_METHODS:
        model = partition_model(model, run.cfg.refine.deepspeed)
    refine = _first_order if method in FIRST_ORDER_METHODS else _zeroth_order
    summary = refine(run, model, tokenizer, pairs)
    out_dir = run.run_dir / REFINED_DIR
    info = {"stage": "refine", "method": method, "base": str(checkpoint), "layers": summary["layers"]}
    with gathered(model):
        run.save_checkpoint(model, tokenizer, out_dir, info)
    return {
        "method": method,
        "checkpoint": str(out_dir),
        "base": str(checkpoint),
        **summary,
        "forward_passes": step_cost(run.cfg.refine) * summary["steps"],
        # Self targets cost greedy decoding once, before the first step (batched decode calls).
        "target_decode_calls": pairs.generation_forward_passes,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _first_order(run: Run, model, tokenizer, pairs: TrainingPairs) -> dict[str, Any]:
    """A first-order baseline on every parameter, for the steps the budget allows."""
    cfg = run.cfg.refine
    steps = steps_for(cfg)
    settings = FirstOrderSettings(cfg.method, cfg.fo_lr, cfg.fo_weight_decay, cfg.sam_rho, cfg.rwp_sigma)
    params = dict(model.named_parameters())
    trainer = FirstOrderTrainer(model, params, settings, seed=cfg.seed)
    sample = batch_sampler(run, pairs)
    losses: list[float] = []
    progress = tqdm(range(steps), desc=f"refine ({cfg.method})")
    for step in progress:
        micro = sample(step).micro_batches(tokenizer, run.cfg.data.max_length, cfg.grad_accum)
        loss_fns = [functools.partial(response_nll, model, b, w) for b, w in micro]
        losses.append(trainer.step(step, loss_fns))
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
    trainer.release()
    finite = [loss for loss in losses if loss == loss]
    return {
        "layers": list(range(len(find_decoder_layers(model)))),
        "num_parameters": sum(p.numel() for p in params.values()),
        "steps": steps,
        "skipped_steps": len(losses) - len(finite),
        "first_loss": finite[0] if finite else None,
        "last_loss": finite[-1] if finite else None,
    }


def _per_step(total: float, steps: int) -> float | None:
    return round(total / steps, 6) if steps else None


def _zeroth_order(run: Run, model, tokenizer, pairs: TrainingPairs) -> dict[str, Any]:
    """ZO refinement of the method's selection, logged step by step (a killed run resumes)."""
    cfg = run.cfg.refine
    steps = steps_for(cfg)
    checkpoint = run.aligned_checkpoint
    selection = selection_for_method(run, model)
    layers, params = selection.layers, selection.resolve(model)
    unit_parameters = {unit.name: list(unit.params) for unit in selection.unit_objects(model)}
    tracker = None
    if cfg.unit_schedule == "curvature":
        tracker = CurvatureTracker(list(unit_parameters), prior=analyzer_curvature(run))
    refine_cfg = OmegaConf.to_container(cfg, resolve=True)
    engine = ZOEngine(params, settings=zo_settings(refine_cfg))
    # Layers below the first selected one are never perturbed: their output can be cached
    # (not with ZeRO-3, whose own hooks gather each layer's weights as it runs).
    partitioned = any(is_partitioned(p) for p in params.values())
    cache = PrefixCache(model, min(layers), keep_all=False) if cfg.prefix_cache and not partitioned else None
    header = {
        "base_checkpoint": str(checkpoint),
        "layers": layers,
        "units": selection.units,
        "parameters": list(params),
        "unit_parameters": unit_parameters,
        "refine": refine_cfg,
        "environment": environment(),
    }
    log_path = run.run_dir / TRAJECTORY_FILE
    records = resume_records(engine, log_path, header, steps)
    # Every process has read the log before the main process rewrites its tail.
    run.processes.barrier()
    if tracker is not None:
        for record in records:
            _observe(tracker, record)
    sample = batch_sampler(run, pairs)
    resumed_steps, loop_started, sent_before = len(records), time.perf_counter(), run.processes.bytes_communicated
    progress = tqdm(range(len(records), steps), desc="refine", initial=len(records), total=steps, disable=not run.processes.is_main)
    # Every process takes the same steps; the log is written once.
    with TrajectoryWriter(log_path, header, len(records), enabled=run.processes.is_main) as writer:
        for step in progress:
            loss_fn = step_objective(run, model, tokenizer, sample(step), step, cache)
            lr = scheduled(cfg.lr, step, steps, cfg.lr_schedule)
            eps = scheduled(cfg.zo.eps, step, steps, cfg.eps_schedule, final_fraction=0.1)
            unit = tracker.choose(step_seed(cfg.seed + _UNIT_SEED_OFFSET, step)) if tracker is not None else None
            names = unit_parameters[unit] if unit is not None else None
            record = engine.step(step, step_seed(cfg.seed, step), lr, loss_fn, eps=eps, names=names, evaluate_clean=unit is not None)
            record.unit = unit
            if tracker is not None:
                _observe(tracker, record)
            writer.append(record)
            records.append(record)
            progress.set_postfix(loss=f"{record.loss:.4f}", g=f"{record.projected_grad:+.3f}")
    losses = [r.loss for r in records if not r.skipped]
    return {
        "layers": layers,
        "units": selection.units,
        "num_parameters": engine.num_parameters,
        "steps": len(records),
        "skipped_steps": sum(r.skipped for r in records),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "trajectory": str(log_path),
        # What this run's own steps cost (replayed steps excluded): time, and what each
        # process sent to the others (two float64 sums per forward pass when distributed).
        "step_seconds": _per_step(time.perf_counter() - loop_started, len(records) - resumed_steps),
        "processes": run.processes.world_size,
        "bytes_sent_per_step": _per_step(run.processes.bytes_communicated - sent_before, len(records) - resumed_steps),
        **({"curvature": tracker.as_dict(), "reranked": tracker.ranking()} if tracker is not None else {}),
    }
