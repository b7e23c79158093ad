"""Bare git repositories written object by object with real git: a tagged tree from files, and trees
written byte for byte (hostile names, modes and orders that `git add` would refuse)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers import testlib


def git(repo: Path, *args: str, input: bytes | None = None) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_COMMITTER_DATE": "1700000000 +0000",
           "GIT_AUTHOR_DATE": "1700000000 +0000", "GIT_CONFIG_GLOBAL": os.devnull}
    return subprocess.run(["git", f"--git-dir={repo}", *args], input=input, check=True, capture_output=True,
                          env=env).stdout.decode().strip()


def bare_repo_from(tmp: Path, files: dict, tag: str = "2026-01-01") -> Path:
    """A bare repository whose one commit (tagged `tag`) holds `files` (testlib.write_tree format)."""
    work = tmp / "work"
    testlib.write_tree(work, files)
    repo = tmp / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    env_tree = {"GIT_WORK_TREE": str(work), "GIT_INDEX_FILE": str(tmp / "index")}
    subprocess.run(["git", f"--git-dir={repo}", "add", "-A", "."], check=True, cwd=work,
                   env={**os.environ, **env_tree})
    tree = subprocess.run(["git", f"--git-dir={repo}", "write-tree"], check=True, capture_output=True,
                          env={**os.environ, **env_tree}).stdout.decode().strip()
    commit_tag(repo, tree, tag)
    return repo


def commit_tag(repo: Path, tree: str, tag: str) -> str:
    commit = git(repo, "commit-tree", tree, "-m", f"Update portage tree to {tag}")
    git(repo, "tag", "-a", tag, "-m", tag, commit)
    return commit


def raw_tree(repo: Path, entries: list[tuple[str, str, str]]) -> str:
    """A tree object written byte for byte (no name checks): (mode, name, hex oid) in the given order."""
    body = b"".join(mode.encode() + b" " + name.encode() + b"\0" + bytes.fromhex(oid) for mode, name, oid in entries)
    return git(repo, "hash-object", "-t", "tree", "-w", "--literally", "--stdin", input=body)


def blob(repo: Path, data: bytes) -> str:
    return git(repo, "hash-object", "-w", "--stdin", input=data)
