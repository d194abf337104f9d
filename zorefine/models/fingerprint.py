"""Content keys for the caches that let sweep jobs share work (aligned models, evaluations).

A key hashes everything a result depends on; a cache entry is only ever looked up by its key,
so a stale entry can be missed but never mistaken for a current one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_digest(path: str | Path) -> str:
    """SHA-256 of a (data) file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_fingerprint(directory: str | Path) -> list[list]:
    """``[name, size, mtime_ns, inode]`` of every file of a checkpoint directory.

    Lists, not tuples: a fingerprint read back from a JSON marker or log compares equal to a
    fresh one as it is.

    Cheap for any model size. Hard links of one checkpoint (how the align cache shares one)
    have the same fingerprint; a copy or a rewrite gets a new one, so it is recomputed.
    """
    files = sorted(p for p in Path(directory).iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino] for p in files]


def content_key(payload: Any) -> str:
    """A short hash of a JSON-serialisable payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
