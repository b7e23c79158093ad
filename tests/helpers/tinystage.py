"""A tiny stand-in stage for real chroot builds that take seconds, and a mirror whose date tags drive it.

The stage is bash, a few coreutils and their shared libraries, and an `emerge` script that sleeps for the
seconds named in the tree's BUILD_SECONDS, fails if the tree has FAIL, and writes one package holding
the tree's VERSION (tests/service/test_worker.py, test_pg_hosts.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from helpers import testlib
from helpers.servicelib import git_run

STAND_IN_EMERGE = """#!/bin/bash
echo "stand-in emerge $*"
secs=$(cat /var/db/repos/gentoo/BUILD_SECONDS)
sleep "$secs"
if [ -e /var/db/repos/gentoo/FAIL ]; then echo "stand-in build fails on purpose"; exit 1; fi
mkdir -p /var/cache/binpkgs/app-misc/fake
cat /var/db/repos/gentoo/VERSION > /var/cache/binpkgs/app-misc/fake/fake-1.gpkg.tar
"""


def tiny_stage(dest: Path) -> Path:
    """A minimal root: bash + coreutils it needs + their shared libraries + the stand-in emerge."""
    root = dest.parent / "tiny-root"
    for d in ("usr/bin", "usr/lib", "lib64", "etc/portage", "root", "var/lib/portage"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    for name in ("bash", "env", "sleep", "cat", "mkdir"):
        exe = shutil.which(name)
        assert exe
        shutil.copy2(os.path.realpath(exe), root / "usr/bin" / name)
        ldd = subprocess.run(["ldd", exe], capture_output=True, text=True).stdout
        for lib in re.findall(r"(/\S+\.so[.\d]*)", ldd):
            target = root / lib.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(lib), target)
    emerge = root / "usr/bin/emerge"
    emerge.write_text(STAND_IN_EMERGE)
    emerge.chmod(0o755)
    subprocess.run(["tar", "-C", str(root), "-cf", str(dest), "-I", "xz -0", "."], check=True)
    shutil.rmtree(root)
    return dest


def make_mirror(root: Path, tags: dict[str, dict[str, str]]) -> Path:
    """A bare mirror whose date tags hold small trees (BUILD_SECONDS, VERSION, ...)."""
    bare, work = root / "gentoo.git", root / "gentoo-work"
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(bare)], check=True)
    subprocess.run(["git", "init", "-q", "--initial-branch=main", str(work)], check=True)
    for tag, files in tags.items():
        testlib.write_tree(work, files)
        git_run(work, "add", "-A")
        git_run(work, "commit", "-q", "-m", f"Update portage tree to {tag}")
        git_run(work, "tag", "-a", "-m", tag, tag)
    git_run(work, "push", "-q", str(bare), "main", *tags)
    return bare
