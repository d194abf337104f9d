"""Typed configuration: one dataclass per config group, registered with Hydra."""

from zorefine.config.core import (  # noqa: F401
    STAGE_ORDER,
    BuiltinModelConfig,
    Stage,
    ZorefineConfig,
    register_configs,
    validate,
)
