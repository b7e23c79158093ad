"""A failed `export` leaves no partial tree (issue 12, point 12): real git, a crafted tree that is refused,
and a repository that fails half-way through writing (a blob missing from the object store)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import testlib
from helpers.gitobjects import blob, commit_tag, raw_tree

from snapshotter.errors import SnapshotError, SnapshotterError
from snapshotter.git.export import export_tree


def half_bad_repo(tmp_path: Path) -> Path:
    """A tag whose tree has files and a directory first, then an absolute symlink that export refuses."""
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    f = blob(repo, b"content\n")
    inner = raw_tree(repo, [("100644", "file", f), ("120000", "up", blob(repo, b".."))])
    tree = raw_tree(repo, [("100644", "a", f), ("40000", "b", inner), ("120000", "z", blob(repo, b"/etc/passwd"))])
    commit_tag(repo, tree, "2026-01-01")
    return repo


@pytest.mark.parametrize("exists", [False, True])
def test_failed_export_removes_what_it_wrote(tmp_path: Path, exists: bool) -> None:
    repo = half_bad_repo(tmp_path)
    dest = tmp_path / "out"
    if exists:
        dest.mkdir()
    with pytest.raises(SnapshotError):
        export_tree(repo, "2026-01-01", dest)
    # An empty directory given by the caller stays (empty); one export made is gone.
    assert (list(dest.iterdir()) == []) if exists else not dest.exists()
    assert Path("/etc/passwd").exists()


def test_failed_export_cli_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    repo = half_bad_repo(tmp_path)
    out = testlib.run_cli("export", "--repo", str(repo), "2026-01-01", str(tmp_path / "t"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("snapshotter: error:")]
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("exists", [False, True])
def test_export_failing_while_writing_removes_what_it_wrote(tmp_path: Path, exists: bool) -> None:
    """The tree passes every check, files are written, then `git archive` cannot read a blob: the error
    names git, and nothing of the tree stays."""
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    files = [("100644", f"f{i:03d}", blob(repo, f"file {i}\n".encode() * 200)) for i in range(200)]
    lost = blob(repo, b"this blob is lost\n")
    inner = raw_tree(repo, files[:50])
    tree = raw_tree(repo, [("40000", "a", inner), *files, ("100644", "zz-lost", lost)])
    commit_tag(repo, tree, "2026-01-01")
    os.unlink(repo / "objects" / lost[:2] / lost[2:])
    dest = tmp_path / "out"
    if exists:
        dest.mkdir()
    with pytest.raises(SnapshotterError, match="git archive"):
        export_tree(repo, "2026-01-01", dest)
    assert (list(dest.iterdir()) == []) if exists else not dest.exists()
