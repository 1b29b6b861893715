"""One writer per run directory.

``run_lock(out)`` takes an exclusive ``fcntl.flock`` on ``out/.gradreg.lock`` for as long as
a process writes the run. A second writer fails at once with :class:`RunLockedError` (exit
code 2 at the CLI). The kernel releases a flock when its holder dies, however it dies, so a
lock file left behind by a killed run never blocks ``--resume``: only a live holder counts,
the file's presence does not.

On systems without ``fcntl`` (Windows) the lock is skipped (our choice: no portable
equivalent that is also released on a crash).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".gradreg.lock"


class RunLockedError(ValueError):
    """Another live process is writing the same run directory."""


@contextmanager
def run_lock(out: str | Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold the run directory's write lock inside the ``with`` block."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        enabled = False
    if not enabled:
        yield
        return
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(f"{path} is being written by another gradreg process (pid {holder}); "
                                 "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message above; the flock is what counts
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
