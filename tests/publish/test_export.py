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
                                  "slash-in-name", "file-then-dir", "chained-symlinks", "not-utf8"])
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
    elif case == "file-then-dir":  # tar would replace the file "a" by the directory, or write through it
        inner = raw_tree(repo, [("100644", "x", f)])
        tree = raw_tree(repo, [("100644", "a", f), ("40000", "a", inner)])
    elif case == "chained-symlinks":  # each link alone stays inside; through the other, "b" climbs out
        inner = raw_tree(repo, [("120000", "up", blob(repo, b".."))])
        tree = raw_tree(repo, [("120000", "b", blob(repo, b"d/up/../victim")), ("40000", "d", inner)])
    elif case == "not-utf8":
        body = b"100644 \xff\xfe\0" + bytes.fromhex(f)
        tree = git(repo, "hash-object", "-t", "tree", "-w", "--literally", "--stdin", input=body)
    else:
        tree = raw_tree(repo, [("100644", "../victim/x", f)])
    commit_tag(repo, tree, "2026-01-01")
    dest = tmp_path / "dest"
    with pytest.raises(SnapshotError, match="unsafe path|outside the tree|not a directory of the tree|appears twice|not UTF-8"):
        export_tree(repo, "2026-01-01", dest)
    assert not dest.exists()  # refused before anything was written
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


def snapshot_of(root: Path) -> dict[str, tuple]:
    """Everything export promises about a directory tree: per path its kind, mode, mtime and content or
    link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p), st.st_mtime)
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, st.st_mtime)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, st.st_mtime, p.read_bytes())
    return out


def reference_archive(repo: Path, rev: str, dest: Path) -> None:
    """The plain `git archive | tar -x` that export is measured against, with export's modes (git's own
    default would be 0664/0775, tar.umask 002)."""
    dest.mkdir()
    archive = subprocess.Popen(["git", f"--git-dir={repo}", "-c", "tar.umask=022", "archive", "--format=tar", rev],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    assert archive.stdout is not None
    archive.stdout.close()
    assert archive.wait() == 0


def test_export_equals_git_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast export writes what `git archive | tar -x` writes, with export's rules on top: whatever
    the umask and TAR_OPTIONS, files 0644/0755, directories 0755, every mtime the commit's; a link whose
    target climbs with `..` (which tar delays) is a link with its time set too."""
    files = {**FILES, "deep/a/b/c/d/file": "deep\n", "deep/a/b/back": ("symlink", "../../../profiles/repo_name"),
             "deep/x y\tz\\w": "odd name\n", "ünï/cödé": "utf-8\n"}
    repo = bare_repo_from(tmp_path, files)
    reference = tmp_path / "reference"
    old = os.umask(0o022)
    try:
        reference_archive(repo, "2026-01-01", reference)
        os.umask(0o077)
        monkeypatch.setenv("TAR_OPTIONS", "--strip-components=1 --to-stdout")
        export_tree(repo, "2026-01-01", tmp_path / "out")
    finally:
        os.umask(old)
    got, want = snapshot_of(tmp_path / "out"), snapshot_of(reference)
    assert got == want
    assert {v[2] for v in got.values()} == {1700000000}
    assert {v[1] for v in got.values() if v[0] != "link"} == {0o644, 0o755}
    assert all(v[1] == 0o755 for v in got.values() if v[0] == "dir")
    assert got["deep/a/b/back"][:2] == ("link", "../../../profiles/repo_name")


GITATTRIBUTES = (b"* text eol=crlf ident\n"
                 b"subst export-subst\n"
                 b"ignored export-ignore\n"
                 b"ignored-dir export-ignore\n"
                 b"utf16 working-tree-encoding=UTF-16LE\n"
                 b"filtered filter=upper\n"
                 b"[attr]mine export-ignore\n"
                 b"macro mine\n")


def test_export_is_the_blobs_whatever_gitattributes_say(tmp_path: Path) -> None:
    """`git archive` obeys the tree's .gitattributes (export-ignore, export-subst, eol conversion, ident,
    smudge filters, working-tree-encoding) and the repository's config (core.autocrlf, filter drivers):
    export writes every blob byte for byte, and every file."""
    files: dict[str, str | bytes | tuple] = {
        ".gitattributes": GITATTRIBUTES,
        "plain": "line 1\nline 2 $Id$\n",
        "subst": "commit $Format:%H$ of $Format:%cd$\n",
        "ignored": "still exported\n",
        "ignored-dir/inside": "me too\n",
        "utf16": "hello\n",
        "filtered": "lower case\n",
        "macro": "ignored through a macro\n",
        "sub/.gitattributes": "* export-ignore\n",
        "sub/kept": "kept\n",
    }
    repo = bare_repo_from(tmp_path, files)
    git(repo, "config", "core.autocrlf", "true")
    git(repo, "config", "filter.upper.smudge", "tr a-z A-Z")
    # git itself changes these files on archive: the test means something
    reference = tmp_path / "reference"
    reference_archive(repo, "2026-01-01", reference)
    assert not (reference / "ignored").exists() and b"Format" not in (reference / "subst").read_bytes()
    assert (reference / "plain").read_bytes() != b"line 1\nline 2 $Id$\n"
    dest = tmp_path / "out"
    export_tree(repo, "2026-01-01", dest)
    for rel in files:
        blob_bytes = subprocess.run(["git", f"--git-dir={repo}", "cat-file", "blob", f"2026-01-01:{rel}"],
                                    check=True, capture_output=True).stdout
        assert (dest / rel).read_bytes() == blob_bytes, rel
    assert (dest / "subst").read_bytes() == b"commit $Format:%H$ of $Format:%cd$\n"
    assert {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()} == set(files)


def test_gitlink_is_an_empty_directory(tmp_path: Path) -> None:
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    f = blob(repo, b"x\n")
    first = commit_tag(repo, raw_tree(repo, [("100644", "f", f)]), "2025-12-31")
    commit_tag(repo, raw_tree(repo, [("160000", "sub", first), ("100644", "z", f)]), "2026-01-01")
    export_tree(repo, "2026-01-01", tmp_path / "out")
    assert (tmp_path / "out/sub").is_dir() and list((tmp_path / "out/sub").iterdir()) == []
    assert (tmp_path / "out/z").read_bytes() == b"x\n"
