"""What the refinement objective asks the model to say: reference responses or its own.

The reference responses of a safety set pull the model toward new behaviour (the refusal
wording of the data set, benign answers it may never have fitted). Its own greedy responses
ask for nothing new: the smoothed loss of what the model already says rewards keeping that
behaviour under perturbation, which is what robustness is, without moving where the
harmful/benign boundary lies. ``self_benign`` anchors only the benign side that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from zorefine import distributed
from zorefine.config.refine import TARGET_MODES
from zorefine.models.generation import generate_with_ends


Pair = tuple[str, str]


@dataclass
class TrainingPairs:
    """The (prompt, response) pairs refinement draws its batches from, by kind."""

    harmful: list[Pair]
    benign: list[Pair]
    # Forward passes spent making the targets (greedy decoding: one per token per batch).
    generation_forward_passes: int = 0


def _own_responses(model, tokenizer, pairs: Sequence[Pair], max_new_tokens: int, batch_size: int) -> tuple[list[Pair], int]:
    """The model's greedy response to each prompt, shared by every process, and the decode
    calls spent (one per token per batch).

    A response cut at ``max_new_tokens`` comes back as ``(prompt, response, False)``: the
    objective then scores its tokens without an end of sequence after them, so refinement never
    teaches the model to stop mid-answer."""
    prompts = [prompt for prompt, _ in pairs]
    # Each process decodes its share; gathering in prompt order gives every process the same list.
    chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    answered = distributed.current().map_sharded(
        chunks, lambda chunk: generate_with_ends(model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size)
    )
    responses = [response for chunk_responses, _ in answered for response in chunk_responses]
    ended = [end for _, chunk_ends in answered for end in chunk_ends]
    own = [(prompt, response) if end else (prompt, response, False) for prompt, response, end in zip(prompts, responses, ended)]
    return own, len(chunks) * max_new_tokens


def training_pairs(
    model,
    tokenizer,
    harmful: Sequence[Pair],
    benign: Sequence[Pair],
    mode: str,
    max_new_tokens: int,
    batch_size: int = 64,
) -> TrainingPairs:
    """The pairs of ``mode``: ``reference`` keeps the data's responses; ``self`` replaces every
    response by the model's own greedy one; ``self_benign`` replaces only the benign ones."""
    if mode not in TARGET_MODES:
        raise ValueError(f"targets must be one of {', '.join(TARGET_MODES)}; got {mode!r}")
    result = TrainingPairs(list(harmful), list(benign))
    kinds = {"reference": (), "self": ("harmful", "benign"), "self_benign": ("benign",)}[mode]
    for kind in kinds:
        own, spent = _own_responses(model, tokenizer, getattr(result, kind), max_new_tokens, batch_size)
        setattr(result, kind, own)
        result.generation_forward_passes += spent
    return result
