"""Validation by ablation: remove a unit set and watch refusal, over-refusal and utility.

The safety-unit papers validate a safety set by zeroing it: refusal should collapse while
utility stays. Size alone breaks a model, so every set is compared with random sets of the same
shape (as many units per group, or entries per tensor), paired on the same prompts: the
difference in refusal, ablated set minus random set, per prompt and random draw, with a
bootstrap interval over draws and prompts. A set "breaks refusal beyond random" only when that
interval lies below zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from zorefine.judge import RefusalJudge, Verdict
from zorefine.models.generation import generate_responses
from zorefine.models.objectives import mean_response_nll
from zorefine.models.param_masks import Masks, count_entries
from zorefine.stats import hierarchical_bootstrap
from zorefine.threats import Threat, threatened
from zorefine.threats.ablation import MaskAblation

__all__ = ["AblationProbe", "AblationOutcome", "ablate_and_measure", "measure_under", "validate_sets"]


@dataclass
class AblationProbe:
    """Held-out prompts an ablation is measured on (never the ones the scores came from)."""

    harmful: list[str]
    safe: list[str]
    benign: list[tuple[str, str]]
    max_new_tokens: int = 24
    batch_size: int = 32
    max_length: int = 256


@dataclass
class AblationOutcome:
    """Per-prompt refusals (harmful, safe) and the utility loss of one model state."""

    harmful_refusals: list[int]
    safe_refusals: list[int]
    utility_loss: float

    def summary(self) -> dict[str, float]:
        """Refusal rate, over-refusal rate and utility loss."""
        return {
            "refusal": float(np.mean(self.harmful_refusals)) if self.harmful_refusals else float("nan"),
            "overrefusal": float(np.mean(self.safe_refusals)) if self.safe_refusals else float("nan"),
            "utility_loss": self.utility_loss,
        }


def _refusals(model, tokenizer, judge: RefusalJudge, prompts: Sequence[str], probe: AblationProbe) -> list[int]:
    if not prompts:
        return []
    answers = generate_responses(model, tokenizer, list(prompts), probe.max_new_tokens, probe.batch_size)
    return [int(v == Verdict.REFUSAL) for v in judge(list(prompts), answers)]


def ablate_and_measure(model, tokenizer, judge: RefusalJudge, probe: AblationProbe, masks: Masks | None) -> AblationOutcome:
    """The outcome with ``masks`` zeroed (``None``: the intact model); weights restored after."""
    return measure_under(model, tokenizer, judge, probe, [MaskAblation(masks)] if masks else [])


def measure_under(model, tokenizer, judge: RefusalJudge, probe: AblationProbe, threats: Sequence[Threat]) -> AblationOutcome:
    """The outcome under ``threats`` (none: the intact model); weights restored after."""
    with threatened(model, list(threats)):
        return AblationOutcome(
            _refusals(model, tokenizer, judge, probe.harmful, probe),
            _refusals(model, tokenizer, judge, probe.safe, probe),
            mean_response_nll(model, tokenizer, probe.benign, probe.max_length, probe.batch_size),
        )


def validate_sets(
    model,
    tokenizer,
    judge: RefusalJudge,
    probe: AblationProbe,
    sets: Mapping[str, Masks],
    random_like: Mapping[str, Callable[[torch.Generator], Masks]],
    total_parameters: int,
    draws: int = 3,
    seed: int = 0,
) -> dict[str, object]:
    """The ablation table: the intact model, each set, and its random controls, with paired intervals.

    ``random_like[label](generator)`` draws one random set shaped like ``sets[label]``.
    """
    clean = ablate_and_measure(model, tokenizer, judge, probe, None)
    rows = []
    for label, masks in tqdm(sets.items(), desc="ablation", leave=False):
        ablated = ablate_and_measure(model, tokenizer, judge, probe, masks)
        generator = torch.Generator().manual_seed(seed)
        controls = [ablate_and_measure(model, tokenizer, judge, probe, random_like[label](generator)) for _ in range(draws)]
        # draws × prompts: this set's refusal minus a same-shaped random set's, prompt by prompt.
        differences = np.asarray([np.subtract(ablated.harmful_refusals, c.harmful_refusals) for c in controls], dtype=float)
        interval = hierarchical_bootstrap(differences)
        random_summary = {key: float(np.mean([c.summary()[key] for c in controls])) for key in ("refusal", "overrefusal", "utility_loss")}
        rows.append({
            "set": label,
            "entries": count_entries(masks),
            "share": count_entries(masks) / total_parameters,
            **ablated.summary(),
            "random": random_summary,
            "refusal_minus_random": interval,
            "breaks_refusal_beyond_random": bool(interval["excludes_zero"] and interval["mean"] < 0),
        })
    return {"clean": clean.summary(), "draws": draws, "num_prompts": {"harmful": len(probe.harmful), "safe": len(probe.safe), "benign": len(probe.benign)}, "rows": rows}
