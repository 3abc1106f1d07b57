"""Durable file writes shared by job state, checkpoints and prepared datasets: readers never see half a file; and the
flock-held lock files of the job and sweep folders."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes, tmp: Path | None = None) -> None:
    """Write to a temporary file (default: hidden, per process, beside `path`), fsync, rename over `path`, fsync its
    folder."""
    path = Path(path)
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file` (created if missing) for the block: one writer of a state file at once."""
    with open(lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def try_lock(lock_file: Path):
    """Take an exclusive flock on `lock_file` without waiting, or return None if a live process holds it. Keep the
    returned file open for as long as the lock is held (the kernel releases it when the process dies)."""
    handle = open(lock_file, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def is_locked(lock_file: Path) -> bool:
    """Whether a live process holds the flock on `lock_file`."""
    handle = try_lock(lock_file)
    if handle is None:
        return True
    handle.close()
    return False
