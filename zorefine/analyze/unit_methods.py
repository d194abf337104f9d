"""The unit-level analyzers: SSAH classes, Wei et al.'s SNIP / Wanda set differences, SafeSeek circuits.

``analyze.method=ssah|snip_diff|wanda_diff|safeseek`` scores units (or weight entries) on training-split
safety data (harmful prompts with their refusals) and utility data (benign prompts with their
answers), turns the scores into classes, validates every class by ablation on validation
prompts against random sets of the same shape (SafeSeek learns its circuit on the same
training data: :mod:`zorefine.analyze.safeseek`) (:mod:`zorefine.analyze.ablation`) and writes:

- ``units.json``: the method, its data, its cost in forward and backward passes, every class's
  size and share of the decoder's parameters, the ablation table and each layer's share of the
  safety set, and (with ``analyze.units.finetune``) the freezing comparison: refusal after a benign
  fine-tune with nothing, the safety set, or (SSAH) SCU+CU frozen (:mod:`zorefine.analyze.freezing`);
- ``units.safetensors``: the entry masks of every class (:func:`zorefine.models.param_masks.load_masks`);
- ``unit_scores.safetensors`` (SSAH, SafeSeek): every unit's scores, ``safety::GROUP`` and
  ``utility::GROUP`` importances or ``logit::GROUP`` mask logits;
- ``units.md`` and ``units.png``: the ablation (and freezing) tables, and refusal after each
  ablation next to its random controls;
- ``selection.json``: the decoder layers holding the largest share of the safety set, chosen by
  the configured selection policy, so a ZO refinement after it has layers to work on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from zorefine.analyze.ablation import AblationProbe, validate_sets
from zorefine.analyze.freezing import freeze_comparison
from zorefine.analyze.attribution import Passes, channel_statistics, snip_scores, ssah_scores, wanda_scores
from zorefine.analyze.sensitivity import ForwardCounter
from zorefine.analyze.safeseek import find_circuit, unit_width
from zorefine.analyze.units_report import plot_units, units_markdown
from zorefine.analyze.unit_classes import SSAH_CLASSES, set_difference, ssah_classes
from zorefine.judge.registry import configured_judge
from zorefine.models.layers import decoder_parameters, find_decoder_layers
from zorefine.files import write_json_atomic
from zorefine.models.neurons import decoder_linears, output_projections
from zorefine.models.param_masks import (
    Masks, count_entries, random_entries_like, random_units_like, save_masks, union_masks, units_to_masks,
)
from zorefine.models.selection import Selection, SelectionPolicy, select_units
from zorefine.models.units import discover_units
from zorefine.run import MASKS_FILE, SELECTION_FILE, UNITS_FILE, Run
from zorefine.threats import parse_threat

log = logging.getLogger(__name__)

UNIT_METHODS = ("ssah", "snip_diff", "wanda_diff", "safeseek")

SCORES_FILE = "unit_scores.safetensors"

Pair = tuple[str, str]


@dataclass
class UnitSets:
    """What a unit method found: its named entry-mask sets and how to draw a random twin of each."""

    sets: dict[str, Masks]
    random_like: dict[str, Callable[[torch.Generator], Masks]]
    # The set that carries safety (ablated to break refusal, frozen to keep it).
    safety_set: str
    # What the freezing comparison keeps fixed during a benign fine-tune, by label.
    freeze: dict[str, Masks] = field(default_factory=dict)
    passes: Passes = field(default_factory=Passes)
    details: dict[str, Any] = field(default_factory=dict)
    # Per-unit scores worth keeping (SSAH's importances, SafeSeek's mask logits), by name; Wei et
    # al.'s entry scores are as large as the model and are not kept.
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    # Sets saved for later use (freezing, alignment) but not ablated: SSAH's CU is most of the model.
    saved_only: dict[str, Masks] = field(default_factory=dict)


def _pairs(run: Run, kind: str, limit: int | None) -> list[Pair]:
    return [(e.prompt, e.response) for e in run.split("train", kind, limit=limit)]


def ssah_sets(run: Run, model, tokenizer, safety: list[Pair], utility: list[Pair]) -> UnitSets:
    """SSAH's SCU / UCU / RU / CU, each a set of MLP neurons and attention channels."""
    cfg = run.cfg.analyze.units
    groups, outputs = output_projections(model)
    scores, passes = {}, Passes()
    for label, pairs in (("safety", safety), ("utility", utility)):
        stats, spent = channel_statistics(model, tokenizer, pairs, outputs, run.cfg.data.max_length, cfg.batch_size)
        scores[label] = ssah_scores(groups, stats, outputs)
        passes.add(spent)
    classes = ssah_classes(scores["safety"], scores["utility"], {"scu": cfg.scu, "ucu": cfg.ucu, "ru": cfg.ru})
    sets = {name: units_to_masks(groups, classes[name]) for name in SSAH_CLASSES}
    random_like = {name: (lambda g, name=name: units_to_masks(groups, random_units_like(classes[name], g))) for name in SSAH_CLASSES}
    details = {"units": {name: int(sum(int(m.sum()) for m in classes[name].values())) for name in SSAH_CLASSES},
               "groups": len(groups), "fractions": {"scu": cfg.scu, "ucu": cfg.ucu, "ru": cfg.ru}}
    # CU is most of the model: ablating it measures nothing about safety and costs a full row.
    freeze = {"scu": sets["scu"], "scu+cu": union_masks(sets["scu"], sets["cu"])}
    kept = {f"{label}::{key}": value for label, by_group in scores.items() for key, value in by_group.items()}
    return UnitSets({k: v for k, v in sets.items() if k != "cu"}, random_like, "scu", freeze, passes, details, kept, {"cu": sets["cu"]})


def difference_sets(run: Run, model, tokenizer, safety: list[Pair], utility: list[Pair], score: str) -> UnitSets:
    """Wei et al.: per decoder linear map, top-q entries by safety score minus top-p by utility score."""
    cfg = run.cfg.analyze.units
    linears = decoder_linears(model)
    scores, passes = {}, Passes()
    for label, pairs in (("safety", safety), ("utility", utility)):
        if score == "snip":
            scores[label], spent = snip_scores(model, tokenizer, pairs, linears, run.cfg.data.max_length, cfg.batch_size)
        else:
            stats, spent = channel_statistics(model, tokenizer, pairs, linears, run.cfg.data.max_length, cfg.batch_size)
            scores[label] = {name: wanda_scores(module, stats[name]) for name, module in linears.items()}
        passes.add(spent)
    masks = {f"{name}.weight": set_difference(scores["safety"][name], scores["utility"][name], cfg.q, cfg.p) for name in linears}
    masks = {name: mask for name, mask in masks.items() if bool(mask.any())}
    return UnitSets({"safety": masks}, {"safety": lambda g: random_entries_like(masks, g)}, "safety", {"safety": masks}, passes,
                    {"q": cfg.q, "p": cfg.p, "score": score})


def circuit_sets(run: Run, model, tokenizer, safety: list[Pair], utility: list[Pair]) -> UnitSets:
    """SafeSeek: the heads and neurons whose removal the learned masks find refusal cannot do without."""
    cfg = run.cfg.analyze.units
    groups, outputs = output_projections(model)
    search = find_circuit(model, tokenizer, groups, outputs, safety, utility, cfg.circuit_steps, cfg.circuit_lr,
                          cfg.circuit_sparsity, cfg.batch_size, run.cfg.data.max_length, sufficiency=cfg.circuit_sufficiency)
    masks = units_to_masks(groups, search.channels(groups))
    widths = {g.key: unit_width(g) for g in groups}

    def random_circuit(generator: torch.Generator) -> Masks:
        # Random heads for heads and random neurons for neurons: the same structure as the circuit.
        drawn = random_units_like(search.circuit, generator)
        return units_to_masks(groups, {key: units.repeat_interleave(widths[key]) for key, units in drawn.items()})

    counts = {kind: sum(int(search.circuit[g.key].sum()) for g in groups if g.kind == kind) for kind in ("attention", "mlp")}
    totals = {kind: sum(search.circuit[g.key].numel() for g in groups if g.kind == kind) for kind in ("attention", "mlp")}
    details = {"heads": counts["attention"], "of_heads": totals["attention"], "neurons": counts["mlp"], "of_neurons": totals["mlp"],
               "steps": cfg.circuit_steps, "lr": cfg.circuit_lr, "sparsity": cfg.circuit_sparsity, "sufficiency": cfg.circuit_sufficiency,
               "loss_first": search.losses[0] if search.losses else None, "loss_last": search.losses[-1] if search.losses else None}
    logits = {f"logit::{key}": value for key, value in search.logits.items()}
    return UnitSets({"circuit": masks}, {"circuit": random_circuit}, "circuit", {"circuit": masks}, search.passes, details, logits)


def find_sets(run: Run, model, tokenizer) -> UnitSets:
    """The configured method's unit sets."""
    method, limit = run.cfg.analyze.method, run.cfg.analyze.units.prompts
    # Training-split data: the ablation that validates the sets reads the validation split.
    safety, utility = _pairs(run, "harmful", limit), _pairs(run, "benign", limit)
    if method == "ssah":
        return ssah_sets(run, model, tokenizer, safety, utility)
    if method == "safeseek":
        return circuit_sets(run, model, tokenizer, safety, utility)
    return difference_sets(run, model, tokenizer, safety, utility, "snip" if method == "snip_diff" else "wanda")


def ablation_probe(run: Run) -> AblationProbe:
    """Validation prompts for the ablation table."""
    cfg = run.cfg.analyze.units
    return AblationProbe(
        harmful=[e.prompt for e in run.split("val", "harmful", limit=cfg.ablation_prompts)],
        safe=run.overrefusal_prompts("val")[: cfg.ablation_prompts],
        benign=[(e.prompt, e.response) for e in run.split("val", "benign", limit=cfg.ablation_prompts)],
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        max_length=run.cfg.data.max_length,
    )


def layer_shares(model, masks: Masks) -> dict[str, float]:
    """Each decoder layer's share of the set's entries (sums to 1 over layers)."""
    layers = find_decoder_layers(model)
    total = max(count_entries(masks), 1)
    return {layers.name(i): sum(int(m.sum()) for name, m in masks.items() if name.startswith(layers.name(i) + ".")) / total
            for i in range(len(layers))}


def layer_selection(run: Run, model, shares: dict[str, float]) -> Selection:
    """The layers the policy picks when they are ranked by their share of the safety set."""
    cfg = run.cfg.analyze
    units = discover_units(model, "layer")
    ranking = sorted(shares, key=lambda name: (-shares[name], name))
    policy = SelectionPolicy(cfg.policy, cfg.top_k, cfg.budget, cfg.threshold, list(cfg.names))
    chosen = select_units(ranking, shares, {u.name: u.num_parameters for u in units}, policy)
    by_name = {u.name: u for u in units}
    return Selection.of([by_name[name] for name in chosen], "layer", policy, f"{cfg.method}:safety_share")


def run_unit_method(run: Run) -> dict[str, Any]:
    """Score, classify, validate by ablation and write ``units.json``, ``units.safetensors`` and ``selection.json``."""
    cfg = run.cfg.analyze
    started = time.perf_counter()
    checkpoint = run.aligned_checkpoint
    model, tokenizer = run.load_model(checkpoint)
    found = find_sets(run, model, tokenizer)
    total = sum(p.numel() for p in decoder_parameters(model).values())
    judge = configured_judge(run.cfg.evaluate.judge, run.cfg.evaluate.judge_path)
    with ForwardCounter(model) as counter:
        ablation = validate_sets(model, tokenizer, judge, ablation_probe(run), found.sets, found.random_like, total,
                                 draws=cfg.units.ablation_draws, seed=run.cfg.seed)
        freezing = None
        if cfg.units.finetune:
            attack = parse_threat(cfg.units.finetune).with_data(tokenizer, _pairs(run, "benign", None), run.cfg.data.max_length)
            freezing = freeze_comparison(model, tokenizer, judge, ablation_probe(run), attack, found.freeze, total)
    shares = layer_shares(model, found.sets[found.safety_set])
    selection = layer_selection(run, model, shares)
    seconds = round(time.perf_counter() - started, 1)
    report = {
        "checkpoint": str(checkpoint),
        "method": cfg.method,
        "data": {"split": "train", "safety_pairs": min(cfg.units.prompts, len(run.split("train", "harmful"))),
                 "utility_pairs": min(cfg.units.prompts, len(run.split("train", "benign")))},
        "details": found.details,
        "safety_set": found.safety_set,
        "decoder_parameters": total,
        "sets": {label: {"entries": count_entries(m), "share": count_entries(m) / total} for label, m in found.sets.items()},
        "ablation": ablation,
        "freezing": freezing,
        "layer_shares": shares,
        "selected": selection.units,
        "cost": {"attribution": {"forward": found.passes.forward, "backward": found.passes.backward},
                 "ablation_forward_calls": counter.count,
                 # Each fine-tune variant: one backward per step (its forwards are in the count above).
                 "finetune_backward": parse_threat(cfg.units.finetune).steps * (1 + len(found.freeze)) if cfg.units.finetune else 0,
                 "seconds": seconds},
    }
    if run.processes.is_main:
        save_masks(run.run_dir / MASKS_FILE, {**found.sets, **found.saved_only})
        if found.scores:
            save_file({k: v.contiguous() for k, v in found.scores.items()}, str(run.run_dir / SCORES_FILE))
        write_json_atomic(run.run_dir / UNITS_FILE, report)
        (run.run_dir / "units.md").write_text(units_markdown(report))
        plot_units(report, run.run_dir / "units.png")
        selection.save(run.run_dir / SELECTION_FILE)
    for row in ablation["rows"]:
        log.info("[analyze] %s %s: %.2f%% of decoder parameters, refusal %.3f (random %.3f), utility loss %.3f (random %.3f)%s",
                 cfg.method, row["set"], 100 * row["share"], row["refusal"], row["random"]["refusal"], row["utility_loss"],
                 row["random"]["utility_loss"], "" if row["breaks_refusal_beyond_random"] else " — not beyond random")
    for row in (freezing or {}).get("rows", []):
        log.info("[analyze] %s, frozen %s: refusal %.3f, utility loss %.3f", cfg.units.finetune, row["frozen"], row["refusal"], row["utility_loss"])
    return {"checkpoint": str(checkpoint), "method": cfg.method, "selected": selection.units, "units": str(run.run_dir / UNITS_FILE),
            "forward_passes": found.passes.forward + counter.count, "backward_passes": found.passes.backward, "seconds": seconds}
