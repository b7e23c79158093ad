"""A big import is split over two `git fast-import` processes (importer.PARALLEL_AFTER). The split must
be invisible: the same commits, tags and trees as one process gives, whatever the member order, with
deletions, mode changes, symlinks and hardlinks across the parts, and nothing left behind on failure."""

from __future__ import annotations

import io
import lzma
import random
import subprocess
import sys
import tarfile
import time
from datetime import date
from pathlib import Path

import pytest
from testlib import snapshot_time, timestamp_line

from snapshotter.errors import SnapshotError
from snapshotter.git.repository import Repository
from snapshotter.sync import importer

IDENTITY = importer.Identity("Split Test", "split@localhost")
DAY1, DAY2, DAY3 = date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)


def _tree1() -> dict[str, tuple[str, bytes]]:
    """path -> (kind, content): a small tree with every kind of part `_unit` knows."""
    files: dict[str, tuple[str, bytes]] = {
        "header.txt": ("file", b"top-level file\n"),
        "skel.ebuild": ("file", b"# skeleton\n"),
        "eclass/a.eclass": ("file", b"eclass a\n"),
        "eclass/tests/t.sh": ("exec", b"#!/bin/sh\n"),
        "profiles/repo_name": ("file", b"gentoo\n"),
        "profiles/default/linux/make.defaults": ("file", b"ARCH=amd64\n"),
        "metadata/layout.conf": ("file", b"masters =\n"),
        "metadata/glsa/glsa-1.xml": ("file", b"<glsa/>\n"),
    }
    for c in range(6):
        cat = f"cat-{c}"
        files[f"{cat}/metadata.xml"] = ("file", f"<cat {c}/>\n".encode())
        for p in range(5):
            for v in (1, 2):
                files[f"{cat}/pkg{p}/pkg{p}-{v}.ebuild"] = ("file", f"EAPI=8 {cat} {p} {v}\n".encode() * 5)
                files[f"metadata/md5-cache/{cat}/pkg{p}-{v}"] = ("file", f"DEPEND={cat}/{p}-{v}\n".encode())
            files[f"{cat}/pkg{p}/Manifest"] = ("file", f"DIST {cat}-{p}\n".encode())
            files[f"{cat}/pkg{p}/files/init"] = ("exec", f"#!/sbin/openrc-run {p}\n".encode())
    return files


def _tree2(t1: dict[str, tuple[str, bytes]]) -> dict[str, tuple[str, bytes]]:
    t = dict(t1)
    for p in [p for p in t if p.startswith(("cat-1/", "metadata/md5-cache/cat-1/"))]:
        del t[p]  # a whole category and its md5-cache part go
    del t["cat-2/pkg0/pkg0-1.ebuild"]
    del t["metadata/md5-cache/cat-2/pkg0-1"]
    t["cat-2/pkg0/pkg0-3.ebuild"] = ("file", b"EAPI=8 new version\n")
    t["metadata/md5-cache/cat-2/pkg0-3"] = ("file", b"DEPEND=new\n")
    t["cat-3/pkg1/files/init"] = ("file", t["cat-3/pkg1/files/init"][1])  # mode change only
    t["cat-4/pkg2/Manifest"] = ("file", b"DIST changed\n")
    t["cat-4/pkg2/link"] = ("symlink", b"Manifest")
    t["cat-5/pkg4/copy.ebuild"] = ("hardlink", b"cat-0/pkg0/pkg0-1.ebuild")  # a target in another part
    t["new-cat/newpkg/newpkg-1.ebuild"] = ("file", b"EAPI=8 brand new\n")
    t["metadata/md5-cache/new-cat/newpkg-1"] = ("file", b"DEPEND=\n")
    t["eclass/a.eclass"] = ("file", b"eclass a, changed\n")
    t["profiles/default/linux/make.defaults"] = ("file", b"ARCH=amd64\nCHOST=x86_64\n")
    t["header.txt"] = ("exec", b"top-level file, now executable\n")
    return t


def _tree3(t2: dict[str, tuple[str, bytes]]) -> dict[str, tuple[str, bytes]]:
    t = {p: v for p, v in t2.items() if not p.startswith("eclass/")}  # a top-level directory goes
    for p in [p for p in t if p.startswith("metadata/md5-cache/")]:
        t[p] = ("file", t[p][1] + b"EAPI=8\n")  # an eclass change rewrites every md5-cache entry
    return t


def _write(path: Path, day: date, tree: dict[str, tuple[str, bytes]], order: str) -> Path:
    tree = {**tree, "metadata/timestamp.x": ("file", timestamp_line(snapshot_time(day)).encode())}
    names = [n for n in sorted(tree) if tree[n][0] != "hardlink"]
    if order == "shuffled":  # real snapshots need not be sorted: parts interleave
        random.Random(day.toordinal()).shuffle(names)
    names += [n for n in sorted(tree) if tree[n][0] == "hardlink"]  # after their targets
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name in names:
            kind, data = tree[name]
            info = tarfile.TarInfo(f"gentoo/{name}")
            info.mtime = snapshot_time(day)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data.decode()
                tf.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, f"gentoo/{data.decode()}"
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o755 if kind == "exec" else 0o644
                tf.addfile(info, io.BytesIO(data))
    out = path / f"gentoo-{day:%Y%m%d}.tar.xz"
    out.write_bytes(lzma.compress(buf.getvalue()))
    return out


def _expected(tree: dict[str, tuple[str, bytes]]) -> list[tuple[str, str, str]]:
    """(mode, blob id, path) of every file, as `git ls-tree -r` lists them."""
    out = []
    for path, (kind, data) in tree.items():
        if kind == "hardlink":
            kind, data = tree[data.decode()]
        mode = {"file": "100644", "exec": "100755", "symlink": "120000"}[kind]
        blob = subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True,
                              check=True).stdout.decode().strip()
        out.append((mode, blob, path))
    return sorted(out)


def _ls(repo: Path, rev: str) -> list[tuple[str, str, str]]:
    out = subprocess.run(["git", f"--git-dir={repo}", "ls-tree", "-r", "-z", rev], capture_output=True,
                         check=True).stdout.decode()
    rows = []
    for entry in filter(None, out.split("\0")):
        meta, path = entry.split("\t", 1)
        mode, _, blob = meta.split()
        if path != "metadata/timestamp.x":
            rows.append((mode, blob, path))
    return sorted(rows)


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
    t1 = _tree1()
    t2 = _tree2(t1)
    t3 = _tree3(t2)
    tarballs = [_write(tmp_path, d, t, order) for d, t in ((DAY1, t1), (DAY2, t2), (DAY3, t3))]
    one, two = tmp_path / "one.git", tmp_path / "two.git"
    for tarball, day, tree in zip(tarballs, (DAY1, DAY2, DAY3), (t1, t2, t3), strict=True):
        single = _import(one, tarball, day, 10**9, monkeypatch, processes)
        split = _import(two, tarball, day, 0, monkeypatch, processes)
        assert (split.commit, split.tag, split.changed) == (single.commit, single.tag, single.changed)
        assert _ls(two, "main") == _expected(tree)
    assert processes[1::2] == [1, 1, 1]  # one process per import
    assert processes[2::2] == [3, 3, 3]  # two for the parts, one to put them together
    assert _refs(one) == _refs(two)  # main and the three tags, nothing left under refs/snapshotter/
    assert not any(r.startswith("refs/snapshotter/") for r in _refs(two))
    subprocess.run(["git", f"--git-dir={two}", "fsck", "--strict", "--no-progress"], check=True,
                   capture_output=True)


def test_split_import_that_fails_moves_nothing(tmp_path: Path, processes: list[int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    t1 = _tree1()
    repo = tmp_path / "repo.git"
    _import(repo, _write(tmp_path, DAY1, t1, "sorted"), DAY1, 0, monkeypatch, processes)
    before = _refs(repo)
    bad = _tree2(t1)
    bad["zzz/evil"] = ("hardlink", b"../../etc/passwd")  # the last member, after the split started
    with pytest.raises(SnapshotError, match="hardlink"):
        _import(repo, _write(tmp_path, DAY2, bad, "sorted"), DAY2, 0, monkeypatch, processes)
    assert _refs(repo) == before
    leftover = subprocess.run(["pgrep", "-f", "--", f"--git-dir={repo} fast-import"], capture_output=True)
    assert leftover.returncode == 1, leftover.stdout  # every fast-import was stopped
    subprocess.run(["git", f"--git-dir={repo}", "fsck", "--strict", "--no-progress"], check=True,
                   capture_output=True)
    good = _import(repo, _write(tmp_path, DAY2, _tree2(t1), "sorted"), DAY2, 0, monkeypatch, processes)
    assert _ls(repo, good.commit) == _expected(_tree2(t1))


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
    t1 = _tree1()
    repo = tmp_path / "repo.git"
    day1 = _write(tmp_path, DAY1, t1, "sorted")
    _import(repo, day1, DAY1, 0, monkeypatch, processes)
    before = _refs(repo)
    big = dict(_tree2(t1))
    for i in range(2000):
        big[f"cat-{i % 50}/many{i % 97}/many-{i}.ebuild"] = ("file", b"EAPI=8\n# %d\n" % i * 4)
    tarball = _write(tmp_path, DAY2, big, "sorted")
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
