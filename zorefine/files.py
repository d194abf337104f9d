"""Files that several processes share: whole-or-nothing writes and one builder per cache entry.

Jobs of one sweep (a Hydra multirun, a SLURM array, a test run on several workers) share the
model and evaluation caches. A writer must never let a reader see half a file, two writers of one
file must not trip over each other's temporary file, and an expensive entry (a converted or
pretrained model) should be built by one of them while the others wait and reuse it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)
T = TypeVar("T")


def umask() -> int:
    """The process's file-creation mask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all, with permissions that follow the umask.

    Each writer gets its own temporary file beside ``path``, so concurrent writers of one path
    never remove each other's; the last rename wins, and every version is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # mkstemp creates private (0600) files; shared caches and shipped data follow the umask.
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_json_atomic(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write JSON so that readers never see a half-written file."""
    write_atomic(path, (json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n").encode())


@contextlib.contextmanager
def one_at_a_time(path: Path) -> Iterator[None]:
    """Hold the lock file beside ``path`` (``.NAME.lock``) while making ``path``; others wait.

    The lock is the operating system's, so a holder that is killed releases it. A process
    that has to wait says so, since the wait can be as long as the other's work.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.with_name(f".{path.name}.lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process that is making %s", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def in_turn(path: Path, ready: Callable[[], bool], make: Callable[[], T], alone: bool = True) -> T:
    """``make()``, in turn with the other processes that make ``path`` (:func:`one_at_a_time`).

    ``make`` reads ``path`` back when it is ready and makes it otherwise, so the first process
    makes it and the ones that waited read it. Nothing waits when ``path`` is ready already or
    when ``alone`` is false: the processes of one multi-process launch make a result together,
    and one of them waiting for another would never end.
    """
    if not alone or ready():
        return make()
    with one_at_a_time(path):
        return make()


def build_once(out_dir: Path, is_ready: Callable[[Path], bool], build: Callable[[], Path]) -> Path:
    """``out_dir`` when it already holds a finished entry, else what ``build()`` makes of it:
    the first of several builders builds it, the others wait and then find it ready."""
    return in_turn(out_dir, lambda: is_ready(out_dir), lambda: out_dir if is_ready(out_dir) else build())
