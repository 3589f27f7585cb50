"""The run directory (``--out``): checked before anything is written, then locked for the run.

A directory is usable when it does not exist yet, is empty, or is a looplm run (it holds the
lock file :data:`LOCK_FILE` every run creates, or checkpoints). Anything else is refused: the
trainer would otherwise replace files whose names a run uses (``metrics.jsonl``...).

The lock is ``fcntl.flock`` on :data:`LOCK_FILE`: the kernel drops it when the process ends, even
under ``kill -9``, so a crashed run never leaves a stale lock, and a second process on the same
directory fails at once instead of interleaving metrics and checkpoints. Under ``torchrun`` rank 0
takes the lock and tells every rank whether it could (:func:`lock_on_rank0`): without that, the
other ranks would wait in their next collective until the process group's timeout.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path

from looplm.errors import ConfigError
from looplm.train import distributed
from looplm.train.distributed import Dist

LOCK_FILE = "looplm.lock"
_RUN_MARKERS = re.compile(r"^(ckpt-\d{6,}|latest|best)$")
_held: dict[str, int] = {}  # resolved run directory -> open file descriptor holding its lock


def check_run_dir(path: Path) -> None:
    """Raise ConfigError if ``path`` cannot hold a run: a file, unwritable, or a directory of other files."""
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"--out {str(path)!r} is a broken symbolic link; choose a directory")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is a file, not a directory; choose a directory")
    if path.is_dir():
        names = os.listdir(path)
        if names and not any(n == LOCK_FILE or _RUN_MARKERS.match(n) for n in names):
            example = sorted(names)[0]
            raise ConfigError(f"--out {str(path)!r} holds files that are not a looplm run "
                              f"(e.g. {example!r}); choose a new or empty directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {str(path)!r} is not writable")
        return
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {str(path)!r} cannot be created: {str(parent)!r} is not a writable "
                          "directory")


def lock_run_dir(path: Path) -> None:
    """Create ``path`` and hold its lock until the process ends (or :func:`release`); idempotent."""
    key = str(path.resolve())
    if key in _held:
        return
    check_run_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory {str(path)!r}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"another looplm process is using {str(path)!r} (it holds {LOCK_FILE}); "
                              "wait for it to finish or choose another --out") from None
        raise ConfigError(f"cannot lock {str(path / LOCK_FILE)!r}: {exc.strerror}") from None
    _held[key] = fd


def lock_on_rank0(path: Path, d: Dist) -> None:
    """Rank 0 takes ``path``'s lock (:func:`lock_run_dir`) and broadcasts whether it could; a rank
    0 that could not raises its own ConfigError, every other rank one naming rank 0's failure. Every
    rank must call it (a collective)."""
    err = None
    if d.main:
        try:
            lock_run_dir(path)
        except ConfigError as exc:
            err = exc
    if distributed.broadcast_float(0.0 if err else 1.0, d) != 1.0:
        raise err or ConfigError(f"rank 0 could not lock the run directory {str(path)!r} (its error says "
                                 f"why); rank {d.rank} stops too")


def release(path: Path) -> None:
    """Drop the lock :func:`lock_run_dir` took on ``path`` (if any)."""
    fd = _held.pop(str(path.resolve()), None)
    if fd is not None:
        os.close(fd)
