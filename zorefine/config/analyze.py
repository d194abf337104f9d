"""The ``analyze`` group: how unit fragility is measured and which units are selected."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import DictConfig

from zorefine.config.checks import require
from zorefine.models.selection import SelectionPolicy
from zorefine.threats import parse_threat

RANKINGS = ("safety_loss_rise", "refusal_drop", "curvature")
METHODS = ("perturbation", "ssah", "snip_diff", "wanda_diff", "safeseek")


@dataclass
class UnitMethodConfig:
    """Settings of the unit-level methods (``analyze.method=ssah|snip_diff|wanda_diff``)."""

    # Training-split pairs of each kind the scores are computed on (harmful+refusal, benign+answer).
    prompts: int = 64
    # SSAH: the share of each group's units that is safety-critical, utility-critical, redundant.
    scu: float = 0.01
    ucu: float = 0.01
    ru: float = 0.2
    # Wei et al.: per linear map, top-q entries by safety score minus top-p by utility score.
    q: float = 0.03
    p: float = 0.03
    # SafeSeek: Adam steps on the mask logits, their learning rate, and the price of removing a unit.
    circuit_steps: int = 30
    circuit_lr: float = 0.1
    circuit_sparsity: float = 1.0
    # SafeSeek's second objective: weight of the refusals' NLL with only the circuit kept (0: off).
    circuit_sufficiency: float = 0.0
    # Validation prompts of each kind the ablation table is measured on, and random control sets per class.
    ablation_prompts: int = 48
    ablation_draws: int = 3
    max_new_tokens: int = 16
    batch_size: int = 16
    # A finetune threat spec (e.g. "finetune:20:lr=1e-4"): compare refusal after that benign
    # fine-tune with nothing frozen, the safety set frozen and (SSAH) SCU+CU frozen. null = off.
    finetune: Optional[str] = None


@dataclass
class AnalyzeConfig:
    """Unit fragility under threats, and the selection of units the refiner works on."""

    # "perturbation" (threaten each unit, measure the damage) or a unit method: "ssah" (SSAH's
    # neuron/channel classes), "snip_diff" or "wanda_diff" (Wei et al.'s weight set differences),
    # "safeseek" (a learned circuit of heads and neurons).
    method: str = "perturbation"
    units: UnitMethodConfig = field(default_factory=UnitMethodConfig)
    # "layer" (decoder layers), "module" (attention / MLP / norms of each layer) or "tensor".
    granularity: str = "layer"
    # Threat specs applied to one unit at a time (see zorefine.threats); random ones per seed.
    threats: List[str] = field(default_factory=lambda: ["wnoise:0.5"])
    seeds: int = 3
    # Average each noise sample with its mirror image (-z): cancels the first-order term.
    antithetic: bool = True
    num_prompts: int = 48
    num_benign: int = 48
    # Generate and judge refusals under every trial (the refusal-drop score); false: losses only.
    measure_refusal: bool = True
    max_new_tokens: int = 12
    # ZO-curvature score (L(θ+εz)+L(θ−εz)−2L(θ))/ε² per unit at relative radius curvature_eps.
    curvature: bool = True
    curvature_eps: float = 0.05
    # "safety_loss_rise", "refusal_drop" or "curvature".
    rank_by: str = "safety_loss_rise"
    # Selection policy: "top_k", "budget" (fraction of decoder parameters), "threshold" or "names".
    policy: str = "top_k"
    top_k: int = 2
    budget: float = 0.25
    threshold: float = 0.0
    names: List[str] = field(default_factory=list)
    batch_size: int = 48


def check_analyze(cfg: DictConfig) -> None:
    """Ranges and combinations the ``analyze`` group's types cannot express."""
    require(cfg.granularity in ("layer", "module", "tensor"), "analyze.granularity must be layer, module or tensor")
    require(len(cfg.threats) > 0, "analyze.threats: give at least one threat spec, e.g. [wnoise:0.5]")
    for spec in cfg.threats:
        # A bad spec fails here, before any model is loaded.
        require(not hasattr(parse_threat(spec), "with_data"), f"analyze.threats: {spec!r} is a fine-tuning attack, an evaluate threat only")
    require(cfg.seeds >= 1, "analyze.seeds must be >= 1")
    require(cfg.num_prompts >= 1, "analyze.num_prompts must be >= 1")
    require(cfg.num_benign >= 0, "analyze.num_benign must be >= 0")
    require(cfg.curvature_eps > 0, "analyze.curvature_eps must be > 0")
    require(cfg.rank_by in RANKINGS, f"analyze.rank_by must be safety_loss_rise, refusal_drop or curvature; got {cfg.rank_by!r}")
    require(cfg.rank_by != "curvature" or cfg.curvature, "analyze.rank_by=curvature needs analyze.curvature=true")
    require(cfg.rank_by != "refusal_drop" or cfg.measure_refusal, "analyze.rank_by=refusal_drop needs analyze.measure_refusal=true")
    require(cfg.method in METHODS, f"analyze.method must be one of {', '.join(METHODS)}; got {cfg.method!r}")
    units = cfg.units
    require(units.prompts >= 1 and units.ablation_prompts >= 1, "analyze.units.prompts and analyze.units.ablation_prompts must be >= 1")
    require(all(0 <= units[k] < 1 for k in ("scu", "ucu", "ru")) and units.scu + units.ucu + units.ru < 1,
            "analyze.units.scu, ucu and ru are fractions of each group's units, in [0, 1), summing to less than 1")
    require(0 < units.q <= 1 and 0 <= units.p <= 1, "analyze.units.q must be in (0, 1] and analyze.units.p in [0, 1]")
    require(units.circuit_steps >= 1 and units.circuit_lr > 0 and units.circuit_sparsity >= 0 and units.circuit_sufficiency >= 0,
            "analyze.units.circuit_steps must be >= 1, circuit_lr > 0, circuit_sparsity >= 0 and circuit_sufficiency >= 0")
    require(units.ablation_draws >= 1, "analyze.units.ablation_draws must be >= 1")
    if units.finetune is not None:
        require(hasattr(parse_threat(units.finetune), "with_data"), f"analyze.units.finetune must be a finetune:STEPS spec, got {units.finetune!r}")
    require(units.max_new_tokens >= 1 and units.batch_size >= 1, "analyze.units.max_new_tokens and batch_size must be >= 1")
    SelectionPolicy(cfg.policy, cfg.top_k, cfg.budget, cfg.threshold, list(cfg.names))
