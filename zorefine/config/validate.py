"""One check of a composed config: every group's own checks, then the ones across groups."""

from __future__ import annotations

from omegaconf import DictConfig

from zorefine.config.align import check_align
from zorefine.config.analyze import check_analyze
from zorefine.config.checks import require
from zorefine.config.data import check_data
from zorefine.config.evaluate import check_evaluate
from zorefine.config.model import check_model
from zorefine.config.refine import check_refine
from zorefine.config.schema import STAGE_ORDER, Stage

# Refine methods that read the analyzer's selection (zo_random reads its size and granularity).
SELECTING_METHODS = ("zo", "zo_random")


RESUME_MODES = ("true", "false", "strict")


def resume_mode(value: object) -> str:
    """``resume`` as one of true / false / strict (Hydra hands booleans over as strings)."""
    mode = str(value).strip().lower()
    require(mode in RESUME_MODES, f"resume must be true, false or strict; got {value!r}")
    return mode


def analyze_needed(cfg: DictConfig) -> bool:
    """Whether analyze measures anything: not when the refine run after it uses no selection."""
    # A unit method's ablation table is a result in itself, whatever refine does next.
    if cfg.analyze.method != "perturbation":
        return True
    if cfg.refine.units_file not in (None, "analyze"):
        return False  # refine reads its unit set from the file: no layer ranking is needed
    return Stage.refine not in {Stage(s) for s in cfg.stages} or cfg.refine.method in SELECTING_METHODS


def check_choices(cfg: DictConfig, choices: dict[str, str | None]) -> None:
    """Checks that need the option chosen in each group (Hydra's ``runtime.choices``)."""
    # conf/model/local.yaml marks model.path mandatory (???), but merging a missing value keeps
    # the schema's null, which would silently mean "the built-in model".
    require(
        choices.get("model") != "local" or cfg.model.path is not None,
        "model=local needs model.path=/path/to/checkpoint (a local Hugging Face causal LM directory)",
    )


def validate(cfg: DictConfig) -> None:
    """Reject values and combinations the types cannot rule out, with one clear message."""
    require(len(cfg.stages) > 0, "stages: choose at least one of " + ", ".join(STAGE_ORDER))
    resume_mode(cfg.resume)
    check_model(cfg.model)
    check_data(cfg.data)
    check_align(cfg.align)
    check_analyze(cfg.analyze)
    check_refine(cfg.refine)
    check_evaluate(cfg.evaluate)
    needs_selection = cfg.refine.method in SELECTING_METHODS
    units_file = cfg.refine.units_file
    if units_file == "analyze":
        require(cfg.analyze.method != "perturbation" and Stage.analyze in cfg.stages,
                "refine.units_file=analyze refines a unit set this run's analyze writes: add 'analyze' to stages and set analyze.method=ssah|snip_diff|wanda_diff|safeseek")
    if Stage.refine in cfg.stages and needs_selection and cfg.refine.layers is None and cfg.refine.selection_file is None and units_file is None:
        require(
            Stage.analyze in cfg.stages,
            "refine needs a layer selection: add 'analyze' to stages, set refine.layers=[...] "
            "or refine.selection_file=PATH",
        )
