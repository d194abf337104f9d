"""The ``refine`` group: the refinement loop, its objective and budget, and the engine's settings.

How the engine perturbs and updates (ε, directions, optimizer, weight store) is the engine's own
:class:`~zorefine.zo.engine.ZOSettings`, held here as ``refine.zo``: one definition, read by
refine, replay and the benchmarks alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, List, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from zorefine.config.checks import require, require_json_file
from zorefine.errors import ConfigError
from zorefine.threats import parse_threat
from zorefine.zo.engine import ZOSettings
from zorefine.zo.schedule import SCHEDULES

REFINE_METHODS = ("zo", "zo_full", "zo_random", "sft", "sam", "rwp", "fo_threat")
UNIT_SCHEDULES = ("joint", "curvature")
# What the objective asks the model to say (see ``RefineConfig.targets``).
TARGET_MODES = ("reference", "self", "self_benign")


def pipeline_zo_settings() -> ZOSettings:
    """The engine settings the pipeline ships: chosen on the val split (experiments/README.md).

    ε = 0.5 × each tensor's RMS: a smoothing radius on the scale of the weight-noise threat.
    """
    return ZOSettings(eps=0.5, eps_mode="relative")


@dataclass
class RefineConfig:
    """MeZO-style zeroth-order refinement of the selected layers (or a baseline, by ``method``)."""

    # "zo": ZO on the analyzer's selection. Baselines, at an equal forward-pass budget:
    # "zo_full" (MeZO on every decoder layer), "zo_random" (ZO on as many randomly chosen
    # units), "sft" (continued first-order SFT), "sam" (sharpness-aware minimisation),
    # "rwp" (random-weight-perturbation training), "fo_threat" (the gradient of the loss under
    # refine.objective_threat, straight-through for quantizers, applied at the clean weights).
    # First-order methods train every parameter, or only refine.units_file's set.
    method: str = "zo"
    # Chosen on the val split (experiments/README.md): 200 steps of lr 0.05 with ε = 0.5 × each
    # tensor's RMS gave the largest robustness gain that kept clean refusal and utility.
    steps: int = 200
    # Forward-pass equivalents to spend (a backward counts as two forwards); each method runs
    # budget // its cost per step steps. null = what `steps` ZO steps cost.
    budget: Optional[int] = None
    lr: float = 0.05
    # The engine: ε and its mode, directions per step, direction distribution, optimizer, store.
    zo: ZOSettings = field(default_factory=pipeline_zo_settings)
    # Schedules over the steps: "constant", "linear" or "cosine" (ε decays to a tenth of zo.eps).
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
    # A directory where self targets are kept by a hash of the start checkpoint and the setting,
    # so the runs of a sweep decode them once. null = decode in every run.
    targets_cache_dir: Optional[str] = None
    # Evaluate the objective on the model under a threat (e.g. "rtn:int4", "wnoise:0.05"):
    # one noise sample per step, shared by the + and - passes. null = the clean model.
    objective_threat: Optional[str] = None
    # Compute the layers below the first selected one once per step instead of per pass.
    prefix_cache: bool = True
    # Explicit layer indices; null = the selection chosen by analyze (or selection_file).
    layers: Optional[List[int]] = None
    # "joint": every step perturbs the whole selection. "curvature": every step perturbs one
    # selected unit, chosen ∝ its running ZO curvature, which the step's own L(θ±εz) and one
    # extra L(θ) evaluation update (the selection is re-ranked as refinement goes).
    unit_schedule: str = "joint"
    # A selection.json to reuse (e.g. from an earlier run); null = this run's analyze output.
    selection_file: Optional[str] = None
    # Refine only one unit set of a units.safetensors (written by analyze with a unit method):
    # the engine perturbs and updates just those entries (neurons, channels, heads, weights).
    # "analyze" = the file this run's analyze stage writes (analyze.method must be a unit method).
    units_file: Optional[str] = None
    units_set: str = "scu"
    # A DeepSpeed JSON (e.g. launch/deepspeed/zero3.json) for ZO methods: with ZeRO stage 3 the
    # model's parameters are partitioned across processes and each process perturbs and updates
    # its own partition (for models that do not fit one device). null = whole copies.
    deepspeed: Optional[str] = None
    log_every: int = 5
    # A ZO run whose loss stays above divergence_loss_factor × its first loss (and 1 nat above it)
    # for 5 steps, or a selected tensor whose RMS grows past divergence_weight_factor × its start,
    # has diverged. "stop": end refinement there, keep the weights of the last good step (rebuilt
    # exactly from the log), evaluate them, and exit non-zero; "continue": only warn.
    on_divergence: str = "stop"
    divergence_loss_factor: float = 2.0
    divergence_weight_factor: float = 10.0
    # First-order baselines: AdamW learning rate and weight decay, SAM radius (sam_rho_mode
    # "absolute": a ball in parameter space; "relative": scaled entry-wise by |θ|, adaptive SAM),
    # RWP noise (relative to each tensor's RMS, as in the threat grid).
    fo_lr: float = 1e-4
    fo_weight_decay: float = 0.0
    sam_rho: float = 0.05
    sam_rho_mode: str = "absolute"
    rwp_sigma: float = 0.05


def zo_settings(refine_cfg: DictConfig | Mapping[str, Any]) -> ZOSettings:
    """The engine settings of a ``refine`` section (a config, or a trajectory header's copy).

    Headers written before ``refine.zo`` existed kept the same fields flat in ``refine``.
    """
    section = OmegaConf.to_container(refine_cfg, resolve=True) if isinstance(refine_cfg, DictConfig) else dict(refine_cfg)
    values = section.get("zo", section)
    names = asdict(ZOSettings()).keys()
    chosen = {key: values[key] for key in names if key in values}
    if "adam_betas" in chosen:
        chosen["adam_betas"] = tuple(chosen["adam_betas"])
    return ZOSettings(**chosen)


def check_refine(cfg: DictConfig) -> None:
    """Ranges and combinations the ``refine`` group's types cannot express."""
    require(cfg.method in REFINE_METHODS, f"refine.method must be one of {', '.join(REFINE_METHODS)}; got {cfg.method!r}")
    require(cfg.steps >= 0, "refine.steps must be >= 0")
    require(cfg.budget is None or cfg.budget >= 0, "refine.budget must be >= 0 or null")
    require(cfg.benign_weight >= 0, "refine.benign_weight must be >= 0")
    require(cfg.targets in TARGET_MODES, f"refine.targets must be one of {', '.join(TARGET_MODES)}; got {cfg.targets!r}")
    require(cfg.target_tokens >= 1, "refine.target_tokens must be >= 1")
    require(cfg.fo_lr > 0 and cfg.sam_rho > 0 and cfg.rwp_sigma > 0, "refine.fo_lr, sam_rho and rwp_sigma must be > 0")
    require(cfg.lr >= 0, "refine.lr must be >= 0")
    require(cfg.batch_size >= 1, "refine.batch_size must be >= 1")
    try:
        zo_settings(cfg)  # the engine checks its own settings; name the config key in the message
    except ValueError as error:
        raise ConfigError(f"refine.zo.{error}") from None
    require(
        cfg.deepspeed is None or cfg.objective_threat is None,
        "refine.objective_threat cannot be combined with refine.deepspeed (a threat writes whole weights; partitions hold slices)",
    )
    if cfg.objective_threat is not None:
        require(not hasattr(parse_threat(cfg.objective_threat), "with_data"),
                "refine.objective_threat cannot be a finetune attack: ZO reads the loss of a fixed perturbed model")
    require(cfg.method != "fo_threat" or cfg.objective_threat is not None,
            "refine.method=fo_threat trains under refine.objective_threat: set it (e.g. refine.objective_threat=w4a4:g32)")
    require(cfg.sam_rho_mode in ("absolute", "relative"), f"refine.sam_rho_mode must be absolute or relative; got {cfg.sam_rho_mode!r}")
    if cfg.units_file is not None and cfg.method in ("zo_full", "zo_random"):
        raise ConfigError(f"refine.method={cfg.method} chooses its own units: it cannot take refine.units_file")
    if cfg.units_file is not None and cfg.method in ("sft", "sam", "rwp", "fo_threat"):
        require(cfg.fo_weight_decay == 0, "a first-order method on refine.units_file needs refine.fo_weight_decay=0 (decay would move the frozen entries)")
    require(cfg.unit_schedule in UNIT_SCHEDULES, "refine.unit_schedule must be 'joint' or 'curvature'")
    for key in ("lr_schedule", "eps_schedule"):
        require(cfg[key] in SCHEDULES, f"refine.{key} must be constant, linear or cosine")
    require(cfg.grad_accum >= 1, "refine.grad_accum must be >= 1")
    require_json_file("refine.deepspeed", cfg.deepspeed)
    require_json_file("refine.selection_file", cfg.selection_file)
    if cfg.units_file is not None:
        from pathlib import Path

        require(cfg.units_file == "analyze" or Path(cfg.units_file).is_file(), f"refine.units_file {cfg.units_file} does not exist (analyze with a unit method writes units.safetensors)")
        require(cfg.layers is None and cfg.selection_file is None, "refine.units_file replaces refine.layers and refine.selection_file: give one of them")
        require(cfg.deepspeed is None, "refine.units_file cannot be combined with refine.deepspeed (ZeRO-3 partitions are not unit slices)")
    require(cfg.on_divergence in ("stop", "continue"), f"refine.on_divergence must be stop or continue; got {cfg.on_divergence!r}")
    require(cfg.divergence_loss_factor > 1 and cfg.divergence_weight_factor > 1, "refine.divergence_loss_factor and divergence_weight_factor must be > 1")
