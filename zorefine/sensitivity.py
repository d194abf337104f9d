"""Layer sensitivity: how much safety degrades when only one decoder layer is perturbed."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from zorefine.generation import generate_responses
from zorefine.judge import RefusalJudge, Verdict
from zorefine.models.layers import find_decoder_layers
from zorefine.objectives import mean_response_nll
from zorefine.threats import WeightNoise, threatened


@dataclass
class SafetyProbe:
    """The harmful prompts (with their refusals) that a sensitivity analysis measures on."""

    pairs: list[tuple[str, str]]
    max_length: int = 256
    max_new_tokens: int = 12
    batch_size: int = 48

    @property
    def prompts(self) -> list[str]:
        return [prompt for prompt, _ in self.pairs]


@dataclass
class SafetyMeasure:
    """Safety loss (NLL of the refusal) and refusal rate of the model as it is now."""

    safety_loss: float
    refusal_rate: float


@dataclass
class LayerSensitivity:
    """One layer's fragility: mean and spread over noise seeds."""

    layer: int
    name: str
    num_parameters: int
    safety_loss_rise: float
    safety_loss_rise_std: float
    refusal_drop: float
    refusal_drop_std: float


def measure_safety(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probe: SafetyProbe, judge: RefusalJudge
) -> SafetyMeasure:
    """Safety loss and refusal rate on the probe prompts (greedy, short generations)."""
    loss = mean_response_nll(model, tokenizer, probe.pairs, probe.max_length, probe.batch_size)
    responses = generate_responses(model, tokenizer, probe.prompts, probe.max_new_tokens, probe.batch_size)
    verdicts = judge(probe.prompts, responses)
    return SafetyMeasure(loss, sum(v == Verdict.REFUSAL for v in verdicts) / len(verdicts))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def layer_sensitivity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probe: SafetyProbe,
    judge: RefusalJudge,
    sigma: float,
    seeds: Sequence[int],
    show_progress: bool = True,
) -> tuple[SafetyMeasure, list[LayerSensitivity]]:
    """Perturb each decoder layer alone with relative Gaussian weight noise, over seeds.

    Returns the clean measure and, per layer, the rise of the safety loss and the drop of
    the refusal rate against it. Weights are restored exactly after every trial.
    """
    layers = find_decoder_layers(model)
    clean = measure_safety(model, tokenizer, probe, judge)
    results = []
    trials = tqdm(total=len(layers) * len(seeds), desc="analyze", disable=not show_progress)
    for index in range(len(layers)):
        params = layers.parameters(index)
        loss_rises, refusal_drops = [], []
        for seed in seeds:
            with threatened(model, WeightNoise(sigma=sigma, mode="relative", seed=seed), params=params):
                noisy = measure_safety(model, tokenizer, probe, judge)
            loss_rises.append(noisy.safety_loss - clean.safety_loss)
            refusal_drops.append(clean.refusal_rate - noisy.refusal_rate)
            trials.update()
        loss_mean, loss_std = _mean_std(loss_rises)
        drop_mean, drop_std = _mean_std(refusal_drops)
        results.append(
            LayerSensitivity(
                layer=index,
                name=layers.name(index),
                num_parameters=sum(p.numel() for p in params.values()),
                safety_loss_rise=loss_mean,
                safety_loss_rise_std=loss_std,
                refusal_drop=drop_mean,
                refusal_drop_std=drop_std,
            )
        )
    trials.close()
    return clean, results


def rank_layers(results: Sequence[LayerSensitivity], rank_by: str) -> list[int]:
    """Layer indices, most fragile first (ties broken by the other score, then by index)."""
    if rank_by == "safety_loss":
        key = lambda r: (-r.safety_loss_rise, -r.refusal_drop, r.layer)  # noqa: E731
    elif rank_by == "refusal_drop":
        key = lambda r: (-r.refusal_drop, -r.safety_loss_rise, r.layer)  # noqa: E731
    else:
        raise ValueError(f"unknown rank_by {rank_by!r}")
    return [r.layer for r in sorted(results, key=key)]


def as_dicts(results: Sequence[LayerSensitivity]) -> list[dict]:
    """JSON-ready rows, with NaN turned into None."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()} for r in results]


def plot_sensitivity(results: Sequence[LayerSensitivity], selected: Sequence[int], path, sigma: float) -> None:
    """Bar plot of the safety-loss rise and refusal drop per layer; selected layers highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r.layer for r in results]
    colors = ["tab:red" if layer in selected else "tab:gray" for layer in layers]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].bar(layers, [r.safety_loss_rise for r in results], yerr=[r.safety_loss_rise_std for r in results], color=colors)
    axes[0].set_title("safety-loss rise (harmful prompts)")
    axes[1].bar(layers, [r.refusal_drop for r in results], yerr=[r.refusal_drop_std for r in results], color=colors)
    axes[1].set_title("refusal-rate drop")
    for axis in axes:
        axis.set_xlabel("decoder layer")
        axis.set_xticks(layers)
    fig.suptitle(f"Layer fragility under relative weight noise (σ={sigma}); red = selected for refinement")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
