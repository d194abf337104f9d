"""Named noise streams: analysis, training, validation and test never draw the same noise.

Every random threat draw has a seed. A seed is ``index`` within one named stream, and the
stream's number sits in the seed's high bits, so two streams cannot share a seed whatever the
indices: a setting tuned on validation (or trained against, as RWP and threat-aware objectives
are) has never seen a noise draw the test split measures on. Per-tensor directions are then
derived from the seed and the tensor's name (:func:`zorefine.zo.directions.tensor_seed`).
"""

from __future__ import annotations

STREAMS = ("analyze", "train", "val", "test")
# Indices per stream: far more than any run draws (2^40), and seeds stay below 2^43.
INDEX_BITS = 40


def stream_seed(stream: str, index: int) -> int:
    """Seed ``index`` of the named stream (``analyze``, ``train``, ``val`` or ``test``)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown noise stream {stream!r}; streams: {', '.join(STREAMS)}")
    index = int(index)
    if not 0 <= index < 1 << INDEX_BITS:
        raise ValueError(f"noise-stream index must be in [0, 2^{INDEX_BITS}), got {index}")
    return (STREAMS.index(stream) + 1) << INDEX_BITS | index


def stream_of(seed: int) -> str | None:
    """The stream a seed belongs to (None for a seed no stream made, e.g. a hand-written spec)."""
    number = int(seed) >> INDEX_BITS
    return STREAMS[number - 1] if 1 <= number <= len(STREAMS) else None
