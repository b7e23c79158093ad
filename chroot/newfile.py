"""A new file that appears complete or not at all and never replaces another: the chroot library's one
way to write its outputs (build.json, the stage4).

The content goes to a temporary name beside `dest` (O_CREAT|O_EXCL|O_NOFOLLOW: never through a planted
symlink), is fsynced and linked to `dest` with link(2), which fails if `dest` exists; the temporary name
is always removed. (The snapshotter's own writes go through snapshotter.fsutil; this library imports
nothing of snapshotter.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def new_file(dest: Path, mode: int = 0o644) -> Iterator[int]:
    """Yield a file descriptor to write `dest`'s content to; on a normal exit it is fsynced and linked to
    `dest`. An exception leaves no file at all."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, dest, follow_symlinks=False)
    finally:
        tmp.unlink(missing_ok=True)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
