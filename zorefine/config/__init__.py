"""Typed configuration: one module per config group, each with its dataclass and its checks.

``schema`` assembles the groups into the run's schema and registers it with Hydra;
``validate`` runs every group's checks and the ones across groups. The shipped option files
of each group are in ``conf/`` (installed as ``zorefine.conf``); every field is described in
``docs/configuration.md``.
"""

from zorefine.config.model import BuiltinModelConfig, GGUFModelConfig, ModelConfig
from zorefine.config.refine import RefineConfig, zo_settings
from zorefine.config.schema import STAGE_ORDER, Stage, ZorefineConfig, register_configs
from zorefine.config.validate import validate

__all__ = [
    "BuiltinModelConfig", "GGUFModelConfig", "ModelConfig", "RefineConfig", "STAGE_ORDER", "Stage", "ZorefineConfig",
    "register_configs", "validate", "zo_settings",
]
