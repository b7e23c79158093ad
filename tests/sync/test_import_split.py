"""A big import is split over two `git fast-import` processes (importer.PARALLEL_AFTER). The split must
be invisible: the same commits, tags and trees as one process gives, whatever the member order, with
deletions, mode changes, symlinks and hardlinks across the parts, and nothing left behind on failure."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import date
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

from snapshotter.errors import SnapshotError
from snapshotter.git.repository import Repository
from snapshotter.sync import importer


def _refs(repo: Path) -> list[str]:
    return subprocess.run(["git", f"--git-dir={repo}", "for-each-ref", "--format=%(refname) %(objectname)"],
                          capture_output=True, text=True, check=True).stdout.splitlines()


def _import(repo: Path, tarball: Path, day: date, parallel_after: int, monkeypatch: pytest.MonkeyPatch,
            processes: list[int]) -> importer.ImportResult:
    monkeypatch.setattr(importer, "PARALLEL_AFTER", parallel_after)
    before = processes[0]
    result = importer.import_tarball(Repository(repo), tarball, IDENTITY, file_day=day)
    processes.append(processes[0] - before)
    return result


@pytest.fixture
def processes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """processes[0]: how many fast-import processes were started; each import appends its own count."""
    count = [0]
    real = importer._FastImport.__init__

    def counting(self: importer._FastImport, mirror: Repository) -> None:
        count[0] += 1
        real(self, mirror)

    monkeypatch.setattr(importer._FastImport, "__init__", counting)
    return count


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_split_import_gives_the_same_commits_as_one_process(tmp_path: Path, order: str, processes: list[int],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    t1 = tree1()
    t2 = tree2(t1)
    t3 = tree3(t2)
    tarballs = [write_tarball(tmp_path, d, t, order) for d, t in ((DAY1, t1), (DAY2, t2), (DAY3, t3))]
    one, two = tmp_path / "one.git", tmp_path / "two.git"
    for tarball, day, tree in zip(tarballs, (DAY1, DAY2, DAY3), (t1, t2, t3), strict=True):
        single = _import(one, tarball, day, 10**9, monkeypatch, processes)
        split = _import(two, tarball, day, 0, monkeypatch, processes)
        assert (split.commit, split.tag, split.changed) == (single.commit, single.tag, single.changed)
        assert ls_tree(two, "main") == expected_ls_tree(tree)
    assert processes[1::2] == [1, 1, 1]  # one process per import
    assert processes[2::2] == [3, 3, 3]  # two for the parts, one to put them together
    assert _refs(one) == _refs(two)  # main and the three tags, nothing left under refs/snapshotter/
    assert not any(r.startswith("refs/snapshotter/") for r in _refs(two))
    subprocess.run(["git", f"--git-dir={two}", "fsck", "--strict", "--no-progress"], check=True,
                   capture_output=True)


def test_split_import_that_fails_moves_nothing(tmp_path: Path, processes: list[int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    t1 = tree1()
    repo = tmp_path / "repo.git"
    _import(repo, write_tarball(tmp_path, DAY1, t1, "sorted"), DAY1, 0, monkeypatch, processes)
    before = _refs(repo)
    bad = tree2(t1)
    bad["zzz/evil"] = ("hardlink", b"../../etc/passwd")  # the last member, after the split started
    with pytest.raises(SnapshotError, match="hardlink"):
        _import(repo, write_tarball(tmp_path, DAY2, bad, "sorted"), DAY2, 0, monkeypatch, processes)
    assert _refs(repo) == before
    leftover = subprocess.run(["pgrep", "-f", "--", f"--git-dir={repo} fast-import"], capture_output=True)
    assert leftover.returncode == 1, leftover.stdout  # every fast-import was stopped
    subprocess.run(["git", f"--git-dir={repo}", "fsck", "--strict", "--no-progress"], check=True,
                   capture_output=True)
    good = _import(repo, write_tarball(tmp_path, DAY2, tree2(t1), "sorted"), DAY2, 0, monkeypatch, processes)
    assert ls_tree(repo, good.commit) == expected_ls_tree(tree2(t1))


@pytest.mark.parametrize(("path", "unit"), [
    (b"header.txt", b""),
    (b"app-misc/foo/foo-1.ebuild", b"app-misc"),
    (b"app-misc/foo/files/a/b", b"app-misc"),
    (b"metadata/md5-cache/app-misc/foo-1", b"metadata/md5-cache/app-misc"),
    (b"metadata/md5-cache/stray", b"metadata"),
    (b"metadata/glsa/glsa-1.xml", b"metadata"),
    (b"metadata/timestamp.x", b"metadata"),
])
def test_parts_of_the_tree(path: bytes, unit: bytes) -> None:
    assert importer._unit(path) == unit


def test_kill_9_after_the_parts_are_committed(tmp_path: Path, processes: list[int],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between the part commits and the final one: nothing moves, the stale part refs go with the
    next import, and that import gives the same commit as an undisturbed one."""
    t1 = tree1()
    repo = tmp_path / "repo.git"
    day1 = write_tarball(tmp_path, DAY1, t1, "sorted")
    _import(repo, day1, DAY1, 0, monkeypatch, processes)
    before = _refs(repo)
    big = dict(tree2(t1))
    for i in range(2000):
        big[f"cat-{i % 50}/many{i % 97}/many-{i}.ebuild"] = ("file", b"EAPI=8\n# %d\n" % i * 4)
    tarball = write_tarball(tmp_path, DAY2, big, "sorted")
    # The child waits a second between the part commits and the final one, so that the kill lands there.
    code = ("import sys, time; from pathlib import Path; from snapshotter.sync import importer;"
            "from snapshotter.git.repository import Repository; importer.PARALLEL_AFTER = 0;"
            "grafts = importer._Split._grafts;"
            "importer._Split._grafts = lambda self: (time.sleep(1), grafts(self))[1];"
            "importer.import_tarball(Repository(Path(sys.argv[1])), Path(sys.argv[2]),"
            " importer.Identity('Split Test', 'split@localhost'))")
    part = repo / importer.PART_REFS[1]
    proc = subprocess.Popen([sys.executable, "-c", code, str(repo), str(tarball)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not part.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    if not part.exists():
        pytest.fail(f"the parts were never committed: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}")
    assert [r for r in _refs(repo) if not r.startswith("refs/snapshotter/")] == before  # nothing moved
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", "--", f"--git-dir={repo} fast-import"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a fast-import outlived its importer"
        time.sleep(0.05)
    subprocess.run(["git", f"--git-dir={repo}", "fsck", "--strict", "--no-progress"], check=True, capture_output=True)
    again = _import(repo, tarball, DAY2, 0, monkeypatch, processes)
    _import(tmp_path / "clean.git", day1, DAY1, 10**9, monkeypatch, processes)
    clean = _import(tmp_path / "clean.git", tarball, DAY2, 10**9, monkeypatch, processes)
    assert again.commit == clean.commit
    assert not any(r.startswith("refs/snapshotter/") for r in _refs(repo))
