"""Kernel `flock` locks: released by the kernel when the holder dies, even on kill -9."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from snapshotter.errors import LockedError


@contextmanager
def flocked(path: Path, what: str, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing).

    With `wait` = 0 a lock held by someone else raises LockedError (exit 75) at once; otherwise
    it is retried for up to `wait` seconds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    raise LockedError(f"{what} is locked by another process ({path}); try again later") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
