"""Error types that zorefine turns into one clear line and a non-zero exit."""

from __future__ import annotations


class ZorefineError(Exception):
    """Base class for user-facing errors: the message is shown as is, without a traceback."""


class ConfigError(ZorefineError):
    """A configuration value is invalid or settings are incompatible."""


class DataError(ZorefineError):
    """A dataset file is missing, empty or has a malformed row."""


class ModelError(ZorefineError):
    """A model path is missing or does not hold a causal language model."""
