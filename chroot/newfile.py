"""The chroot library's one way to write files.

`new_file`: a new file that appears complete or not at all and never replaces another (build.json, the
stage4). The content goes to a temporary name beside `dest` (O_CREAT|O_EXCL|O_NOFOLLOW: never through a
planted symlink), is fsynced and linked to `dest` with link(2), which fails if `dest` exists; the
temporary name is always removed. (The snapshotter's own writes go through snapshotter.fsutil; this
library imports nothing of snapshotter.)

Writes into a build root (`open_dir`, `replace_file`, `replace_symlink`, `remove_entry`): a stage, above
all a stage4 packed from an earlier build in which any ebuild could plant links, may hold symlinks
anywhere. Every step is relative to a directory descriptor: directories are opened one component at a
time with O_NOFOLLOW (a symlinked component is one ChrootError line naming it), files are created
O_EXCL|O_NOFOLLOW under a temporary name and renamed over the entry (a rename replaces a planted link,
never follows it).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chroot.errors import ChrootError
from chroot.mounts import remove_entry

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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


def _refuse(shown: str, what: str) -> ChrootError:
    return ChrootError(f"{shown} is {what} in the build root; refusing to write through it")


def kind_at(dir_fd: int, name: str) -> str | None:
    """What `name` is in the directory `dir_fd` (never following it): "dir", "file", "symlink",
    "other", or None if missing."""
    try:
        mode = os.lstat(name, dir_fd=dir_fd).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "other"


def open_dir(root: Path, rel: str, create: bool = True) -> int:
    """A directory descriptor of ROOT/REL, opened one component at a time with O_NOFOLLOW (missing
    directories are created 0755 when `create`). A component that is a symlink or not a directory is
    one ChrootError line naming it. The caller closes the descriptor."""
    parts = [p for p in rel.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ChrootError(f"unsafe path {rel!r} in the build root")
    fd = os.open(root, _DIR_FLAGS)
    shown = str(root)
    try:
        for part in parts:
            shown = f"{shown}/{part}"
            kind = kind_at(fd, part)
            if kind is None and create:
                os.mkdir(part, 0o755, dir_fd=fd)
            elif kind is None:
                raise ChrootError(f"{shown} does not exist in the build root")
            elif kind != "dir":
                raise _refuse(shown, "a symlink" if kind == "symlink" else "not a directory")
            try:
                sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:  # swapped for a link since lstat
                raise _refuse(shown, f"not a plain directory ({e.strerror})") from None
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def replace_file(dir_fd: int, name: str, data: bytes, shown: str, mode: int = 0o644,
                 mtime_ns: int | None = None) -> None:
    """Make `name` in `dir_fd` a new regular file holding `data` (mode `mode`, mtime `mtime_ns` if
    given): written under a temporary name (O_EXCL|O_NOFOLLOW) and renamed over whatever was there. A
    symlink or file at `name` is replaced, never written through; a directory there is a ChrootError."""
    if kind_at(dir_fd, name) == "dir":
        raise ChrootError(f"{shown} is a directory in the build root; a file is needed there")
    tmp = f".{name}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise


def replace_symlink(dir_fd: int, name: str, target: str, shown: str) -> None:
    """Make `name` in `dir_fd` a symlink to `target`, replacing whatever was there (a directory is
    removed without following links or crossing mounts)."""
    remove_entry(dir_fd, name, shown)
    os.symlink(target, name, dir_fd=dir_fd)


def read_file(dir_fd: int, name: str, shown: str) -> bytes | None:
    """The content of the regular file `name` in `dir_fd`, None if missing; a symlink or anything but a
    regular file there is a ChrootError (opened O_NOFOLLOW|O_NONBLOCK: a fifo never blocks)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        kind = kind_at(dir_fd, name)
        raise _refuse(shown, "a symlink" if kind == "symlink" else f"unreadable ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse(shown, "not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)
