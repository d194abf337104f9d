"""The one way a config check fails: a :class:`~zorefine.errors.ConfigError` with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

from zorefine.errors import ConfigError


def require_json_file(key: str, path: str | None) -> None:
    """A configured JSON file (e.g. a DeepSpeed config) must exist and parse, before any stage runs."""
    if path is None:
        return
    file = Path(path).expanduser()
    require(file.is_file(), f"{key}: no such file {file}")
    try:
        json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: {file} is not readable JSON ({error})") from error


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
