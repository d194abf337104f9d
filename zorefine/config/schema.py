"""The whole run's schema: the stages, the config groups, and their registration with Hydra.

The dataclasses are registered in Hydra's ConfigStore, so a misspelt key or a value of the
wrong type fails when the config is composed, before any work starts. Checks that types
cannot express (ranges, incompatible settings) live next to each group's dataclass and are run
together by :func:`zorefine.config.validate.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List

from hydra.core.config_store import ConfigStore

from zorefine.config.align import AlignConfig
from zorefine.config.analyze import AnalyzeConfig
from zorefine.config.data import DataConfig
from zorefine.config.evaluate import EvaluateConfig
from zorefine.config.model import ModelConfig
from zorefine.config.refine import RefineConfig


class Stage(str, Enum):
    """The pipeline stages, in the order they always run."""

    align = "align"
    analyze = "analyze"
    refine = "refine"
    evaluate = "evaluate"


STAGE_ORDER = [stage.value for stage in Stage]


@dataclass
class ZorefineConfig:
    """A whole zorefine run."""

    stages: List[Stage] = field(default_factory=lambda: list(Stage))
    seed: int = 0
    # Rerunning in an existing run directory (hydra.run.dir=DIR): "true" skips every stage whose
    # recorded settings, inputs and outputs are still current and runs the rest (and what follows
    # them) again; "strict" stops with one line instead of re-running a stage whose settings
    # changed; "false" runs every requested stage afresh.
    resume: str = "true"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def register_configs() -> None:
    """Register the typed schema; the group options in ``conf/`` are merged onto it."""
    ConfigStore.instance().store(name="zorefine_schema", node=ZorefineConfig)
