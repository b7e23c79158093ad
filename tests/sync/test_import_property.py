"""Property test of the importer (hypothesis): random trees over two days, with changes, deletions,
mode changes, symlinks (inside the tree, through other links, or escaping it) and awkward names, packed
with GNU tar and imported through every importer path: no cache (cold), the previous import's tree cache
(warm) and split over two fast-imports. The reference is what git itself makes of the same tarball:
extracted with tar, `git add -A`, committed with the same identity, dates and message. Every path must
give the reference's trees and commit ids; a tree with a symlink that `os.path.realpath` resolves outside
the extracted tree, or that loops, must be refused on every path, with the refs untouched."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import subprocess
import tempfile
from datetime import date
from pathlib import Path

import pytest
from helpers.testlib import snapshot_time, timestamp_line
from hypothesis import HealthCheck, configuration, given, settings
from hypothesis import strategies as st

from snapshotter.errors import SnapshotError
from snapshotter.git.repository import Repository
from snapshotter.sync import importer

IDENTITY = importer.Identity("Property Test", "property@localhost")
DAYS = (date(2026, 11, 1), date(2026, 11, 2))
NAMES = ["a", "b c", " lead", "-x", 'q"uote', "back\\slash", "new\nline", "ünï", "日本", "t\tab", "x.ebuild",
         "trail ", "*", "?"]
GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}

# Hypothesis keeps caches in ./.hypothesis, written while pytest collects (before any fixture runs): in a
# temporary directory instead, removed when the interpreter exits (tests write nowhere else).
_HYPOTHESIS_HOME = tempfile.TemporaryDirectory(prefix="snapshotter-hypothesis-")
configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME.name)

# path -> ("file", content, mode) | ("link", target, 0)
Tree = dict[str, tuple[str, str, int]]

paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
# Modes with group/other exec bits but not the owner's (0654, 0645, 0611) and the other way round
# (0744): git's rule is the owner's bit.
files = st.tuples(st.just("file"), st.text("ab\n", max_size=8),
                  st.sampled_from([0o644, 0o755, 0o600, 0o700, 0o654, 0o645, 0o611, 0o744, 0o711]))


@st.composite
def trees(draw: st.DrawFn, base: Tree | None = None) -> Tree:
    tree: Tree = {}
    if base is not None:  # the next day: some paths go, some change content or mode, new ones come
        for p, v in base.items():
            action = draw(st.sampled_from(["keep", "keep", "delete", "change"]))
            if action == "keep":
                tree[p] = v
            elif action == "change":
                tree[p] = draw(files)
    for p in draw(st.lists(paths, max_size=8)):
        tree[p] = draw(files)
    # No path may be a file and a directory at once (that is refused: test_import_door.py).
    tree = {p: v for p, v in tree.items() if not any(q.startswith(p + "/") for q in tree)}
    for p in [p for p in tree if draw(st.integers(0, 4)) == 0]:  # some become symlinks
        others = sorted(set(tree) - {p}) or ["."]
        to = draw(st.sampled_from(others))
        rel = os.path.relpath(to, os.path.dirname(p) or ".")
        if draw(st.integers(0, 6)) == 0:
            rel = "../" * (p.count("/") + draw(st.integers(0, 1))) + rel  # climbs (maybe out)
        tree[p] = ("link", rel, 0)
    return tree


def materialize(root: Path, day: date, tree: Tree) -> None:
    top = root / "gentoo"
    for p, (kind, data, mode) in tree.items():
        f = top / p
        f.parent.mkdir(parents=True, exist_ok=True)
        if kind == "link":
            f.symlink_to(data)
        else:
            f.write_text(data)
            f.chmod(mode)
    (top / "metadata").mkdir(parents=True, exist_ok=True)
    (top / "metadata/timestamp.x").write_text(timestamp_line(snapshot_time(day)))


def refused(root: Path, tree: Tree) -> bool:
    """What the kernel says of the extracted tree: a link that `os.path.realpath` resolves outside it, or
    that `stat` cannot resolve for too many levels of links (a loop), must be refused."""
    top = os.path.realpath(root / "gentoo")
    for p, (kind, _, _) in tree.items():
        if kind != "link":
            continue
        real = os.path.realpath(root / "gentoo" / p)
        if real != top and not real.startswith(top + os.sep):
            return True
        try:
            os.stat(root / "gentoo" / p)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return True
    return False


def reference_commit(work: Path, git_dir: Path, index: Path, tag: str, ts: int, parent: str | None) -> str:
    env = {**os.environ, **GIT_ENV, "GIT_DIR": str(git_dir), "GIT_WORK_TREE": str(work), "GIT_INDEX_FILE": str(index),
           "GIT_AUTHOR_NAME": IDENTITY.name, "GIT_AUTHOR_EMAIL": IDENTITY.email, "GIT_AUTHOR_DATE": f"{ts} +0000",
           "GIT_COMMITTER_NAME": IDENTITY.name, "GIT_COMMITTER_EMAIL": IDENTITY.email,
           "GIT_COMMITTER_DATE": f"{ts} +0000"}
    subprocess.run(["git", "add", "-A", "."], cwd=work, env=env, check=True)
    tree = subprocess.run(["git", "write-tree"], env=env, check=True, capture_output=True, text=True).stdout.strip()
    args = ["git", "commit-tree", tree, "-F", "-"] + (["-p", parent] if parent else [])
    return subprocess.run(args, env=env, input=importer.commit_message(tag), check=True,
                          capture_output=True).stdout.decode().strip()


def refs(repo: Path) -> str:
    return subprocess.run(["git", f"--git-dir={repo}", "for-each-ref"], capture_output=True, text=True,
                          check=True).stdout


counter = itertools.count()


def import_day(base: Path, day: date, tree: Tree, parent: str | None) -> str | None:
    """Import `tree` as the snapshot of `day` through every importer path (the repositories under `base`
    carry the previous days) and check them against the reference (which continues from `parent`): the
    reference commit, or None if the tree had to be refused (and was, on every path)."""
    src = base / f"src-{day}"
    materialize(src, day, tree)
    tarball = base / f"gentoo-{day:%Y%m%d}.tar.xz"
    with open(tarball, "wb") as out:
        tar = subprocess.Popen(["tar", "--format=gnu", "-C", str(src), "-cf", "-", "gentoo"],
                               stdout=subprocess.PIPE)
        subprocess.run(["xz", "-0", "-c"], stdin=tar.stdout, stdout=out, check=True)
        assert tar.wait() == 0
    extracted = base / f"ref-{day}"
    extracted.mkdir()
    subprocess.run(["tar", "-C", str(extracted), "-xf", str(tarball)], check=True)
    bad = refused(extracted, tree)
    results = {}
    for path in ("cold", "warm", "split"):
        repo = base / f"{path}.git"
        if path == "cold":
            shutil.rmtree(repo / "snapshotter", ignore_errors=True)
        old = importer.PARALLEL_AFTER
        importer.PARALLEL_AFTER = 0 if path == "split" else 10**9
        try:
            if bad:
                before = refs(repo) if repo.exists() else ""
                with pytest.raises(SnapshotError, match="points outside the tree|a loop"):
                    importer.import_tarball(Repository(repo), tarball, IDENTITY, file_day=day)
                assert refs(repo) == before
                continue
            results[path] = importer.import_tarball(Repository(repo), tarball, IDENTITY, file_day=day).commit
        finally:
            importer.PARALLEL_AFTER = old
    if bad:
        return None
    tag = importer.snapshot.tag_for(snapshot_time(day))
    ref_git = base / "ref.git"
    parent = reference_commit(extracted / "gentoo", ref_git, base / "ref.index", tag, snapshot_time(day), parent)
    assert results == {"cold": parent, "warm": parent, "split": parent}, tree
    return parent


@pytest.mark.skipif(shutil.which("tar") is None or shutil.which("xz") is None, reason="needs tar and xz")
@settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_every_importer_path_matches_git_add(tmp_path: Path, data: st.DataObject) -> None:
    base = tmp_path / f"example-{next(counter)}"
    ref_git = base / "ref.git"
    subprocess.run(["git", "init", "-q", "--bare", str(ref_git)], check=True, env={**os.environ, **GIT_ENV})
    parent: str | None = None
    tree: Tree | None = None
    for day in DAYS:
        tree = data.draw(trees(tree))
        parent = import_day(base, day, tree, parent)
        if parent is None:
            return


@pytest.mark.skipif(shutil.which("tar") is None or shutil.which("xz") is None, reason="needs tar and xz")
def test_exec_bit_is_the_owners_as_in_git_add(tmp_path: Path) -> None:
    """git's rule: a file is executable when its owner may execute it (S_IXUSR); group or other exec bits
    alone do not count (0654, 0645, 0611 are 100644; 0744 is 100755). Both days, every path; the second
    day flips the owner's bit of two files (a mode-only change through the warm tree cache)."""
    ref_git = tmp_path / "ref.git"
    subprocess.run(["git", "init", "-q", "--bare", str(ref_git)], check=True, env={**os.environ, **GIT_ENV})
    modes = {"g": 0o654, "o": 0o645, "go": 0o611, "u": 0o744, "all": 0o755, "none": 0o644}
    day1: Tree = {f"bin/{name}": ("file", name, mode) for name, mode in modes.items()}
    parent = import_day(tmp_path, DAYS[0], day1, None)
    assert parent is not None
    listing = subprocess.run(["git", f"--git-dir={tmp_path / 'cold.git'}", "ls-tree", "-r", parent, "bin/"],
                             capture_output=True, text=True, check=True).stdout
    assert {line.split("\t")[1]: line.split()[0] for line in listing.splitlines()} == {
        "bin/g": "100644", "bin/o": "100644", "bin/go": "100644", "bin/u": "100755", "bin/all": "100755",
        "bin/none": "100644"}
    day2 = dict(day1)
    day2["bin/g"] = ("file", "g", 0o754)
    day2["bin/u"] = ("file", "u", 0o644)
    assert import_day(tmp_path, DAYS[1], day2, parent) is not None
