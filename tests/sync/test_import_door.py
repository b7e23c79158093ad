"""The importer is the pipeline's door (docs/security.md, "What a snapshot may contain"): a snapshot that
export, publish or a build could not carry never gets a tag. Refused with one error naming the member, the
same on every path through the importer (first import, cached tree, no cache, split over two
fast-imports), with every ref as it was: non-UTF-8 names, a path that is a file (or symlink) and a
directory at once, symlinks that end outside the tree, directly or through other symlinks."""

from __future__ import annotations

import io
import lzma
import subprocess
import tarfile
from datetime import date
from pathlib import Path

import pytest
from helpers.testlib import snapshot_time, timestamp_line

from snapshotter.errors import SnapshotError
from snapshotter.git.repository import Repository
from snapshotter.sync import importer

IDENTITY = importer.Identity("Door Test", "door@localhost")
DAY1, DAY2 = date(2026, 11, 1), date(2026, 11, 2)

# (name, kind, content or target), in tar order; kind: "file" or "symlink".
Members = list[tuple[str, str, str]]

GOOD: Members = [("foo", "file", "a file that later becomes a directory\n"), ("sub/x", "file", "x\n"),
                 ("sub/up", "symlink", ".."), ("inside", "symlink", "sub/up/sub/x")]

CHAIN = [("sub/up", "symlink", ".."), ("l1", "symlink", "sub/up/sub/up")]
CHAIN += [(f"l{i}", "symlink", f"l{i - 1}/sub/up") for i in range(2, 16)]

BAD: dict[str, tuple[Members, str]] = {
    "climbs-through-link": ([("sub/up", "symlink", ".."), ("esc", "symlink", "sub/up/../..")],
                            "symlink 'esc' points outside the tree"),
    "link-chain-to-passwd": ([*CHAIN, ("pw", "symlink", "l15/../../etc/passwd")],
                             "points outside the tree"),
    "absolute": ([("abs", "symlink", "/etc/passwd")], "symlink 'abs' points outside the tree"),
    "loop": ([("a", "symlink", "b/x"), ("b", "symlink", "a/y"), ("c", "symlink", "a")], "a loop"),
    "file-then-dir": ([("foo", "file", "f\n"), ("foo/bar", "file", "b\n")],
                      "'foo' is both a file and a directory ('foo/bar')"),
    "dir-then-file": ([("foo/bar", "file", "b\n"), ("foo", "file", "f\n")],
                      "'foo' is both a file and a directory ('foo/bar')"),
    "symlink-and-dir": ([("foo", "symlink", "sub"), ("sub/x", "file", "x\n"), ("foo/bar", "file", "b\n")],
                        "'foo' is both a symlink and a directory ('foo/bar')"),
    "non-utf8-name": ([("caf\udce9.txt", "file", "latin-1 name\n")], "member name is not UTF-8"),
    "non-utf8-target": ([("l", "symlink", "caf\udce9")], "target is not UTF-8"),
}


def tarball(where: Path, day: date, members: Members) -> Path:
    ts = snapshot_time(day)
    members = [*members, ("metadata/timestamp.x", "file", timestamp_line(ts))]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(f"gentoo/{name}")
            info.mtime = ts
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data
                tf.addfile(info)
            else:
                raw = data.encode()
                info.size, info.mode = len(raw), 0o644
                tf.addfile(info, io.BytesIO(raw))
    where.mkdir(parents=True, exist_ok=True)
    out = where / f"gentoo-{day:%Y%m%d}.tar.xz"
    out.write_bytes(lzma.compress(buf.getvalue()))
    return out


def git_out(repo: Path, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={repo}", *args], capture_output=True, text=True, check=True).stdout


def refs(repo: Path) -> str:
    return subprocess.run(["git", f"--git-dir={repo}", "for-each-ref"], capture_output=True, text=True,
                          check=True).stdout


def attempt(repo: Path, tb: Path, day: date, path: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Import `tb` through one importer path; the error message (refs checked unchanged)."""
    monkeypatch.setattr(importer, "PARALLEL_AFTER", 0 if path == "split" else 10**9)
    if path == "cold":
        (repo / "snapshotter" / "tree.cache").unlink(missing_ok=True)
    before = refs(repo) if repo.exists() else ""
    with pytest.raises(SnapshotError) as err:
        importer.import_tarball(Repository(repo), tb, IDENTITY, file_day=day)
    assert refs(repo) == before, "refs moved for a refused snapshot"
    return str(err.value)


PATHS = ["first", "cold", "warm", "split"]


@pytest.mark.parametrize("case", sorted(BAD))
def test_refused_the_same_on_every_importer_path(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    members, message = BAD[case]
    good = tarball(tmp_path / "good", DAY1, GOOD)
    bad1, bad2 = tarball(tmp_path / "bad1", DAY1, members), tarball(tmp_path / "bad2", DAY2, members)
    messages = {}
    for path in PATHS:
        repo = tmp_path / f"{path}.git"
        if path == "first":
            messages[path] = attempt(repo, bad1, DAY1, path, monkeypatch)
            continue
        monkeypatch.setattr(importer, "PARALLEL_AFTER", 0 if path == "split" else 10**9)
        importer.import_tarball(Repository(repo), good, IDENTITY, file_day=DAY1)
        messages[path] = attempt(repo, bad2, DAY2, path, monkeypatch)
    for path, text in messages.items():
        assert message in text, (path, text)
        assert text.startswith("gentoo-2026110"), text  # names the tarball, then the member
    assert len({m.replace("gentoo-20261101", "gentoo-20261102") for m in messages.values()}) == 1, messages


def test_a_file_becoming_a_directory_between_days_is_fine(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Across days a path may change kind (the previous commit is not part of the new tree)."""
    day2 = [("foo/bar", "file", "now a directory\n"), ("sub", "symlink", "foo"), ("inside", "symlink", "sub/bar")]
    good, nxt = tarball(tmp_path / "a", DAY1, GOOD), tarball(tmp_path / "b", DAY2, day2)
    commits = set()
    for path in ("cold", "warm", "split"):
        repo = tmp_path / f"{path}.git"
        monkeypatch.setattr(importer, "PARALLEL_AFTER", 0 if path == "split" else 10**9)
        importer.import_tarball(Repository(repo), good, IDENTITY, file_day=DAY1)
        if path == "cold":
            (repo / "snapshotter" / "tree.cache").unlink()
        commits.add(importer.import_tarball(Repository(repo), nxt, IDENTITY, file_day=DAY2).commit)
        listing = subprocess.run(["git", f"--git-dir={repo}", "ls-tree", "-r", "--name-only", "main"],
                                 capture_output=True, text=True, check=True).stdout.split()
        assert listing == ["foo/bar", "inside", "metadata/timestamp.x", "sub"]
    assert len(commits) == 1


def test_links_inside_the_tree_through_other_links_are_accepted(tmp_path: Path) -> None:
    chain = [*CHAIN, ("deep/ok", "symlink", "../l15/sub/x"), ("sub/x", "file", "x\n")]
    repo = tmp_path / "r.git"
    importer.import_tarball(Repository(repo), tarball(tmp_path, DAY1, chain), IDENTITY, file_day=DAY1)
    assert "refs/tags/2026-11-01" in refs(repo)


def test_a_member_given_twice_is_the_last_one_on_every_path(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """As tar extracts it: the later member of the same name wins (content, and kind: a symlink then a
    file), with the same commit on every importer path."""
    dup = [("dup", "file", "one\n"), ("sub/x", "file", "x\n"), ("dup", "file", "two\n"),
           ("lnk", "symlink", "dup"), ("lnk", "file", "now a file\n")]
    first, nxt = tarball(tmp_path / "a", DAY1, GOOD), tarball(tmp_path / "b", DAY2, dup)
    commits = set()
    for path in ("cold", "warm", "split"):
        repo = tmp_path / f"{path}.git"
        monkeypatch.setattr(importer, "PARALLEL_AFTER", 0 if path == "split" else 10**9)
        importer.import_tarball(Repository(repo), first, IDENTITY, file_day=DAY1)
        if path == "cold":
            (repo / "snapshotter" / "tree.cache").unlink()
        commits.add(importer.import_tarball(Repository(repo), nxt, IDENTITY, file_day=DAY2).commit)
        assert git_out(repo, "cat-file", "-p", "main:dup") == "two\n"
        assert git_out(repo, "cat-file", "-p", "main:lnk") == "now a file\n"
        assert git_out(repo, "ls-tree", "main", "lnk").startswith("100644 blob")
    assert len(commits) == 1
