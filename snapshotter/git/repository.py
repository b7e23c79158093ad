"""The snapshot repository (bare git): creation, date tags, and running git with argument lists only."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import git as git_lib

from snapshotter.errors import SnapshotterError, child_failure

TAG_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")

# Git must behave the same on every machine: no user or system config, fixed locale.
_GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
    "LC_ALL": "C",
    "TZ": "UTC",
}


def git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(_GIT_ENV)
    if extra:
        env.update(extra)
    return env


def git(repo: Path, *args: str, input: bytes | None = None, check: bool = True,
        env: dict[str, str] | None = None, hermetic: bool = True,
        timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `git --git-dir=REPO ARGS...` and capture its output; raise SnapshotterError on failure.

    `hermetic` ignores the user's and system's git config (for anything that writes objects); pushes
    turn it off so that the operator's ssh/credential/insteadOf settings apply.
    """
    cmd = ["git", f"--git-dir={repo}", *args]
    run_env = git_env(env) if hermetic else {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    if timeout is not None:
        proc = _run_bounded(cmd, input, run_env, timeout)
        if proc is None:
            raise SnapshotterError(f"git {args[0]} timed out after {timeout:.0f} s")
    else:
        proc = subprocess.run(cmd, input=input, capture_output=True, env=run_env)
    if check and proc.returncode != 0:
        raise SnapshotterError(f"git {args[0]} failed: {child_failure(proc.stderr, proc.returncode)}")
    return proc


def _run_bounded(cmd: list[str], input: bytes | None, env: dict[str, str],
                 timeout: float) -> subprocess.CompletedProcess[bytes] | None:
    """`cmd` with a deadline, or None when it passed: then git and everything it started (ssh,
    git-remote-https, ...) are killed, as a process group, so no helper stays stuck on the network."""
    with subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            return None
        except BaseException:  # ^C, ...: take the helpers along
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def git_out(repo: Path, *args: str) -> str:
    return git(repo, *args).stdout.decode().strip()


def tag_date(name: str) -> date | None:
    """The date a tag name stands for, or None for tags that are not `YYYY-MM-DD`."""
    m = TAG_RE.match(name)
    if not m:
        return None
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


@dataclass(frozen=True)
class Tag:
    name: str
    day: date
    commit: str


class Repository:
    """A bare repository holding one commit and one annotated tag per imported snapshot."""

    def __init__(self, path: Path, branch: str = "main") -> None:
        self.path = Path(path)
        self.branch = branch

    @property
    def branch_ref(self) -> str:
        return f"refs/heads/{self.branch}"

    def exists(self) -> bool:
        return (self.path / "HEAD").is_file() and (self.path / "objects").is_dir()

    def require(self) -> Repository:
        if not self.exists():
            raise SnapshotterError(f"{self.path} is not a snapshot repository (no bare git repository there); run `snapshotter sync` first")
        return self

    def create(self) -> Repository:
        """Create the bare repository if it does not exist (idempotent)."""
        if self.exists():
            return self
        if self.path.exists() and any(p.name != "snapshotter.lock" for p in self.path.iterdir()):
            raise SnapshotterError(f"{self.path} exists, is not empty and is not a bare git repository")
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "--quiet", "--bare", f"--initial-branch={self.branch}", str(self.path)],
                       check=True, capture_output=True, env=git_env())
        # Objects must reach the disk before refs point at them (kill -9, power loss).
        git(self.path, "config", "core.fsync", "objects,derived-metadata,reference")
        git(self.path, "config", "core.fsyncMethod", "fsync")
        return self

    def _repo(self) -> git_lib.Repo:
        return git_lib.Repo(self.path)

    def tags(self) -> list[Tag]:
        """Date tags, oldest first, with the commit each points at (read with GitPython)."""
        if not self.exists():
            return []
        tags = []
        with self._repo() as repo:
            for ref in repo.tags:
                day = tag_date(ref.name)
                if day is None:
                    continue
                try:
                    tags.append(Tag(ref.name, day, ref.commit.hexsha))
                except ValueError:  # a date-named tag that is not a commit: not one of ours
                    continue
        return sorted(tags, key=lambda t: t.day)

    def newest_tag(self) -> Tag | None:
        tags = self.tags()
        return tags[-1] if tags else None

    def find_tag(self, name: str) -> Tag:
        if tag_date(name) is None:
            raise SnapshotterError(f"{name!r} is not a snapshot tag (expected YYYY-MM-DD)")
        for t in self.tags():
            if t.name == name:
                return t
        raise SnapshotterError(f"no tag {name} in {self.path}")

    def head(self) -> str | None:
        """The commit `main` points at, or None before the first import."""
        with self._repo() as repo:
            try:
                return repo.commit(self.branch_ref).hexsha
            except (git_lib.BadName, ValueError):
                return None

    @property
    def lock_path(self) -> Path:
        return self.path / "snapshotter.lock"

    @property
    def state_dir(self) -> Path:
        """Snapshotter's own bookkeeping inside the bare repository (git ignores it)."""
        return self.path / "snapshotter"
