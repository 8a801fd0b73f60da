"""Writing files so that no reader ever sees half of one, and hashing them: one home for the whole project.

Every file the project writes for another step to read (shard indexes, manifests, checkpoints, metrics, the
run's config, previews, staged shards) goes through :func:`atomic_write`: the bytes go to a temporary name
in the same directory, are fsynced, then renamed over the target, which POSIX makes atomic. The temporary
name ``.<name>.part-<pid>-<random>.tmp`` is a dot-file nothing reads, and carries the writer's pid so a
later run can tell a dead writer's leftovers from a live one's (:func:`remove_stale_temps`).
:func:`pool_context` picks how build and verify start their worker processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import secrets
import threading
from pathlib import Path
from typing import IO, Iterator

PART = ".part-"


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` (same directory, hence same filesystem for the rename)."""
    path = Path(path)
    return path.with_name(f".{path.name}{PART}{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` changes only when the block ends without an
    error, and then all at once; on an error the temporary file is removed and ``path`` keeps its old
    content. ``mode`` is ``"wb"`` (bytes) or ``"w"`` (UTF-8 text). The directory must exist."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode={mode!r}: use 'wb' or 'w'")
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Delete the temporary files of writers that died (their pid is gone); a live writer keeps its own."""
    for p in Path(directory).glob(f".*{PART}*"):
        pid = p.name.rsplit(PART, 1)[1].split("-", 1)[0]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            p.unlink(missing_ok=True)
        except PermissionError:  # a live process of another user
            pass


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """The hex sha256 of a file, read in ``chunk``-byte blocks (constant memory for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pool_context():
    """Worker processes by ``fork`` (cheap: they start with everything imported), unless this process already
    runs other threads (Ray, torch or DALI in a notebook, a test or a driver): a fork copies the locks those
    threads hold and a worker can hang on one forever, so such a process starts its workers from a clean
    ``forkserver`` instead."""
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else threading.active_count()
    return multiprocessing.get_context("fork" if threads == 1 else "forkserver")
