"""The part of a build that mounts: runs as PID 1 of private mount + PID namespaces.

The builder starts it as
    unshare --mount --propagation private --pid --fork --kill-child -- python -m chroot.nsrun SPEC.json
with PR_SET_PDEATHSIG=SIGKILL on `unshare`. Every mount made here exists only in this namespace, and the
namespace lives only as long as its processes: if the builder dies (even kill -9), `unshare` is killed,
`--kill-child` kills this PID 1, the kernel kills every other process of the PID namespace (emerge and all
its children) and the mounts vanish with the last of them. Nothing here ever deletes anything.

SPEC.json is a `NamespaceSpec` (its to_json/from_json are the format's only writer and reader):
{"root": ..., "binds": [[host_dir, dir_in_root], ...], "read_only": [[host_dir, dir_in_root], ...] (bind
mounts made read-only: the trees), "argv": [...], "private": null or
{"path": dir_in_root, "dirs": [[host_dir, name], ...], "files": [[host_file, name], ...]}}; argv is run as
is (the builder makes it `chroot ROOT env -i ... emerge ...`). This module imports nothing but the
standard library: it runs as `python -m chroot.nsrun` with only the directory holding `chroot/` on the path.

A private directory (the signing key's GnuPG home and passphrase) is a fresh tmpfs mounted in this
namespace only, into which the host files are copied: it exists for the build's duration, is never on
disk in the root, and vanishes with the namespace (also on kill -9). It is a copy rather than a bind
mount of the host's home: gpg writes into its home (lock files, the agent's sockets, the trust
database), which a read-only bind refuses and a writable one would let the build do to the host's keyring.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = ">>> snapshotter:"
PRIVATE_TMPFS_SIZE = "64m"


@dataclass(frozen=True)
class PrivateDir:
    """A tmpfs (mode 0700) at `path` in the root that only the namespace sees, holding copies of host
    directories (`dirs`: regular files and directories only, modes kept) and files (`files`: mode 0400),
    each as (host path, name under `path`)."""

    path: str  # relative to the root
    dirs: list[tuple[str, str]] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "dirs": [list(d) for d in self.dirs], "files": [list(f) for f in self.files]}

    @classmethod
    def from_dict(cls, data: object) -> PrivateDir:
        if not isinstance(data, dict):
            raise ValueError("not a private directory")
        priv = cls(data["path"], [(h, n) for h, n in data["dirs"]], [(h, n) for h, n in data["files"]])
        if not (isinstance(priv.path, str) and all(isinstance(x, str) for pair in priv.dirs + priv.files
                                                     for x in pair)):
            raise ValueError("private: path, dirs and files must be strings")
        names = [n for _h, n in priv.dirs + priv.files]
        if any(not n or "/" in n or n in (".", "..") for n in names) or len(set(names)) != len(names):
            raise ValueError("private: names must be distinct plain file names")
        return priv


@dataclass(frozen=True)
class NamespaceSpec:
    """What the builder hands the namespace runner: the root, the bind mounts into it, the command."""

    root: Path
    binds: list[tuple[str, str]]  # (host directory, directory in the root, relative)
    argv: list[str]  # the chroot command, run as is
    private: PrivateDir | None = None
    read_only: list[tuple[str, str]] = field(default_factory=list)  # like binds, mounted read-only

    def to_json(self) -> str:
        return json.dumps({"root": str(self.root), "binds": [list(b) for b in self.binds],
                           "read_only": [list(b) for b in self.read_only], "argv": self.argv,
                           "private": None if self.private is None else self.private.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> NamespaceSpec:
        """The spec `to_json` wrote; ValueError if `text` is not one."""
        data = json.loads(text)
        try:
            root, binds, argv, private = data["root"], data["binds"], data["argv"], data["private"]
            spec = cls(Path(root), [(h, r) for h, r in binds], list(argv),
                       None if private is None else PrivateDir.from_dict(private),
                       [(h, r) for h, r in data["read_only"]])
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"not a namespace spec: {e!r}") from None
        if not (isinstance(root, str) and all(isinstance(s, str) for b in spec.binds + spec.read_only for s in b)
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


def setup_mounts(root: Path, binds: list[tuple[str, str]], read_only: list[tuple[str, str]]) -> None:
    _mount("--make-rprivate", "/")
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", _target(root, "proc"))
    for d in ("dev", "sys"):
        t = _target(root, d)
        _mount("--rbind", f"/{d}", t)
        _mount("--make-rslave", t)
    for host, rel in binds:
        _mount("--bind", host, _target(root, rel))
    for host, rel in read_only:
        target = _target(root, rel)
        _mount("--bind", host, target)
        _mount("-o", "remount,bind,ro,nosuid,nodev", target)


def _only_files_and_dirs(src: str, names: list[str]) -> set[str]:
    """copytree's ignore: sockets (a running agent's), FIFOs, devices and dangling links stay behind."""
    skip = set()
    for name in names:
        try:
            mode = os.stat(os.path.join(src, name)).st_mode
        except OSError:
            skip.add(name)
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            skip.add(name)
    return skip


def setup_private(root: Path, private: PrivateDir) -> None:
    """Mount the private tmpfs and copy the host's files into it (see the module docstring)."""
    target = _target(root, private.path)
    _mount("-t", "tmpfs", "-o", f"mode=0700,nosuid,nodev,noexec,size={PRIVATE_TMPFS_SIZE}", "snapshotter-private",
           target)
    try:
        for host, name in private.dirs:
            shutil.copytree(host, os.path.join(target, name), symlinks=False, ignore=_only_files_and_dirs)
        for host, name in private.files:
            dest = os.path.join(target, name)
            shutil.copyfile(host, dest)
            os.chmod(dest, 0o400)
    except OSError as e:
        raise RuntimeError(f"copying into the private {private.path}: {e}") from None


def main(spec_path: str) -> int:
    spec = NamespaceSpec.from_json(Path(spec_path).read_text())
    if os.getpid() != 1:
        say("warning: not PID 1 of a new PID namespace")
    try:
        setup_mounts(spec.root, spec.binds, spec.read_only)
        if spec.private is not None:
            setup_private(spec.root, spec.private)
    except RuntimeError as e:
        say(f"error: {e}")
        return 125
    say("mounted proc, dev (rslave), sys (rslave), " + ", ".join(r for _h, r in spec.binds)
        + "".join(f", {r} (read-only)" for _h, r in spec.read_only) + "; entering the root")
    if spec.private is not None:
        names = ", ".join(n for _h, n in spec.private.dirs + spec.private.files)
        say(f"private tmpfs {spec.private.path} (this namespace only): {names}")
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
