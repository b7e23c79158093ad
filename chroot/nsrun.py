"""The part of a build that mounts: runs as PID 1 of private mount + PID namespaces.

The builder starts it as
    unshare --mount --propagation private --pid --fork --kill-child -- python -m chroot.nsrun SPEC.json
with PR_SET_PDEATHSIG=SIGKILL on `unshare`. Every mount made here exists only in this namespace, and the
namespace lives only as long as its processes: if the builder dies (even kill -9), `unshare` is killed,
`--kill-child` kills this PID 1, the kernel kills every other process of the PID namespace (emerge and all
its children) and the mounts vanish with the last of them. Nothing here ever deletes anything.

SPEC.json is a `NamespaceSpec` (its to_json/from_json are the format's only writer and reader):
{"root": ..., "binds": [[host_dir, dir_in_root], ...], "argv": [...]}; argv is run as is (the builder
makes it `chroot ROOT env -i ... emerge ...`). This module imports nothing but the standard library: it
runs as `python -m chroot.nsrun` with only the directory holding `chroot/` on the path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PREFIX = ">>> snapshotter:"


@dataclass(frozen=True)
class NamespaceSpec:
    """What the builder hands the namespace runner: the root, the bind mounts into it, the command."""

    root: Path
    binds: list[tuple[str, str]]  # (host directory, directory in the root, relative)
    argv: list[str]  # the chroot command, run as is

    def to_json(self) -> str:
        return json.dumps({"root": str(self.root), "binds": [list(b) for b in self.binds], "argv": self.argv})

    @classmethod
    def from_json(cls, text: str) -> NamespaceSpec:
        """The spec `to_json` wrote; ValueError if `text` is not one."""
        data = json.loads(text)
        try:
            root, binds, argv = data["root"], data["binds"], data["argv"]
            spec = cls(Path(root), [(h, r) for h, r in binds], list(argv))
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"not a namespace spec: {e!r}") from None
        if not (isinstance(root, str) and all(isinstance(s, str) for b in spec.binds for s in b)
                and all(isinstance(a, str) for a in spec.argv)):
            raise ValueError("not a namespace spec: root, binds and argv must be strings")
        return spec


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
    spec = NamespaceSpec.from_json(Path(spec_path).read_text())
    if os.getpid() != 1:
        say("warning: not PID 1 of a new PID namespace")
    try:
        setup_mounts(spec.root, spec.binds)
    except RuntimeError as e:
        say(f"error: {e}")
        return 125
    say("mounted proc, dev (rslave), sys (rslave), " + ", ".join(r for _h, r in spec.binds) + "; entering the root")
    say("running: " + " ".join(spec.argv[2:]))
    sys.stdout.flush()
    proc = subprocess.Popen(spec.argv, stdin=subprocess.DEVNULL)
    # As PID 1, signals without a handler are ignored: pass SIGTERM/SIGINT on to the build.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
