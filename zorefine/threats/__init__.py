"""Threats: the perturbations that break safety (weight/activation noise, quantization), and their registry."""

from zorefine.threats.core import (  # noqa: F401  (the public API; the family modules are split out next)
    ActivationNoise,
    BnbQuantization,
    RTNQuantization,
    Threat,
    WeightNoise,
    parse_threat,
    threatened,
)
