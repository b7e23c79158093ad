"""Files on disk: digests, and (one implementation) writing a file atomically."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TEMP_INFIX = ".tmp."  # temporary names are `.NAME.tmp.RANDOM`, next to the file they will replace


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's content ("md5", "sha256", ...), read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def is_temp(name: str) -> bool:
    """Whether `name` is one of the temporary names `create_temp` makes (for cleaning up after a crash)."""
    return name.startswith(".") and TEMP_INFIX in name


def fsync_dir(directory: Path) -> None:
    """Make the renames and removals done in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A fresh random temporary name `.NAME.tmp.RANDOM` next to `path` (nothing is created)."""
    return path.with_name(f".{path.name}{TEMP_INFIX}{os.urandom(4).hex()}")


def create_temp(path: Path, mode: int = 0o644) -> tuple[int, Path]:
    """A new, empty file `.NAME.tmp.RANDOM` in the directory of `path`, open for writing: (fd, its path).

    Created with O_CREAT|O_EXCL|O_NOFOLLOW, so it is never a file that existed before and never the
    target of a symlink planted under that name; in the same directory, so renaming it over `path` is
    atomic. Its mode is exactly `mode` (whatever the umask). The caller closes the fd.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = temp_name(path)
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return fd, tmp
    raise FileExistsError(f"no free temporary name next to {path}")


def write_temp(path: Path, data: bytes, *, mode: int = 0o644, durable: bool) -> Path:
    """`data` in a new temporary file next to `path` (see `create_temp`), fsynced when `durable`;
    returns its path, for the caller to rename over `path` (removed again if writing fails)."""
    fd, tmp = create_temp(path, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, durable: bool) -> None:
    """Replace `path` with a file holding `data`: readers see the old content or the new, never a part.

    The one implementation of write-temp-then-rename: a temporary file is created next to `path`
    (O_CREAT|O_EXCL|O_NOFOLLOW: never through a planted symlink), written, fsynced when `durable`,
    renamed over `path`, and then the directory is fsynced when `durable`. On an error the temporary
    file is removed and `path` is left as it was.

    `durable=True` makes the new content survive a power loss or kernel crash once this returns (without
    it, the rename may reach the disk before the data, and a crash can leave an empty file). Who needs it:
    - yes: `state.json` (sync/state.py: what each push remote has, the last success and failure: losing it
      misreports `status` and repeats pushes); published snapshot files (publish/snapshots.py, which uses
      `write_temp`, `create_temp` and `fsync_dir` for its ordered multi-file renames: clients download
      them, and a side file must never point at an empty tarball); the post-receive hook
      (service/hooks.py: an empty hook after a crash would silently stop queuing builds).
    - no: the importer's tree cache (sync/importer.py: it is checked against the head commit and a missing
      or unreadable cache only costs time); the build child's result file (service/worker.py: read by its
      parent right after the child exits; after a machine crash the job runs again anyway).
    chroot/manifest.py cannot use this (the chroot library imports nothing of snapshotter): its `write`
    mirrors it for build.json (an O_EXCL|O_NOFOLLOW temporary, fsynced, then link(2), which never
    replaces an existing build.json).
    """
    tmp = write_temp(path, data, mode=mode, durable=durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
