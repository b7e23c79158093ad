"""export_tree / `snapshotter export`: a tag's tree into a directory, with real git and hostile trees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import testlib
from helpers.gitobjects import bare_repo_from, blob, commit_tag, git, raw_tree

from snapshotter.errors import SnapshotError, SnapshotterError
from snapshotter.git.export import export_tree

FILES = {
    **testlib.BASE_TREE,
    "metadata/timestamp.x": "1767228300 Thu, 01 Jan 2026 00:45:00 +0000\n",
    "profiles/link": ("symlink", "repo_name"),
    "scripts/up": ("symlink", "../sys-apps/tool/files/run.sh"),
    "a/" + "long-directory-name-" * 6 + "/" + "f" * 120 + ".ebuild": "long\n",
    "bin/data.bin": bytes(range(256)) * 40,
    "empty": "",
}


def test_export_matches_tag(tmp_path: Path) -> None:
    repo = bare_repo_from(tmp_path, FILES)
    dest = tmp_path / "out" / "tree"
    export_tree(repo, "2026-01-01", dest)
    for rel, value in FILES.items():
        p = dest / rel
        if isinstance(value, tuple) and value[0] == "symlink":
            assert p.is_symlink() and os.readlink(p) == value[1]
            continue
        content = value[1] if isinstance(value, tuple) else value
        assert p.read_bytes() == (content.encode() if isinstance(content, str) else content)
        expected = 0o755 if isinstance(value, tuple) and value[0] == "exec" else 0o644
        assert p.stat().st_mode & 0o7777 == expected, rel
    # Nothing else, and every mtime is the commit's.
    found = {str(p.relative_to(dest)) for p in dest.rglob("*") if not p.is_dir()}
    assert found == set(FILES)
    assert {p.lstat().st_mtime for p in dest.rglob("*")} == {1700000000}
    assert (dest / "sys-apps").stat().st_mode & 0o7777 == 0o755


def test_export_refuses_non_empty_and_bad_names(tmp_path: Path) -> None:
    repo = bare_repo_from(tmp_path, {"a": "x\n"})
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(SnapshotterError, match="not empty"):
        export_tree(repo, "2026-01-01", dest)
    assert (dest / "keep").read_text() == "mine"
    for rev in ("--output=/tmp/x", "2026-01-01..HEAD", "no-such-tag"):
        with pytest.raises(SnapshotterError):
            export_tree(repo, rev, tmp_path / "fresh")


@pytest.mark.parametrize("case", ["dotdot", "symlink-dir-then-file", "absolute-symlink", "climbing-symlink",
                                  "slash-in-name"])
def test_export_refuses_escapes(tmp_path: Path, case: str) -> None:
    """Crafted trees (written with --literally, as a hostile import could) never write outside DEST."""
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    f = blob(repo, b"pwned\n")
    if case == "dotdot":
        inner = raw_tree(repo, [("100644", "x", f)])
        tree = raw_tree(repo, [("40000", "..", inner)])
    elif case == "symlink-dir-then-file":
        inner = raw_tree(repo, [("100644", "x", f)])  # a symlink "a" -> "b", then a directory "a"
        tree = raw_tree(repo, [("120000", "a", blob(repo, b"b")), ("40000", "a", inner), ("40000", "b", inner)])
    elif case == "absolute-symlink":
        tree = raw_tree(repo, [("120000", "a", blob(repo, b"/etc/passwd"))])
    elif case == "climbing-symlink":
        inner = raw_tree(repo, [("120000", "l", blob(repo, b"../../victim"))])
        tree = raw_tree(repo, [("40000", "d", inner)])
    else:
        tree = raw_tree(repo, [("100644", "../victim/x", f)])
    commit_tag(repo, tree, "2026-01-01")
    dest = tmp_path / "dest"
    with pytest.raises(SnapshotError, match="unsafe path|outside the tree|not a directory of the tree|cannot create"):
        export_tree(repo, "2026-01-01", dest)
    assert list(victim.iterdir()) == []
    assert not (tmp_path / "x").exists()
    assert not any(p.name == "x" and p.parent.name == "b" for p in dest.rglob("x"))


def test_export_cli(tmp_path: Path) -> None:
    repo = bare_repo_from(tmp_path, FILES)
    r = testlib.run_cli("export", "--repo", str(repo), "2026-01-01", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t/metadata/timestamp.x").read_text() == FILES["metadata/timestamp.x"]
    for bad, msg in (("2026-02-30", "not a snapshot tag"), ("2025-12-31", "no tag 2025-12-31"),
                     ("$(id)", "not a snapshot tag")):
        r = testlib.run_cli("export", "--repo", str(repo), bad, str(tmp_path / "u"))
        assert r.returncode == 1
        assert r.stderr.startswith("snapshotter: error: ") and msg in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "u").exists()


def test_export_many_directories_with_few_file_descriptors(tmp_path: Path) -> None:
    """Only the directories along the current path are held open: 300 directories under a limit of 64."""
    files = {f"cat-{i // 20}/pkg-{i}/pkg-{i}-1.ebuild": f"EAPI=8 # {i}\n" for i in range(300)}
    repo = bare_repo_from(tmp_path, files)
    code = ("import resource, sys; from pathlib import Path; from snapshotter.git.export import export_tree; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
            "export_tree(Path(sys.argv[1]), '2026-01-01', Path(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, str(repo), str(tmp_path / "out")], check=True, timeout=120)
    assert sum(1 for p in (tmp_path / "out").rglob("*.ebuild")) == 300


def test_export_error_mid_stream_does_not_hang(tmp_path: Path) -> None:
    """An error while git still has megabytes of blobs queued ends promptly (no pipe deadlock)."""
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    # More queued ids than a pipe holds (64 KiB: ~1600 ids) and more data than git can buffer.
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2500):
        (src / f"f{i:04d}").write_bytes(f"{i}\n".encode() * 50)
    paths = "\n".join(str(p) for p in sorted(src.iterdir())).encode()
    oids = git(repo, "hash-object", "-w", "--stdin-paths", input=paths).split()
    big = [("100644", f"f{i:04d}", oid) for i, oid in enumerate(oids)]
    tree = raw_tree(repo, [("120000", "a-bad-link", blob(repo, b"/etc/passwd")), *big])
    commit_tag(repo, tree, "2026-01-01")
    r = testlib.run_cli("export", "--repo", str(repo), "2026-01-01", str(tmp_path / "out"), timeout=60)
    assert r.returncode == 1 and "points outside the tree" in r.stderr
