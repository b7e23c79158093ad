"""The build caches (service/buildcache.py): stages unpacked once per sha256 into a private directory,
with real tar; and `snapshotter purge` trimming both caches, never an entry a build holds."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import testlib
from helpers.gitobjects import bare_repo_from, blob, commit_tag, git, raw_tree

from chroot.errors import StageMismatch
from snapshotter.config import load
from snapshotter.lock import flocked
from snapshotter.service import buildcache
from snapshotter.service.buildcache import StageCache

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking a stage keeps owners: needs root")


def make_stage(tmp: Path, name: str, marker: str) -> tuple[Path, str]:
    """A tiny stage tarball (usr/, etc/, a setuid program owned by root) and its sha256."""
    src = tmp / f"src-{name}"
    testlib.write_tree(src, {"etc/os-release": f"ID={marker}\n", "usr/bin/su": "#!/bin/sh\n"})
    os.chmod(src / "usr/bin/su", 0o4755)
    path = tmp / f"{name}.tar.xz"
    subprocess.run(["tar", "--xz", "-cf", str(path), "-C", str(src), "--owner=0", "--group=0", "."], check=True)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_stage_is_unpacked_once_into_a_private_directory(tmp_path: Path) -> None:
    stage, sha = make_stage(tmp_path, "stage3", "one")
    cache = StageCache(tmp_path / "cache" / "roots", keep=2)
    with cache.unpacked(stage, sha) as lower:
        assert lower == cache.path / sha
        assert (lower / "etc/os-release").read_text() == "ID=one\n"
        st = (lower / "usr/bin/su").stat()
        assert st.st_uid == 0 and st.st_mode & stat.S_ISUID  # owners and modes as the builder extracts them
        inode = lower.stat().st_ino
    # A setuid program of a stage must not be reachable by other users: the cache directory is 0700.
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o700
    stage.unlink()  # the next build of that stage needs neither the tarball nor its hash again
    assert cache.contains(sha)
    with cache.unpacked(stage, sha) as lower:
        assert lower.stat().st_ino == inode


def test_a_stage_that_does_not_match_its_sha256_leaves_nothing(tmp_path: Path) -> None:
    stage, _sha = make_stage(tmp_path, "stage3", "one")
    wrong = "0" * 64
    cache = StageCache(tmp_path / "roots", keep=2)
    with pytest.raises(StageMismatch, match="sha256"), cache.unpacked(stage, wrong):
        pass
    assert not cache.contains(wrong)
    assert [p for p in os.listdir(cache.path) if not p.endswith(".lock")] == []


def write_config(tmp: Path, cached: int) -> Path:
    path = tmp / "snapshotter.toml"
    path.write_text(f"""
repo = "{tmp / 'gentoo.git'}"
state_dir = "{tmp / 'state'}"
[sync]
mirrors = ["http://127.0.0.1:9/"]
fingerprints = ["{'A' * 40}"]
[build]
cache_dir = "{tmp / 'cache'}"
output = "{tmp / 'out'}"
work_dir = "{tmp / 'work'}"
cached_stages = {cached}
cached_trees = {cached}
""")
    return path


def test_purge_trims_both_caches_and_keeps_what_a_build_holds(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, cached=1)
    cfg = load(cfg_path)
    stages, trees = buildcache.stage_cache(cfg), buildcache.tree_cache(cfg)
    shas = []
    for i, name in enumerate(("old", "held", "new")):
        stage, sha = make_stage(tmp_path, name, name)
        with stages.unpacked(stage, sha):
            pass
        os.utime(stages.path / f"{sha}.lock", (1000 + i, 1000 + i))  # used in this order
        shas.append(sha)
    repo = bare_repo_from(tmp_path, {"profiles/repo_name": "gentoo\n"})
    base = git(repo, "rev-parse", "2026-01-01^{tree}")
    commit_tag(repo, raw_tree(repo, [("040000", "base", base), ("100644", "day", blob(repo, b"2\n"))]), "2026-01-02")
    tree_ids = []
    for i, tag in enumerate(("2026-01-01", "2026-01-02")):
        with trees.tree(repo, tag) as t:
            tree_ids.append(t.name)
        os.utime(trees.path / f"{t.name}.lock", (1000 + i, 1000 + i))

    dry = testlib.run_cli("--config", str(cfg_path), "purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove unpacked stage {shas[1]}" in dry.stdout and f"would remove unpacked stage {shas[0]}" in dry.stdout
    assert f"would remove cached tree {tree_ids[0]}" in dry.stdout
    assert all(stages.contains(s) for s in shas)

    with flocked(stages.path / f"{shas[1]}.lock", "a running build", shared=True):  # a build holds "held"
        r = testlib.run_cli("--config", str(cfg_path), "purge")
    assert r.returncode == 0, r.stderr
    assert f"removed unpacked stage {shas[0]}" in r.stdout and f"removed cached tree {tree_ids[0]}" in r.stdout
    assert [stages.contains(s) for s in shas] == [False, True, True]  # the held one stays beyond the bound
    assert [trees.contains(t) for t in tree_ids] == [False, True]
    r = testlib.run_cli("--config", str(cfg_path), "purge")
    assert f"removed unpacked stage {shas[1]}" in r.stdout
    assert [stages.contains(s) for s in shas] == [False, False, True]


def test_a_planted_symlink_at_the_stage_cache_is_one_error_line(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, cached=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "roots").symlink_to(elsewhere)
    r = testlib.run_cli("--config", str(cfg_path), "purge")
    testlib.one_error(r, "build caches", "symlink")
    assert list(elsewhere.iterdir()) == []
