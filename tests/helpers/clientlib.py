"""Client hosts of an edition, for the update script's tests: what `snapshotter client-config --out DIR`
wrote, installed into a client root the way its README says (the README's own commands, run with the
root's paths), and a snapshot of a root's files to show that nothing changed."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

from helpers import testlib

CONF = "etc/snapshotter-client.conf"
SCRIPT = "usr/local/sbin/snapshotter-autoupdate"


def readme_commands(readme: str, step: int) -> list[str]:
    """The indented command lines of step `step` ("2. Trust ...") of client-config's README."""
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{step}. "))
    out = []
    for line in lines[start + 1:]:
        if line.startswith(f"{step + 1}. ") or line.startswith("----") or line.startswith("What each update"):
            break
        if line.startswith("    ") and line.strip():
            out.append(line.strip())
    return out


def on_root(command: str, root: Path) -> str:
    """A README command with the client's absolute paths (/etc/..., /usr/..., /var/...) moved under `root`
    (for a client root that is a directory of the test, not a chroot)."""
    return re.sub(r"(?<=[\s>=])(/(?:etc|usr|var)/)", lambda m: f"{root}{m[1]}", command)


def install(out: Path, root: Path, *, chroot: bool = False) -> None:
    """Install client-config's files from `out` into `root` with the README's step 1 and 2 commands: run in
    `out` against root's paths (chroot=False), or inside the root with `chroot` (chroot=True, `out`
    copied into it first)."""
    readme = (out / "README").read_text()
    commands = readme_commands(readme, 1) + readme_commands(readme, 2)
    assert commands and all(not c.startswith("#") for c in commands)
    if chroot:
        inside = root / "root" / "client-config"
        subprocess.run(["cp", "-a", f"{out}/.", str(inside)], check=True)
        script = " && ".join(["cd /root/client-config", *commands])
        proc = subprocess.run(["chroot", str(root), "/bin/sh", "-c", script], capture_output=True, text=True)
    else:
        testlib.HOMES.append(root / "etc/portage/gnupg")
        script = " && ".join(on_root(c, root) for c in commands)
        proc = subprocess.run(["sh", "-c", script], cwd=out, capture_output=True, text=True)
    assert proc.returncode == 0, (commands, proc.stdout, proc.stderr)


def files(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, bytes | str]]:
    """Every entry below `root`: relative path -> (mode, content or symlink target); directories too."""
    state: dict[str, tuple[int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if any(rel_dir == s or rel_dir.startswith(s + "/") for s in skip):
            dirnames[:] = []
            continue
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(full)
            if os.path.islink(full):
                state[rel] = (st.st_mode, os.readlink(full))
            elif os.path.isdir(full):
                state[rel] = (st.st_mode, "<dir>")
            elif not stat.S_ISREG(st.st_mode):
                state[rel] = (st.st_mode, "<special>")
            else:
                with open(full, "rb") as f:
                    state[rel] = (st.st_mode, f.read())
    return state
