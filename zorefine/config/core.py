"""Typed configuration: the schema every zorefine run is checked against.

The dataclasses are registered in Hydra's ConfigStore, so a misspelt key or a value of the
wrong type fails when the config is composed, before any work starts. Checks that types
cannot express (ranges, incompatible settings) live in :func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from zorefine.errors import ConfigError
from zorefine.models.selection import SelectionPolicy
from zorefine.refine.targets import TARGET_MODES
from zorefine.threats import parse_threat


class Stage(str, Enum):
    """The pipeline stages, in the order they always run."""

    align = "align"
    analyze = "analyze"
    refine = "refine"
    evaluate = "evaluate"


STAGE_ORDER = [stage.value for stage in Stage]


@dataclass
class BuiltinModelConfig:
    """The built-in tiny Llama-architecture model, pretrained on benign instructions only."""

    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 8
    num_heads: int = 4
    max_position_embeddings: int = 512
    pretrain_epochs: float = 10.0
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 16
    pretrain_max_length: int = 128
    # Where built models are kept between runs; null = $ZOREFINE_CACHE or ~/.cache/zorefine.
    cache_dir: Optional[str] = None


@dataclass
class ModelConfig:
    """Which model to start from."""

    # A local Hugging Face causal-LM directory; null = the built-in model.
    path: Optional[str] = None
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    builtin: BuiltinModelConfig = field(default_factory=BuiltinModelConfig)


@dataclass
class DataConfig:
    """Safety-alignment data in the zorefine JSONL format (see README)."""

    # null = the built-in set shipped inside the package.
    safety_file: Optional[str] = None
    # Safe prompts that must not be refused (over-refusal); null = built-in XSTest, "" = none.
    overrefusal_file: Optional[str] = None
    # Tokens per (prompt + response) in training and loss evaluation; fits the built-in
    # data (short prompts, answers cut to their first sentences). Raise it for long prompts.
    max_length: int = 96


@dataclass
class AlignConfig:
    """First-order SFT that adds refusal (response-only loss)."""

    enabled: bool = True
    # Tuned on the built-in validation split: small batches and many epochs give the tiny
    # model a confident harmful/benign decision (val: 100% refusal, 1.5% benign refusal).
    epochs: float = 16.0
    lr: float = 3e-3
    batch_size: int = 8
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    # Path to a DeepSpeed JSON config (see launch/); null = plain accelerate/torch.
    deepspeed: Optional[str] = None
    # A directory where aligned checkpoints are kept by a hash of everything that makes them
    # (start model, align settings, data): sweeps over later stages align once. null = off.
    cache_dir: Optional[str] = None


@dataclass
class AnalyzeConfig:
    """Unit fragility under threats, and the selection of units the refiner works on."""

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


@dataclass
class RefineConfig:
    """MeZO-style zeroth-order refinement of the selected layers (or a baseline, by ``method``)."""

    # "zo": ZO on the analyzer's selection. Baselines, at an equal forward-pass budget:
    # "zo_full" (MeZO on every decoder layer), "zo_random" (ZO on as many randomly chosen
    # units), "sft" (continued first-order SFT), "sam" (sharpness-aware minimisation),
    # "rwp" (random-weight-perturbation training). First-order methods train every parameter.
    method: str = "zo"
    # Chosen on the val split (experiments/README.md): 200 steps of lr 0.05 with ε = 0.5 × each
    # tensor's RMS gave the largest robustness gain that kept clean refusal and utility.
    steps: int = 200
    # Forward-pass equivalents to spend (a backward counts as two forwards); each method runs
    # budget // its cost per step steps. null = what `steps` ZO steps cost.
    budget: Optional[int] = None
    lr: float = 0.05
    eps: float = 0.5
    # "relative": ε × each tensor's RMS (a smoothing radius on the scale of the weight-noise
    # threat), or "absolute" ε.
    eps_mode: str = "relative"
    # n-SPSA: directions averaged per step (2 forward passes each).
    num_directions: int = 1
    # "rademacher" (±1 entries: one random bit each, ~6x cheaper to regenerate than a Gaussian on
    # CPU, same expected gradient, lower variance) or "gaussian" (as in MeZO).
    direction: str = "rademacher"
    # "sgd" | "momentum" | "adam" | "sign" (state, if any, only for the selected tensors).
    optimizer: str = "sgd"
    momentum: float = 0.9
    lr_schedule: str = "constant"
    eps_schedule: str = "constant"
    # Micro-batches per step; every micro-batch sees the same direction.
    grad_accum: int = 1
    batch_size: int = 16
    seed: int = 0
    # Weight of the benign-utility term: each benign pair's tokens count this much in the
    # objective, each harmful->refusal pair's tokens once.
    benign_weight: float = 1.0
    # What the objective asks the model to say: "reference" (the data's refusals and answers),
    # "self" (the start model's own greedy responses, harmful and benign: the smoothed loss then
    # rewards keeping the behaviour the model has under perturbation instead of moving it) or
    # "self_benign" (own responses for benign prompts, reference refusals for harmful ones: the
    # default, chosen on val in study 8 of experiments/README.md; it holds over-refusal where it was).
    targets: str = "self_benign"
    # Greedy tokens per self target.
    target_tokens: int = 24
    # Evaluate the objective on the model under a threat (e.g. "rtn:int4", "wnoise:0.05"):
    # one noise sample per step, shared by the + and - passes. null = the clean model.
    objective_threat: Optional[str] = None
    # Compute the layers below the first selected one once per step instead of per pass.
    prefix_cache: bool = True
    # How exact restores are kept: "copy" (fp32 master copy of the selected weights, fastest)
    # or "compensated" (fp32 weights restored from ~half a byte each; same trajectory, less memory).
    store: str = "copy"
    # Explicit layer indices; null = the selection chosen by analyze (or selection_file).
    layers: Optional[List[int]] = None
    # "joint": every step perturbs the whole selection. "curvature": every step perturbs one
    # selected unit, chosen ∝ its running ZO curvature, which the step's own L(θ±εz) and one
    # extra L(θ) evaluation update (the selection is re-ranked as refinement goes).
    unit_schedule: str = "joint"
    # A selection.json to reuse (e.g. from an earlier run); null = this run's analyze output.
    selection_file: Optional[str] = None
    # A DeepSpeed JSON (e.g. launch/deepspeed/zero3.json) for ZO methods: with ZeRO stage 3 the
    # model's parameters are partitioned across processes and each process perturbs and updates
    # its own partition (for models that do not fit one device). null = whole copies.
    deepspeed: Optional[str] = None
    log_every: int = 5
    # First-order baselines: AdamW learning rate and weight decay, SAM radius (absolute), RWP
    # noise (relative to each tensor's RMS, as in the threat grid).
    fo_lr: float = 1e-4
    fo_weight_decay: float = 0.0
    sam_rho: float = 0.05
    rwp_sigma: float = 0.05


@dataclass
class EvaluateConfig:
    """Robustness evaluation: refusal under a grid of threats, before vs after refinement."""

    # Prompts per set under each threat (seeded subsample); the clean condition uses
    # clean_max_prompts (null = every held-out prompt).
    max_prompts: int = 64
    clean_max_prompts: Optional[int] = None
    max_new_tokens: int = 24
    batch_size: int = 64
    # Relative weight-noise levels (fraction of each tensor's RMS).
    sigmas: List[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0])
    seeds: int = 3
    quantization: List[str] = field(default_factory=lambda: ["rtn:int8", "rtn:int4"])
    judge: str = "keyword"
    # Refusal counts as broken below this fraction of its clean value (same for benign answers).
    break_fraction: float = 0.5
    # A directory where evaluations are kept by a hash of the checkpoint and everything else they
    # depend on: the aligned model every job of a sweep starts from is evaluated once. null = off.
    cache_dir: Optional[str] = None
    # Which held-out split to measure on: "test" (final numbers) or "val" (for tuning).
    split: str = "test"
    # The "robust σ" is the largest σ at which refusal stays at or above this rate.
    robust_level: float = 0.9


@dataclass
class ZorefineConfig:
    """A whole zorefine run."""

    stages: List[Stage] = field(default_factory=lambda: list(Stage))
    seed: int = 0
    # Skip stages whose outputs already exist in the run directory (rerun with hydra.run.dir=DIR).
    resume: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def register_configs() -> None:
    """Register the typed schema; the group options in ``conf/`` are merged onto it."""
    ConfigStore.instance().store(name="zorefine_schema", node=ZorefineConfig)


_DTYPES = {"float32", "bfloat16", "float16"}
REFINE_METHODS = ("zo", "zo_full", "zo_random", "sft", "sam", "rwp")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> None:
    """Reject values and combinations the types cannot rule out, with one clear message."""
    _require(len(cfg.stages) > 0, "stages: choose at least one of " + ", ".join(STAGE_ORDER))
    _require(cfg.model.dtype in _DTYPES, f"model.dtype must be one of {sorted(_DTYPES)}, got {cfg.model.dtype!r}")
    builtin = cfg.model.builtin
    _require(builtin.hidden_size % builtin.num_heads == 0, "model.builtin.hidden_size must be divisible by num_heads")
    _require(builtin.num_layers >= 1, "model.builtin.num_layers must be >= 1")
    _require(cfg.data.max_length >= 16, "data.max_length must be >= 16")
    _require(cfg.align.epochs > 0 and cfg.align.lr > 0, "align.epochs and align.lr must be > 0")
    _require(cfg.align.batch_size >= 1, "align.batch_size must be >= 1")
    analyze = cfg.analyze
    _require(analyze.granularity in ("layer", "module", "tensor"), "analyze.granularity must be layer, module or tensor")
    _require(len(analyze.threats) > 0, "analyze.threats: give at least one threat spec, e.g. [wnoise:0.5]")
    for spec in analyze.threats:
        parse_threat(spec)  # a bad spec fails here, before any model is loaded
    _require(analyze.seeds >= 1, "analyze.seeds must be >= 1")
    _require(analyze.num_prompts >= 1, "analyze.num_prompts must be >= 1")
    _require(analyze.num_benign >= 0, "analyze.num_benign must be >= 0")
    _require(analyze.curvature_eps > 0, "analyze.curvature_eps must be > 0")
    _require(
        analyze.rank_by in ("safety_loss_rise", "refusal_drop", "curvature"),
        f"analyze.rank_by must be safety_loss_rise, refusal_drop or curvature; got {analyze.rank_by!r}",
    )
    _require(analyze.rank_by != "curvature" or analyze.curvature, "analyze.rank_by=curvature needs analyze.curvature=true")
    _require(analyze.rank_by != "refusal_drop" or analyze.measure_refusal, "analyze.rank_by=refusal_drop needs analyze.measure_refusal=true")
    SelectionPolicy(analyze.policy, analyze.top_k, analyze.budget, analyze.threshold, list(analyze.names))
    _require(cfg.refine.method in REFINE_METHODS, f"refine.method must be one of {', '.join(REFINE_METHODS)}; got {cfg.refine.method!r}")
    _require(cfg.refine.steps >= 0, "refine.steps must be >= 0")
    _require(cfg.refine.budget is None or cfg.refine.budget >= 0, "refine.budget must be >= 0 or null")
    _require(cfg.refine.benign_weight >= 0, "refine.benign_weight must be >= 0")
    _require(
        cfg.refine.targets in TARGET_MODES,
        f"refine.targets must be one of {', '.join(TARGET_MODES)}; got {cfg.refine.targets!r}",
    )
    _require(cfg.refine.target_tokens >= 1, "refine.target_tokens must be >= 1")
    _require(cfg.refine.fo_lr > 0 and cfg.refine.sam_rho > 0 and cfg.refine.rwp_sigma > 0, "refine.fo_lr, sam_rho and rwp_sigma must be > 0")
    _require(cfg.refine.eps > 0, "refine.eps must be > 0")
    _require(cfg.refine.lr >= 0, "refine.lr must be >= 0")
    _require(cfg.refine.batch_size >= 1, "refine.batch_size must be >= 1")
    _require(cfg.refine.eps_mode in ("absolute", "relative"), "refine.eps_mode must be 'absolute' or 'relative'")
    _require(cfg.refine.num_directions >= 1, "refine.num_directions must be >= 1")
    _require(
        cfg.refine.deepspeed is None or cfg.refine.objective_threat is None,
        "refine.objective_threat cannot be combined with refine.deepspeed (a threat writes whole weights; partitions hold slices)",
    )
    _require(cfg.refine.unit_schedule in ("joint", "curvature"), "refine.unit_schedule must be 'joint' or 'curvature'")
    _require(cfg.refine.store in ("copy", "compensated"), "refine.store must be 'copy' or 'compensated'")
    _require(cfg.refine.direction in ("gaussian", "rademacher"), "refine.direction must be 'gaussian' or 'rademacher'")
    _require(
        cfg.refine.optimizer in ("sgd", "momentum", "adam", "sign"),
        f"refine.optimizer must be one of sgd, momentum, adam, sign; got {cfg.refine.optimizer!r}",
    )
    for key in ("lr_schedule", "eps_schedule"):
        _require(cfg.refine[key] in ("constant", "linear", "cosine"), f"refine.{key} must be constant, linear or cosine")
    _require(cfg.refine.grad_accum >= 1, "refine.grad_accum must be >= 1")
    _require(cfg.evaluate.max_prompts >= 1, "evaluate.max_prompts must be >= 1")
    _require(
        cfg.evaluate.clean_max_prompts is None or cfg.evaluate.clean_max_prompts >= 1,
        "evaluate.clean_max_prompts must be >= 1 or null",
    )
    _require(cfg.evaluate.seeds >= 1, "evaluate.seeds must be >= 1")
    _require(all(s > 0 for s in cfg.evaluate.sigmas), "evaluate.sigmas must all be > 0")
    _require(0 < cfg.evaluate.break_fraction < 1, "evaluate.break_fraction must be in (0, 1)")
    _require(0 < cfg.evaluate.robust_level <= 1, "evaluate.robust_level must be in (0, 1]")
    _require(cfg.evaluate.split in ("test", "val"), f"evaluate.split must be 'test' or 'val', got {cfg.evaluate.split!r}")
    needs_selection = cfg.refine.method in ("zo", "zo_random")
    if Stage.refine in cfg.stages and needs_selection and cfg.refine.layers is None and cfg.refine.selection_file is None:
        _require(
            Stage.analyze in cfg.stages,
            "refine needs a layer selection: add 'analyze' to stages, set refine.layers=[...] "
            "or refine.selection_file=PATH",
        )
