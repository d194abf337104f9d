"""Shared-cache files: concurrent writers and builders (processes, as the jobs of a sweep are)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from zorefine.files import build_once, write_atomic


def _write_many(path: str, tag: int) -> None:
    for i in range(200):
        write_atomic(path, f"{tag}:{i}\n".encode() * 50)


def test_concurrent_writers_of_one_file_never_fail_and_leave_a_whole_version(tmp_path):
    path = tmp_path / "cache" / "entry.json"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(str(path), tag)) for tag in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 50 and len(set(lines)) == 1  # one writer's whole version
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry.json"]  # no temporary file left
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_ready(directory: Path) -> bool:
    return (directory / "done").is_file()


def _build_slowly(out_dir: str, log: str) -> None:
    def build() -> Path:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "done").write_text("ok")
        return Path(out_dir)

    assert build_once(Path(out_dir), _is_ready, build) == Path(out_dir)


def test_two_processes_wanting_one_cache_entry_build_it_once(tmp_path):
    out_dir, log = tmp_path / "cache" / "model", tmp_path / "builds.log"
    context = multiprocessing.get_context("spawn")
    builders = [context.Process(target=_build_slowly, args=(str(out_dir), str(log))) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join(60)
    assert [b.exitcode for b in builders] == [0, 0]
    assert len(log.read_text().splitlines()) == 1
    # Ready already: nothing is built and no lock is taken.
    assert build_once(out_dir, _is_ready, lambda: (_ for _ in ()).throw(AssertionError("built again"))) == out_dir
