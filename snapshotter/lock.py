"""Kernel `flock` locks: released by the kernel when the holder dies, even on kill -9."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from snapshotter.errors import LockedError, SnapshotterError


@contextmanager
def flocked(path: Path, what: str, wait: float = 0.0, *, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing); with `shared`, a shared one (any number of
    shared holders at once, none while someone holds it exclusively).

    With `wait` = 0 a lock held by someone else raises LockedError (exit 75) at once; otherwise
    it is retried for up to `wait` seconds.

    Lock files may live in directories others can write (the repository's top directory, which every
    pusher can write; a work directory under /var/tmp), so the file is opened with O_NOFOLLOW (a symlink
    planted at its name is refused, never followed) and O_NONBLOCK (a fifo planted there cannot hang us),
    must be a regular file, and is never truncated: our PID is written into it only when it is a file of
    our own with a single link (never into a hard link someone made to another file). The lock is the
    flock on this descriptor, nothing else. A holder may remove the lock file (the tree cache does when it
    removes a tree): who waited on the old file and gets its lock then finds the name gone or naming
    another file, and starts over with the file the name names now, so two holders never lock different
    files of one name. Only exclusive holders write their PID.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        fd = _open_lock(path)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotterError(f"lock file {path} is not a regular file; refusing to use it")
            while True:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if time.monotonic() >= deadline:
                        raise LockedError(f"{what} is locked by another process ({path}); try again later") from None
                    time.sleep(0.1)
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                continue  # removed or replaced while we waited: lock what the name names now (finally closes)
            if not shared and st.st_nlink == 1 and st.st_uid == os.geteuid():
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
            return
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def _open_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SnapshotterError(f"lock file {path} is a symlink; refusing to follow it (remove it if "
                                   "you did not make it)") from None
        raise SnapshotterError(f"cannot open the lock file {path}: {e.strerror}") from None
