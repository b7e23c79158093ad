"""What the service tests share: bare repositories (a snapshot repository with date tags, an overlay) with
working clones to push from, a configuration with profiles and a state_dir under the test's directory,
and the jobs in that state_dir's queue."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from helpers import testlib
from snapshotter.service.jobqueue import SqliteQueue, queue_path

GIT_ENV = {"GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "T",
           "GIT_COMMITTER_EMAIL": "t@example.org", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


def git_run(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_ENV)
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {proc.stderr}")
    return proc.stdout + proc.stderr


@dataclass
class Repos:
    root: Path
    mirror: Path  # bare, with date tags
    mirror_work: Path
    overlay: Path  # bare overlay repository
    overlay_work: Path

    def commit(self, work: Path, name: str, content: str) -> str:
        (work / name).write_text(content)
        git_run(work, "add", name)
        git_run(work, "commit", "-q", "-m", f"change {name}")
        return git_run(work, "rev-parse", "HEAD").strip()

    def date_tag(self, day: str) -> str:
        commit = self.commit(self.mirror_work, "metadata-timestamp", day)
        git_run(self.mirror_work, "tag", "-a", "-m", f"Snapshot {day}", day)
        return commit


def make_repos(root: Path, first_tag: str | None = "2026-11-19") -> Repos:
    r = Repos(root, root / "gentoo.git", root / "gentoo-work", root / "overlay.git", root / "overlay-work")
    for bare, work in ((r.mirror, r.mirror_work), (r.overlay, r.overlay_work)):
        subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(bare)], check=True)
        subprocess.run(["git", "init", "-q", "--initial-branch=main", str(work)], check=True)
        git_run(work, "remote", "add", "origin", str(bare))
    r.commit(r.overlay_work, "README", "overlay\n")
    git_run(r.overlay_work, "push", "-q", "origin", "main")
    if first_tag:
        r.date_tag(first_tag)
        git_run(r.mirror_work, "push", "-q", "origin", "main", first_tag)
    return r


def make_config(root: Path, repo: Path, profiles: dict[str, list[dict[str, str]]] | None = None,
                extra: str = "", stage: Path | None = None) -> Path:
    """A config with `profiles` (name -> overlays); the stage is a placeholder file unless given."""
    if stage is None:
        stage = root / "stage.tar.xz"
        stage.touch()
    lines = [f'repo = "{repo}"', f'state_dir = "{root / "state"}"', extra]
    for name, overlays in (profiles or {}).items():
        lines.append(f'[profiles.{name}]\nstage = "{stage}"')
        for ov in overlays:
            lines.append(f"[[profiles.{name}.overlays]]\n" + "\n".join(f'{k} = "{v}"' for k, v in ov.items()))
    path = root / "snapshotter.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def jobs(root: Path) -> list[tuple[str, str, tuple]]:
    q = SqliteQueue(queue_path(root / "state"))
    return [(r.job.profile, r.job.tag, r.job.overlays) for r in q.list()]


def write_sync_config(tmp: Path, mirror: testlib.HttpMirror, key: testlib.Key, *, service: str = "",
                      extra: str = "", state_dir: Path | None = None,
                      profiles: tuple[str, ...] = ("basic", "server")) -> Path:
    """tmp/snapshotter.toml for a sync from `mirror` signed by `key` (no retries, 5 s timeout), with the
    repository, state and cache under `tmp`, `[service]` lines `service`, and profiles with an empty stage."""
    stage = tmp / "stage.tar.xz"
    stage.touch()
    path = tmp / "snapshotter.toml"
    path.write_text(f"""
repo = "{tmp / 'gentoo.git'}"
state_dir = "{state_dir or tmp / 'state'}"
{extra}
[sync]
mirrors = ["{mirror.url}"]
keyring = ["{key.public}"]
fingerprints = ["{key.fingerprint}"]
cache_dir = "{tmp / 'cache'}"
retries = 0
timeout = 5.0
[service]
{service}
""" + "".join(f'[profiles.{name}]\nstage = "{stage}"\n' for name in profiles))
    return path
