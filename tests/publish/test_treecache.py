"""git.treecache.TreeCache: trees exported once per tree id, shared by concurrent users, bounded by purge;
real git, real processes and locks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.gitobjects import bare_repo_from, blob, commit_tag, git, raw_tree

from snapshotter.errors import SnapshotError, SnapshotterError
from snapshotter.git.export import export_tree
from snapshotter.git.treecache import TreeCache
from snapshotter.lock import flocked

FILES = {"profiles/repo_name": "gentoo\n", "app-misc/hello/hello-1.ebuild": "EAPI=8\n",
         "bin/run": ("exec", "#!/bin/sh\n"), "profiles/link": ("symlink", "repo_name")}


def tagged_trees(tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    """A repository with `n` tags 2026-01-01.. whose trees all differ; returns it and the tags."""
    repo = bare_repo_from(tmp_path, FILES)
    base = git(repo, "rev-parse", "2026-01-01^{tree}")
    tags = ["2026-01-01"]
    for i in range(1, n):
        tree = raw_tree(repo, [("040000", "base", base), ("100644", "day", blob(repo, f"{i}\n".encode()))])
        tags.append(f"2026-01-{i + 1:02d}")
        commit_tag(repo, tree, tags[-1])
    return repo, tags


def exports(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.getMessage().startswith("exporting tree"))


def test_one_export_per_tree_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapshotter.git.treecache")
    repo, tags = tagged_trees(tmp_path, 2)
    same_tree = git(repo, "rev-parse", "2026-01-01^{tree}")
    commit_tag(repo, same_tree, "2026-02-01")  # another commit (message, tag), the same tree
    cache = TreeCache(tmp_path / "cache" / "trees", keep=8)
    with cache.tree(repo, "2026-01-01") as first:
        assert first == cache.path / same_tree
        reference = tmp_path / "reference"
        export_tree(repo, "2026-01-01", reference)
        for p in reference.rglob("*"):
            q = first / p.relative_to(reference)
            assert q.lstat().st_mode == p.lstat().st_mode and q.lstat().st_mtime == p.lstat().st_mtime
            if p.is_file() and not p.is_symlink():
                assert q.read_bytes() == p.read_bytes()
        assert os.readlink(first / "profiles/link") == "repo_name"
    commit = git(repo, "rev-parse", "2026-02-01^{commit}")
    with cache.tree(repo, commit) as again:
        assert again == first
    assert exports(caplog) == 1
    with cache.tree(repo, tags[1]) as other:
        assert other != first and (other / "day").read_text() == "1\n"
    assert exports(caplog) == 2
    assert sorted(os.listdir(cache.path)) == sorted([first.name, f"{first.name}.lock", other.name,
                                                     f"{other.name}.lock"])


CHILD = """
import logging, sys, time
from pathlib import Path
from snapshotter.git.treecache import TreeCache
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
with TreeCache(Path(sys.argv[1]), keep=8).tree(Path(sys.argv[2]), "2026-01-01") as tree:
    print(tree, sum(1 for _ in tree.rglob("*")))
"""


def test_concurrent_users_get_one_export(tmp_path: Path) -> None:
    files = {f"cat-{i % 40}/pkg-{i}/pkg-{i}-1.ebuild": f"EAPI=8 # {i}\n" * 20 for i in range(3000)}
    repo = bare_repo_from(tmp_path, files)
    cache = tmp_path / "trees"
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(cache), str(repo), str(go)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    results = [c.communicate(timeout=300) for c in children]
    assert [c.returncode for c in children] == [0, 0], results
    outs = {out.strip() for out, _ in results}
    assert len(outs) == 1 and outs.pop().endswith(f" {3000 + 40 + 3000}")  # the same, whole tree
    assert sum(err.count("exporting tree") for _, err in results) == 1
    assert sorted(os.listdir(cache)) == sorted([git(repo, "rev-parse", "2026-01-01^{tree}"),
                                                git(repo, "rev-parse", "2026-01-01^{tree}") + ".lock"])


def test_purge_keeps_the_most_recently_used_and_skips_one_in_use(tmp_path: Path) -> None:
    repo, tags = tagged_trees(tmp_path, 4)
    cache = TreeCache(tmp_path / "trees", keep=1)
    ids = []
    for i, tag in enumerate(tags):  # used in this order: tags[0] least recently
        with cache.tree(repo, tag) as tree:
            ids.append(tree.name)
        os.utime(cache.path / f"{tree.name}.lock", (1000 + i, 1000 + i))
    assert len(set(ids)) == 4
    with cache.tree(repo, tags[0]) as oldest:  # in use (marks it used now, too: undone below)
        os.utime(cache.path / f"{oldest.name}.lock", (1000, 1000))
        removed = cache.purge()
        assert sorted(removed) == sorted(ids[1:3])
        assert oldest.is_dir() and (oldest / "profiles/repo_name").read_text() == "gentoo\n"
        assert (cache.path / ids[3]).is_dir()
    # leaving marked it used: now it is the most recently used one, and keep=0 removes everything
    assert cache.purge() == [ids[3]]
    assert cache.purge(keep=0) == [ids[0]]
    assert os.listdir(cache.path) == []
    assert cache.purge() == []


def test_crashed_export_is_cleaned(tmp_path: Path) -> None:
    """A temporary directory left by an export that died (no lock held) is removed by purge and by the
    next export of that tree; one whose export still runs (its lock held) is left alone."""
    repo, tags = tagged_trees(tmp_path, 2)
    cache = TreeCache(tmp_path / "trees", keep=8)
    cache.path.mkdir()
    first = cache.tree_id(repo, tags[0])
    second = cache.tree_id(repo, tags[1])
    with cache.tree(repo, tags[0]):
        pass
    os.utime(cache.path / f"{first}.lock", (1000, 1000))
    for tid in (first, second):
        (cache.path / f".{tid}.tmp.0badc0de" / "half").mkdir(parents=True)
        (cache.path / f".{tid}.tmp.0badc0de" / "half" / "file").write_text("partial\n")
    with flocked(cache.path / f"{second}.lock", "an export in progress"):
        assert cache.purge() == [f".{first}.tmp.0badc0de"]
    assert (cache.path / f".{second}.tmp.0badc0de").is_dir()
    # the cached tree of the crashed leftovers stays, and purging did not make it "used"
    assert (cache.path / first / "profiles/repo_name").is_file()
    assert (cache.path / f"{first}.lock").stat().st_mtime == 1000
    with cache.tree(repo, tags[1]) as tree:
        assert (tree / "day").read_text() == "1\n"
    assert sorted(os.listdir(cache.path)) == sorted([first, f"{first}.lock", second, f"{second}.lock"])


def test_failed_export_leaves_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    tree = raw_tree(repo, [("100644", "a", blob(repo, b"x\n")), ("120000", "z", blob(repo, b"/etc/passwd"))])
    commit_tag(repo, tree, "2026-01-01")
    cache = TreeCache(tmp_path / "trees", keep=8)
    with pytest.raises(SnapshotError, match="outside the tree"), cache.tree(repo, "2026-01-01"):
        pass
    assert os.listdir(cache.path) == [f"{tree}.lock"]
    assert cache.purge() == [] and os.listdir(cache.path) == []
    with pytest.raises(SnapshotterError, match="not a commit"), cache.tree(repo, "no-such-tag"):
        pass


def test_planted_symlink_or_open_directory_is_refused(tmp_path: Path) -> None:
    repo, _tags = tagged_trees(tmp_path, 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "trees").symlink_to(elsewhere)
    cache = TreeCache(cache_dir / "trees", keep=8)
    for use in (lambda: cache.tree(repo, "2026-01-01").__enter__(), cache.purge):
        with pytest.raises(SnapshotterError, match="symlink"):
            use()
    assert list(elsewhere.iterdir()) == []
    (cache_dir / "trees").unlink()
    (cache_dir / "trees").mkdir()
    os.chmod(cache_dir / "trees", 0o777)
    with pytest.raises(SnapshotterError, match="writable by others"), cache.tree(repo, "2026-01-01"):
        pass
    assert list((cache_dir / "trees").iterdir()) == []


def test_a_use_marks_the_tree_used(tmp_path: Path) -> None:
    repo, _tags = tagged_trees(tmp_path, 1)
    cache = TreeCache(tmp_path / "trees", keep=8)
    with cache.tree(repo, "2026-01-01") as tree:
        lock = cache.path / f"{tree.name}.lock"
        os.utime(lock, (1000, 1000))
    assert lock.stat().st_mtime > time.time() - 3600
