"""An exclusive lock on a file, for caches shared by concurrent worker processes (bench, Ray, Slurm).

``fcntl.flock`` is released by the kernel when its holder dies, so a killed worker never leaves a stale
lock. Where locking is unavailable (no ``fcntl``, a file system that refuses it) the block runs unlocked:
the caches also write atomically, so the worst case is the same work done twice, never a broken file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("antibackdoor")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if missing); yields whether the lock is really held."""
    path = Path(path)
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")  # noqa: SIM115 - closed below
    except (ImportError, OSError) as exc:  # not POSIX, or a read-only folder
        log.debug("cannot lock %s (%s); continuing without the lock", path, exc)
        yield False
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as exc:
            log.debug("cannot lock %s (%s); continuing without the lock", path, exc)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool | None]:
    """Take an exclusive lock on ``path`` without waiting: yields True (held), False (another process holds
    it) or None (locking unavailable here; the block runs anyway)."""
    path = Path(path)
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")  # noqa: SIM115 - closed below
    except (ImportError, OSError) as exc:
        log.debug("cannot lock %s (%s); continuing without the lock", path, exc)
        yield None
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError as exc:
            log.debug("cannot lock %s (%s); continuing without the lock", path, exc)
            yield None
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
