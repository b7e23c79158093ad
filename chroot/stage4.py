"""Pack a finished build's root as a stage4: the same root gives the same bytes.

GNU tar writes a POSIX (pax) archive with members sorted by name, every mtime set to one fixed time (the
tag's commit time), owners by number only (no user or group names), permissions, xattrs and ACLs; the
pax options drop atime and ctime and give the extended headers a name without tar's PID (`%p`, the
default, would differ from run to run). zstd compresses it in single-thread mode (the same input and
zstd version give the same frame; no file name or time is stored).

Left out (a stage is the system, not the build): the mounted trees and overlays (`var/db/repos/*`), the
package and distfile caches, the host's `resolv.conf`, the signing tmpfs' mount point, the build's logs
(`var/log/emerge*.log`, `var/log/portage`), Portage's build directory `var/tmp/portage`, `tmp/*`, and
what is mounted during a build (`proc`, `dev`, `sys` are kept as empty directories).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from chroot.errors import ChrootError
from chroot.newfile import new_file, write_all
from chroot.procs import die_with_parent

STAGE4_NAME = "stage4.tar.zst"

# Anchored tar patterns on member names (`./path`); `dir/*` drops a directory's contents, keeps it.
EXCLUDES = (
    "./proc/*", "./dev/*", "./sys/*", "./tmp/*",
    "./var/db/repos/*",
    "./var/cache/binpkgs/*", "./var/cache/distfiles/*",
    "./etc/resolv.conf",
    "./run/snapshotter-signing",
    "./var/log/emerge.log", "./var/log/emerge-fetch.log", "./var/log/portage",
    "./var/tmp/portage",
)

TAR_OPTIONS = ("--format=posix", "--sort=name", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls",
               "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime")
ZSTD_COMMAND = ("zstd", "--quiet", "--stdout", "-9", "--single-thread")


def pack_root(root: Path, dest: Path, mtime: int) -> tuple[str, int]:
    """Write the stage4 of `root` to `dest` (which must not exist); return (sha256, size).

    Written to a temporary name beside `dest` (never through a symlink) and linked into place: `dest`
    appears complete or not at all, and is never replaced. ChrootError if tar or zstd fails.
    """
    tar_cmd = ["tar", "--create", "--file=-", "--directory", str(root), *TAR_OPTIONS, f"--mtime=@{int(mtime)}",
               "--anchored", *(f"--exclude={p}" for p in EXCLUDES), "."]
    env = {**os.environ, "LC_ALL": "C"}
    digest = hashlib.sha256()
    size = 0
    with new_file(dest) as fd:
        tar = subprocess.Popen(tar_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                               preexec_fn=die_with_parent())
        assert tar.stdout is not None
        zstd = subprocess.Popen(ZSTD_COMMAND, stdin=tar.stdout, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, preexec_fn=die_with_parent())
        tar.stdout.close()  # zstd holds it now: tar gets SIGPIPE if zstd dies
        assert zstd.stdout is not None
        while chunk := zstd.stdout.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            write_all(fd, chunk)
        zstd.stdout.close()
        zstatus = zstd.wait()
        tar_err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
        tstatus = tar.wait()
        if tstatus != 0 or zstatus != 0:
            lines = [ln for ln in tar_err.strip().splitlines() if ln]
            raise ChrootError(f"packing the stage4 of {root} failed: tar exit {tstatus}, zstd exit {zstatus}"
                              + (f": {lines[-1]}" if lines else ""))
    return digest.hexdigest(), size
