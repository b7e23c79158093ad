"""Overlay build roots: the stage unpacked once (read-only, the lower layer), a fresh upper layer per build.

`overlay_root` mounts an overlayfs at the build's root inside a mount namespace of the calling thread's
own (unshare(2) CLONE_NEWNS, every mount made private first), so the host never sees the mount: it
vanishes when the thread goes back to its original namespace at the end of the build, and with the
process if that dies first (even by kill -9). Everything the thread starts meanwhile (tar, gpg, the
namespace runner with emerge) inherits that namespace; other threads of the process are not affected.

The lower layer must not change while a build uses it: the caller hands a directory it holds (an unpacked
stage in its cache, locked for the build's duration). Writes of the build land in `upper/`, beside the
root in the build's directory, and are deleted with it.

Where the namespace or the overlay cannot be made (no overlay support in the kernel, an upper layer on a
file system overlayfs refuses, a seccomp filter), `OverlayUnavailable` says why: the builder then extracts
the stage as before, and says so in the log.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chroot.errors import ChrootError
from chroot.procs import die_with_parent

CLONE_NEWNS = 0x00020000
# The calling thread's own mount namespace: /proc/self is the thread group leader's view.
THREAD_MOUNT_NS = "/proc/thread-self/ns/mnt"


class OverlayUnavailable(ChrootError):
    """An overlay root cannot be made here; the caller falls back to extracting the stage."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, preexec_fn=die_with_parent())


@contextmanager
def private_mount_namespace() -> Iterator[None]:
    """Run the body with the calling thread in a new mount namespace whose mounts are all private (none
    propagates to or from the host), then go back to the original one, which frees the new namespace and
    every mount made in it. OverlayUnavailable if the namespace cannot be made."""
    libc = _libc()
    original = os.open(THREAD_MOUNT_NS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.unshare(CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise OverlayUnavailable(f"unshare(CLONE_NEWNS): {os.strerror(err)}")
        try:
            proc = _mount("--make-rprivate", "/")
            if proc.returncode != 0:
                raise OverlayUnavailable(f"mount --make-rprivate /: {proc.stderr.strip()}")
            yield
        finally:
            _return_to(libc, original)
    finally:
        os.close(original)


def _return_to(libc: ctypes.CDLL, original: int) -> None:
    """setns(2) back to the original namespace. It fails (EINVAL) while another task shares this thread's
    file system attributes: a thread started meanwhile, which shares them until the very end of its exit
    (after a join returns). So it is retried for a moment; if it still fails, the private mounts would
    stay with this thread: said loudly rather than carried on silently."""
    for _ in range(50):
        if libc.setns(original, CLONE_NEWNS) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            break
        time.sleep(0.05)
    raise ChrootError(f"cannot return to the original mount namespace: {os.strerror(err)}")


def mount_overlay(lower: Path, build_dir: Path, root: Path) -> None:
    """Mount overlayfs at `root` (an empty directory): `lower` read-only below, `build_dir/upper` (with
    its work directory `build_dir/work`) above. Call it inside `private_mount_namespace`."""
    upper, work = build_dir / "upper", build_dir / "work"
    for path in (lower, upper, work):
        if "," in str(path) or ":" in str(path):
            raise OverlayUnavailable(f"{path}: a ',' or ':' in an overlay layer's path cannot be passed to mount")
    for d in (upper, work, root):
        d.mkdir(mode=0o755)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    proc = _mount("-t", "overlay", "-o", opts, "snapshotter-root", str(root))
    if proc.returncode != 0:
        raise OverlayUnavailable(f"mount -t overlay: {proc.stderr.strip() or proc.returncode}")


def unmount(root: Path) -> None:
    """Unmount the overlay at `root` (inside the private namespace; leaving it would do it too)."""
    proc = subprocess.run(["umount", str(root)], capture_output=True, text=True, preexec_fn=die_with_parent())
    if proc.returncode != 0:
        proc = subprocess.run(["umount", "--lazy", str(root)], capture_output=True, text=True,
                              preexec_fn=die_with_parent())
        if proc.returncode != 0:
            raise ChrootError(f"umount {root}: {proc.stderr.strip()}")
