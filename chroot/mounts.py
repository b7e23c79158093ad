"""Mount bookkeeping and deletion that never goes through a mount point.

The classic build-server accident is `rm -rf` of a chroot whose /dev is still bind-mounted: it deletes
the host's /dev. Builds therefore mount only inside a private mount namespace (see nsrun.py), and every
deletion here (1) re-reads /proc/self/mountinfo and refuses if anything is mounted at or below the
directory, and (2) while walking, refuses to descend into any directory on another mount (compared by
the kernel's mount id, which also catches bind mounts of the same filesystem) and never follows symlinks.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from chroot.errors import ChrootError, MountedError

log = logging.getLogger(__name__)

# The calling thread's view: a build's overlay root lives in a mount namespace of the building thread
# (chroot.overlay), which /proc/self (the thread group leader's) does not show.
MOUNTINFO = "/proc/thread-self/mountinfo"
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    mount_point: str
    fstype: str
    source: str


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return _OCTAL.sub(lambda m: chr(int(m[1], 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) < 10:
            continue
        sep = parts.index("-", 6)
        mounts.append(Mount(int(parts[0]), int(parts[1]), unescape(parts[4]), unescape(parts[sep + 1]),
                            unescape(parts[sep + 2])))
    return mounts


def read_mounts(mountinfo: str = MOUNTINFO) -> list[Mount]:
    with open(mountinfo) as f:
        return parse_mountinfo(f.read())


def mounts_under(path: Path, mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points at or below `path` (after resolving symlinks), as the kernel lists them."""
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    return [m.mount_point for m in read_mounts(mountinfo)
            if m.mount_point == real or m.mount_point.startswith(prefix)]


def assert_unmounted(path: Path) -> None:
    found = mounts_under(path)
    if found:
        raise MountedError(f"refusing to delete {path}: still mounted there: {', '.join(sorted(found))}")


def _mnt_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in fdinfo")


def safe_rmtree(path: Path) -> None:
    """Delete `path` recursively, never crossing into another mount and never following symlinks.

    Refuses (MountedError, nothing deleted) if /proc/self/mountinfo shows a mount at or below `path`.
    A mount that appears during the walk is not entered (MountedError; what was deleted before stays
    deleted, nothing beyond the mount is touched).
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    assert_unmounted(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        root_mnt = _mnt_id(fd)
        _rm_contents(fd, str(path), root_mnt, st.st_dev)
    finally:
        os.close(fd)
    os.rmdir(path)


def _rm_contents(dir_fd: int, shown: str, root_mnt: int, dev: int) -> None:
    with os.scandir(dir_fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in entries:
        if not is_dir:
            os.unlink(name, dir_fd=dir_fd)
            continue
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            if os.fstat(fd).st_dev != dev or _mnt_id(fd) != root_mnt:
                raise MountedError(f"refusing to delete {shown}/{name}: it is on another mount")
            _rm_contents(fd, f"{shown}/{name}", root_mnt, dev)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)


def remove_entry(dir_fd: int, name: str, shown: str) -> None:
    """Remove `name` from the directory `dir_fd` whatever it is (missing: nothing to do), never following
    a symlink: a directory is emptied as safe_rmtree does (never crossing into another mount)."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        if os.fstat(fd).st_dev != os.fstat(dir_fd).st_dev or _mnt_id(fd) != _mnt_id(dir_fd):
            raise MountedError(f"refusing to delete {shown}: it is on another mount")
        _rm_contents(fd, shown, _mnt_id(fd), st.st_dev)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def inside(root: Path, rel: str) -> Path:
    """`root/rel`, refusing if a directory on the way below root is a symlink (it could point outside).

    The last component itself may be a symlink: callers replace it rather than write through it. For
    writes, use chroot.newfile's open_dir/replace_file (relative to directory descriptors, no component
    followed); this path is for reads and for handing a location to other tools.
    """
    parts = Path(rel).parts
    cur = Path(root)
    for i, part in enumerate(parts):
        if part in ("..", "/", "."):
            raise ChrootError(f"unsafe path {rel!r} in the build root")
        cur = cur / part
        if i < len(parts) - 1 and cur.is_symlink():
            raise ChrootError(f"{cur} is a symlink in the build root; refusing to write through it")
    return cur
