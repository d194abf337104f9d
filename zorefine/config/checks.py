"""The one way a config check fails: a :class:`~zorefine.errors.ConfigError` with one clear line."""

from __future__ import annotations

from zorefine.errors import ConfigError


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
