"""The part of a build that mounts: runs as PID 1 of private mount + PID namespaces.

The builder starts it as
    unshare --mount --propagation private --pid --fork --kill-child -- python -m chroot.nsrun SPEC.json
with PR_SET_PDEATHSIG=SIGKILL on `unshare`. Every mount made here exists only in this namespace, and the
namespace lives only as long as its processes: if the builder dies (even kill -9), `unshare` is killed,
`--kill-child` kills this PID 1, the kernel kills every other process of the PID namespace (emerge and all
its children) and the mounts vanish with the last of them. Nothing here ever deletes anything.

SPEC.json: {"root": ..., "binds": [[host_dir, dir_in_root], ...], "argv": [...]}; argv is run as is (the
builder makes it `chroot ROOT env -i ... emerge ...`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

PREFIX = ">>> snapshotter:"


def say(msg: str) -> None:
    print(f"{PREFIX} {msg}", flush=True)


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)}: {proc.stderr.strip()}")


def _target(root: Path, rel: str) -> str:
    """A mount point inside root that is a real directory reached without symlinks."""
    path = root / rel
    if os.path.realpath(path) != str(path) or not path.is_dir():
        raise RuntimeError(f"{path}: not a plain directory inside the root (symlink?); refusing to mount there")
    return str(path)


def setup_mounts(root: Path, binds: list[tuple[str, str]]) -> None:
    _mount("--make-rprivate", "/")
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", _target(root, "proc"))
    for d in ("dev", "sys"):
        t = _target(root, d)
        _mount("--rbind", f"/{d}", t)
        _mount("--make-rslave", t)
    for host, rel in binds:
        _mount("--bind", host, _target(root, rel))


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    root = Path(spec["root"])
    if os.getpid() != 1:
        say("warning: not PID 1 of a new PID namespace")
    try:
        setup_mounts(root, [(h, r) for h, r in spec["binds"]])
    except RuntimeError as e:
        say(f"error: {e}")
        return 125
    say("mounted proc, dev (rslave), sys (rslave), " + ", ".join(r for _h, r in spec["binds"]) + "; entering the root")
    say("running: " + " ".join(spec["argv"][2:]))
    sys.stdout.flush()
    proc = subprocess.Popen(spec["argv"], stdin=subprocess.DEVNULL)
    # As PID 1, signals without a handler are ignored: pass SIGTERM/SIGINT on to the build.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
