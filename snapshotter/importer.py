"""Importing one snapshot tarball into the git mirror with `git fast-import`.

Only what changed against the previous commit is sent: each file's git blob id is computed while the
tarball streams by and compared with the previous tree; changed files go to fast-import as blobs at once
(nothing is held in memory), and the commit lists just the deletions and the changed paths. The commit is
written to a private staging ref; `main` and the new tag move together in one `git update-ref`
transaction after every object is complete, so no tag ever points at a partial tree, and kill -9 at any
moment leaves at worst unreferenced objects that `git gc` prunes.

Commit and tag dates are the snapshot's timestamp.x and the identity comes from the configuration, so the
same snapshots give the same commit and tag ids on any machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import marshal
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from snapshotter import snapshot
from snapshotter.errors import SnapshotError, SnapshotterError
from snapshotter.gitrepo import Mirror, git, git_env, tag_date

log = logging.getLogger(__name__)

STAGING_REF = "refs/snapshotter/import"


@dataclass(frozen=True)
class Identity:
    """Who authors, commits and tags the imports."""

    name: str
    email: str

    def line(self, timestamp: int) -> bytes:
        for ch in "<>\n":
            if ch in self.name or ch in self.email:
                raise SnapshotterError(f"identity {self.name!r} <{self.email}> contains {ch!r}")
        return f"{self.name} <{self.email}> {timestamp} +0000".encode()


@dataclass(frozen=True)
class ImportResult:
    tag: str
    commit: str
    changed: int  # files added, modified or deleted against the previous snapshot
    timestamp: int


def commit_message(tag: str) -> bytes:
    return f"Update portage tree to {tag}\n".encode()


def tag_message(tag: str) -> bytes:
    return f"Tagging {tag}\n".encode()


def _quote(path: bytes) -> bytes:
    """fast-import path syntax: C-style quoting when the path needs it."""
    if not path.startswith(b'"') and b"\n" not in path and b"\\" not in path and not path.startswith(b" "):
        return path
    out = path.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n")
    return b'"' + out + b'"'


# The tree of a commit as the importer keeps it: path -> git mode (6 bytes) + raw blob id (20 bytes).
Tree = dict[bytes, bytes]


def _cache_path(mirror: Mirror) -> Path:
    return mirror.state_dir / "tree.cache"


def previous_tree(mirror: Mirror, commit: str | None) -> Tree:
    """The tree of `commit`: from the cache the last import left, else from `git ls-tree`."""
    if commit is None:
        return {}
    try:
        with open(_cache_path(mirror), "rb") as f:
            cached_commit, tree = marshal.load(f)
        if cached_commit == commit and isinstance(tree, dict):
            return tree
    except (OSError, EOFError, ValueError, TypeError):
        pass
    out = git(mirror.path, "ls-tree", "-r", "-z", "--full-tree", commit).stdout
    tree = {}
    for entry in out.split(b"\0"):
        if entry:
            meta, _, path = entry.partition(b"\t")
            tree[path] = meta[:6] + bytes.fromhex(meta[-40:].decode())
    return tree


def _save_tree(mirror: Mirror, commit: str, tree: Tree) -> None:
    """Cache the new tree for the next import (atomic; a stale or missing cache only costs time)."""
    path = _cache_path(mirror)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tree.cache.{os.getpid()}")
    with open(tmp, "wb") as f:
        marshal.dump((commit, tree), f)
    os.replace(tmp, path)


class _FastImport:
    """A `git fast-import` child fed through a pipe; its errors are kept for the message."""

    def __init__(self, mirror: Mirror) -> None:
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            ["git", f"--git-dir={mirror.path}", "fast-import", "--quiet", "--done", "--force",
             "--date-format=raw"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._err,
            # zlib allocates and frees its deflate state for every object; without a high trim
            # threshold glibc returns that memory to the kernel each time and page-faults it back,
            # which doubled fast-import's time on a first import (measured: 1.9 s of system time).
            env=git_env({"MALLOC_TRIM_THRESHOLD_": str(256 << 20)}), bufsize=1 << 20)
        assert self.proc.stdin is not None
        try:  # let fast-import run ahead of us
            fcntl.fcntl(self.proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        self.write = self.proc.stdin.write

    def finish(self) -> None:
        self.write(b"done\n")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        if self.proc.wait() != 0:
            self._err.seek(0)
            lines = self._err.read().decode(errors="replace").strip().splitlines()
            raise SnapshotterError(f"git fast-import failed: {lines[-1] if lines else 'exit ' + str(self.proc.returncode)}")

    def abort(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass


def import_tarball(mirror: Mirror, tarball: Path, identity: Identity, *, file_day: date | None = None,
                   sign_tag: Callable[[bytes], bytes] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> ImportResult:
    """Import `tarball` as the next commit of `mirror` and tag it; return what was done.

    `file_day` is the date in the snapshot's file name: its timestamp.x must lie in [D, D + 2 days].
    The snapshot must be newer than the newest tag. `sign_tag(tag_body) -> armored signature` signs the
    annotated tag when given. Raises SnapshotError for a bad or unsafe snapshot; refs are untouched then.
    """
    mirror.create()
    parent = mirror.head()
    newest = mirror.newest_tag()
    seen: set[bytes] = set()
    modified = bytearray()  # the commit's `M` lines, written once the timestamp is known
    timestamp: int | None = None
    fi = _FastImport(mirror)
    try:
        write = fi.write
        with snapshot.decompressed(tarball, progress) as stream:
            # Loaded while the decompressor already runs ahead; becomes the new tree as the tarball
            # streams by.
            tree = previous_tree(mirror, parent)
            for path, mode, data, link_to in snapshot.members(stream):
                if link_to is not None:
                    entry = tree.get(link_to)
                    if entry is None or link_to not in seen or entry[:6] == snapshot.MODE_LINK:
                        raise SnapshotError(f"hardlink {path.decode(errors='replace')!r} points to "
                                            f"{link_to.decode(errors='replace')!r}, not an earlier file of the tree")
                    if tree.get(path) != entry:
                        modified += b"M %s %s %s\n" % (entry[:6], entry[6:].hex().encode(), _quote(path))
                    tree[path] = entry
                    seen.add(path)
                    continue
                if path == snapshot.TIMESTAMP_PATH:
                    timestamp = snapshot.parse_timestamp(data)
                h = hashlib.sha1(b"blob %d\0" % len(data))
                h.update(data)
                entry = mode + h.digest()
                seen.add(path)
                old = tree.get(path)
                if old == entry:
                    continue
                if old is None or old[6:] != entry[6:]:  # new content (a mode change alone needs no blob)
                    write(b"blob\ndata %d\n%s\n" % (len(data), data))
                tree[path] = entry
                modified += b"M %s %s %s\n" % (mode, h.hexdigest().encode(), _quote(path))
        if timestamp is None:
            raise SnapshotError("snapshot has no metadata/timestamp.x")
        if file_day is not None:
            snapshot.check_timestamp(timestamp, file_day)
        tag = snapshot.tag_for(timestamp)
        if newest is not None and tag_date(tag) <= newest.day:  # type: ignore[operator]
            raise SnapshotError(f"snapshot {tag} is not newer than the newest tag {newest.name}; refusing to "
                                "commit it on top")

        deleted = [p for p in tree if p not in seen]
        for p in deleted:
            del tree[p]
        msg = commit_message(tag)
        who = identity.line(timestamp)
        write(b"commit %s\n" % STAGING_REF.encode())
        write(b"author %s\ncommitter %s\n" % (who, who))
        write(b"data %d\n%s" % (len(msg), msg))
        write(b"from %s\n" % parent.encode() if parent else b"deleteall\n")
        # Deletions first: a path that turned from a file into a directory (or back) needs it.
        write(b"".join(b"D %s\n" % _quote(p) for p in deleted))
        write(modified)
        write(b"\n")
        fi.finish()
    except SnapshotError as e:
        fi.abort()
        raise SnapshotError(f"{tarball.name}: {e}") from None
    except BaseException:
        fi.abort()
        raise

    commit = git(mirror.path, "rev-parse", "--verify", f"{STAGING_REF}^{{commit}}").stdout.decode().strip()
    tag_obj = make_tag(mirror, commit, tag, identity, timestamp, sign_tag)
    # Move main and create the tag in one transaction; the old value of main is checked.
    old = parent or "0" * 40
    transaction = (f"update {mirror.branch_ref} {commit} {old}\n"
                   f"create refs/tags/{tag} {tag_obj}\n"
                   f"delete {STAGING_REF}\n").encode()
    git(mirror.path, "update-ref", "--stdin", input=transaction)
    _save_tree(mirror, commit, tree)
    changed = len(deleted) + modified.count(b"\n")
    log.debug("imported %s as %s (%d files changed)", tarball.name, commit, changed)
    return ImportResult(tag, commit, changed, timestamp)


def make_tag(mirror: Mirror, commit: str, tag: str, identity: Identity, timestamp: int,
             sign_tag: Callable[[bytes], bytes] | None = None) -> str:
    """Write the annotated tag object (optionally signed) and return its id; no ref is touched."""
    body = (b"object %s\ntype commit\ntag %s\ntagger %s\n\n%s"
            % (commit.encode(), tag.encode(), identity.line(timestamp), tag_message(tag)))
    if sign_tag is not None:
        body += sign_tag(body)
    return git(mirror.path, "mktag", input=body).stdout.decode().strip()
