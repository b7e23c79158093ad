"""The importer's tree cache (the previous commit's paths and blob ids, saved after each import): used when
it belongs to the branch head, ignored when it is missing, unreadable or left from an older commit (a
crash between moving the refs and saving it). A wrong cache must never change what gets committed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers.importtrees import (
    DAY1,
    DAY2,
    DAY3,
    IDENTITY,
    expected_ls_tree,
    ls_tree,
    tree1,
    tree2,
    tree3,
    write_tarball,
)

from snapshotter.git.repository import Repository
from snapshotter.sync import importer


@pytest.fixture
def days(tmp_path: Path) -> list[tuple[Path, object, dict]]:
    t1 = tree1()
    t2 = tree2(t1)
    t3 = tree3(t2)
    out = tmp_path / "tarballs"
    out.mkdir()
    return [(write_tarball(out, d, t, "sorted"), d, t) for d, t in ((DAY1, t1), (DAY2, t2), (DAY3, t3))]


@pytest.fixture
def ls_tree_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the commits whose tree the importer had to list with `git ls-tree` (no usable cache)."""
    calls: list[str] = []
    real = importer.git

    def recording(repo: Path, *args: str, **kw: object):  # type: ignore[no-untyped-def]
        if args[:2] == ("ls-tree", "-r"):
            calls.append(args[-1])
        return real(repo, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(importer, "git", recording)
    return calls


def _import_all(repo: Path, days: list, damage=None) -> list[str]:  # type: ignore[no-untyped-def]
    commits = []
    for i, (tarball, day, tree) in enumerate(days):
        if damage is not None and i:
            damage(Repository(repo))
        commits.append(importer.import_tarball(Repository(repo), tarball, IDENTITY, file_day=day).commit)
        assert ls_tree(repo, "main") == expected_ls_tree(tree)
    return commits


def test_the_cache_of_the_head_is_used(tmp_path: Path, days: list, ls_tree_calls: list[str]) -> None:
    _import_all(tmp_path / "repo.git", days)
    assert ls_tree_calls == []  # days 2 and 3 started from the cache the import before left
    assert importer._cache_path(Repository(tmp_path / "repo.git")).is_file()


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated"])
def test_a_missing_or_broken_cache_is_ignored(tmp_path: Path, days: list, ls_tree_calls: list[str],
                                              damage: str) -> None:
    clean = _import_all(tmp_path / "clean.git", days)

    def spoil(mirror: Repository) -> None:
        path = importer._cache_path(mirror)
        if damage == "missing":
            path.unlink()
        elif damage == "garbage":
            path.write_bytes(b"\x00not a tree cache\xff" * 100)
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    assert _import_all(tmp_path / "spoilt.git", days, spoil) == clean
    assert len(ls_tree_calls) == 2  # days 2 and 3 listed their parent's tree instead


def test_a_cache_left_from_an_older_commit_is_ignored(tmp_path: Path, days: list,
                                                       ls_tree_calls: list[str]) -> None:
    """kill -9 after `main` moved but before the new cache was saved leaves the previous day's cache."""
    clean = _import_all(tmp_path / "clean.git", days)
    repo = tmp_path / "crashed.git"
    saved = tmp_path / "day1.cache"
    (t1, d1, _), (t2, d2, _), (t3, d3, tree3) = days
    importer.import_tarball(Repository(repo), t1, IDENTITY, file_day=d1)
    shutil.copy(importer._cache_path(Repository(repo)), saved)
    importer.import_tarball(Repository(repo), t2, IDENTITY, file_day=d2)
    shutil.copy(saved, importer._cache_path(Repository(repo)))  # as if the save after day 2 never happened
    assert ls_tree_calls == []
    assert importer.import_tarball(Repository(repo), t3, IDENTITY, file_day=d3).commit == clean[2]
    assert ls_tree_calls == [clean[1]]
    assert ls_tree(repo, "main") == expected_ls_tree(tree3)
