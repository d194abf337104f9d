"""Threats: the perturbations that break safety (weight/activation noise, quantization), and their registry.

Where things live: :mod:`~zorefine.threats.base` holds the :class:`Threat` protocol and the
helpers the families share (mode names, argument checks, the (out, in) view of Conv1D/Linear
weights); one module per family: :mod:`~zorefine.threats.weight_noise` (:class:`WeightNoise`,
``wnoise:``), :mod:`~zorefine.threats.activation_noise` (:class:`ActivationNoise`, ``anoise:``),
:mod:`~zorefine.threats.quantization` (:class:`RTNQuantization`, ``rtn:``) and
:mod:`~zorefine.threats.bnb` (:class:`BnbQuantization`, ``bnb:``),
:mod:`~zorefine.threats.activation_quantization` (:class:`ActivationQuantization`, ``aquant:``, and
:class:`WeightActivationQuantization`, ``w8a8``/``w4a8``/``w4a4``),
:mod:`~zorefine.threats.finetune` (:class:`FineTuneAttack`, ``finetune:``) and
:mod:`~zorefine.threats.ablation` (:class:`MaskAblation`, the analyzer's unit removal);
:mod:`~zorefine.threats.apply` holds the :func:`threatened` context manager (apply, then restore
bit-exactly), and :mod:`~zorefine.threats.registry` the spec language (:func:`parse_threat`, the
one place that maps a spec's kind to its family's parser).
"""

from zorefine.threats.activation_noise import ActivationNoise  # noqa: F401  (the public API)
from zorefine.threats.activation_quantization import ActivationQuantization, WeightActivationQuantization  # noqa: F401
from zorefine.threats.apply import threatened  # noqa: F401
from zorefine.threats.base import Threat  # noqa: F401
from zorefine.threats.bnb import BnbQuantization  # noqa: F401
from zorefine.threats.finetune import FineTuneAttack  # noqa: F401
from zorefine.threats.quantization import RTNQuantization  # noqa: F401
from zorefine.threats.registry import parse_threat  # noqa: F401
from zorefine.threats.weight_noise import WeightNoise  # noqa: F401
