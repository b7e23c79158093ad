"""Importing one snapshot tarball into the snapshot repository with `git fast-import`.

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

import errno
import fcntl
import hashlib
import logging
import marshal
import os
import re
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from snapshotter.config import Config
from snapshotter.errors import SnapshotError, SnapshotterError, child_failure
from snapshotter.fsutil import atomic_write
from snapshotter.git.export import check_links
from snapshotter.git.repository import Repository, git, git_env, git_out, tag_date
from snapshotter.sync import tarstream as snapshot
from snapshotter.sync.tarstream import TIMESTAMP_PATH

log = logging.getLogger(__name__)

STAGING_REF = "refs/snapshotter/import"
PART_REFS = ("refs/snapshotter/import-part-1", "refs/snapshotter/import-part-2")  # a split import's halves

# After this many new blobs in one import, a second `git fast-import` takes part of the rest, so that
# compressing them uses both cores (a first import: 114k blobs, 3.4 s of CPU in one process). A typical
# day (under a thousand changed files) never gets there. With a single usable CPU there is nothing to gain.
PARALLEL_AFTER = 4000 if len(os.sched_getaffinity(0)) > 1 else 1 << 62


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


_NEEDS_QUOTES = re.compile(rb'^[" ]|[\n\\]').search  # what `_quote` changes; checked first on the hot path


def _quote(path: bytes) -> bytes:
    """fast-import path syntax: C-style quoting when the path needs it."""
    if not path.startswith(b'"') and b"\n" not in path and b"\\" not in path and not path.startswith(b" "):
        return path
    out = path.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n")
    return b'"' + out + b'"'


# The tree of a commit as the importer keeps it: path -> git mode (6 bytes) + raw blob id (20 bytes).
Tree = dict[bytes, bytes]


def _cache_path(repo: Repository) -> Path:
    return repo.state_dir / "tree.cache"


def _cache_dir(repo: Repository) -> int:
    """A descriptor of the cache's directory, never through a symlink (pushers can write the repository's
    top and replace snapshotter/ with one): OSError then."""
    return os.open(repo.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _drop_cache(repo: Repository) -> None:
    """Remove the cache (OSError if its directory cannot be used)."""
    dfd = _cache_dir(repo)
    try:
        os.unlink(_cache_path(repo).name, dir_fd=dfd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dfd)


def previous_tree(repo: Repository, commit: str | None) -> Tree:
    """The tree of `commit`: from the cache the last import left, else from `git ls-tree`."""
    if commit is None:
        return {}
    try:
        dfd = _cache_dir(repo)
        try:
            fd = os.open(_cache_path(repo).name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            os.close(dfd)
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            # Only a cache we wrote ourselves: the directory is inside the repository, whose top every
            # pusher can write, and a planted cache would decide what the next commit keeps or deletes.
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022:
                cached_commit, tree = marshal.loads(f.read())  # load(f) would read piece by piece: 4x slower
                if cached_commit == commit and isinstance(tree, dict):
                    return tree
    except (OSError, EOFError, ValueError, TypeError):
        pass
    out = git(repo.path, "ls-tree", "-r", "-z", "--full-tree", commit).stdout
    tree = {}
    for entry in out.split(b"\0"):
        if entry:
            meta, _, path = entry.partition(b"\t")
            tree[path] = meta[:6] + bytes.fromhex(meta[-40:].decode())
    return tree


def _save_tree(repo: Repository, commit: str, tree: Tree) -> None:
    """Cache the new tree for the next import (atomic; a stale or missing cache only costs time)."""
    path = _cache_path(repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # never through a symlink planted for snapshotter/ (pushers can write the repository's top)
        atomic_write(path, marshal.dumps((commit, tree)), durable=False, nofollow_dir=True)
    except SnapshotterError as e:
        raise OSError(errno.ELOOP, str(e)) from None


class _FastImport:
    """A `git fast-import` child fed through a pipe; its errors are kept for the message."""

    def __init__(self, repo: Repository) -> None:
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            ["git", f"--git-dir={repo.path}", "fast-import", "--quiet", "--done", "--force",
             "--date-format=raw", f"--big-file-threshold={snapshot.STREAM_OVER}"],
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
            raise SnapshotterError(f"git fast-import failed: {self.reason()}")

    def reason(self) -> str:
        """Why fast-import failed, from its own stderr: its first `fatal:`/`error:` line (what follows is
        its crash report note and the errors of dying), else its last line, else its exit status. Call
        after it exited."""
        self._err.seek(0)
        err = self._err.read()
        said = [line for line in err.decode(errors="replace").splitlines()
                if line.startswith(("fatal:", "error:"))]
        return said[0] if said else child_failure(err, self.proc.returncode if self.proc.returncode is not None else -1)

    def abort(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass


def _unit(path: bytes) -> bytes:
    """The part of the tree `path` belongs to when an import is split over two fast-imports.

    A top-level directory (a category, eclass/, profiles/, ...) or one `metadata/md5-cache/<category>`;
    b"metadata" for the rest of metadata/ and b"" for top-level files, which stay with the main process.
    Parts never nest, so a part's subtree can be grafted whole.
    """
    top, slash, rest = path.partition(b"/")
    if not slash:
        return b""
    if top == b"metadata":
        if rest.startswith(b"md5-cache/"):
            end = rest.find(b"/", 10)
            if end > 0:
                return path[:9 + end]
        return b"metadata"
    return top


class _Split:
    """Routes new blobs and the commit's lines to one fast-import, or to two on a big import.

    Up to PARALLEL_AFTER new blobs everything goes to the main process. After that a second process
    starts, and each part of the tree (`_unit`) seen from then on goes wholly to the process that has been
    sent fewer bytes, so fast-import still finds its deltas (each blob is tried against the one before it
    in the same stream: versions of one ebuild, neighbouring md5-cache entries). At the end both processes
    commit their parts on the same parent, each writing its own share of the trees, and a short third
    fast-import puts the two together. Hardlinks come last, when every blob is in place.
    """

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._pack_dir = repo.path / "objects" / "pack"
        self._temps_before = self._temp_packs()
        self.procs = [_FastImport(repo)]
        self._sent = [0]
        self.lines = [bytearray()]  # the commit's `M` lines for each process's parts
        self.late = bytearray()  # hardlinks: their blob may be in either process's pack
        self.owner: dict[bytes, int] = {}
        self._count = 0
        self._prefix = b"\0"  # paths starting with it belong to part self._i (b"\0": none do)
        self._i = 0

    def _route(self, path: bytes) -> int:
        """Which process takes `path`: its part's owner, decided when the part is first seen."""
        if path.startswith(self._prefix):  # the same part as the path before: the common case
            return self._i
        unit = _unit(path)
        i = self.owner.get(unit)
        if i is None:
            i = 0
            if len(self.procs) == 1 and self._count > PARALLEL_AFTER:
                self.procs.append(_FastImport(self._repo))
                self._sent.append(0)
                self.lines.append(bytearray())
            if len(self.procs) == 2 and unit not in (b"", b"metadata") and self._sent[1] < self._sent[0]:
                i = 1
            self.owner[unit] = i
        # b"metadata/" would also match the md5-cache parts: no shortcut for it (nor for top-level files)
        self._prefix = unit + b"/" if unit not in (b"", b"metadata") else b"\0"
        self._i = i
        return i

    def stream(self, path: bytes, big: snapshot.Streamed) -> bytes:
        """A big file, streamed through as a blob in chunks (memory: one chunk); its raw blob id.

        Sent whether or not it changed (its id is only known at the end); fast-import stores an object it
        already has only once.
        """
        i = self._route(path)
        self._count += 1
        self._sent[i] += big.size + 200
        write = self.procs[i].write
        h = hashlib.sha1(b"blob %d\0" % big.size)
        write(b"blob\ndata %d\n" % big.size)
        for chunk in big.chunks():
            h.update(chunk)
            write(chunk)
        write(b"\n")
        return h.digest()

    def blob(self, path: bytes, data: bytes, line: bytes) -> None:
        """A file with content that is new at this path."""
        i = self._route(path)
        self._count += 1
        self._sent[i] += len(data) + 200  # + a per-object cost, in bytes
        self.procs[i].write(b"blob\ndata %d\n%s\n" % (len(data), data))
        self.lines[i] += line

    def change(self, path: bytes, line: bytes) -> None:
        """A mode change: the blob is already in the repository."""
        self.lines[self._route(path)] += line

    def commit(self, parent: str | None, header: bytes, deleted: list[bytes]) -> str:
        """Write the commit to STAGING_REF: `header` (author, committer, message) on `parent`; its id.

        Split: both processes commit their parts on `parent` at the same time (each writes its own share
        of trees), then a short third fast-import takes the main part's tree, grafts the other part's
        subtrees into it and adds the hardlinks.
        """
        base = b"from %s\n" % parent.encode() if parent else b"deleteall\n"
        # Deletions first: a path that turned from a file into a directory (or back) needs it.
        dels = [bytearray() for _ in self.procs]
        for p in deleted:
            dels[self.owner.get(_unit(p), 0)] += b"D %s\n" % _quote(p)
        if len(self.procs) == 1:
            self.procs[0].write(b"commit %s\n%s%s%s%s%s\n" % (STAGING_REF.encode(), header, base, dels[0],
                                                               self.lines[0], self.late))
            self.procs[0].finish()
            return self._rev(f"{STAGING_REF}^{{commit}}")
        failed: list[BaseException] = []
        threads = [threading.Thread(target=self._commit_part, name=f"fast-import-{i}", args=(
            i, b"commit %s\n%s%s%s%s\n" % (PART_REFS[i].encode(), header, base, dels[i], self.lines[i]), failed))
            for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failed:
            raise failed[0]
        final = _FastImport(self._repo)
        self.procs.append(final)
        final.write(b"commit %s\n%s%sM 040000 %s \"\"\n%s%s\n" % (
            STAGING_REF.encode(), header, base, self._rev(f"{PART_REFS[0]}^{{tree}}").encode(), self._grafts(),
            self.late))
        final.finish()
        return self._rev(f"{STAGING_REF}^{{commit}}")

    def _commit_part(self, i: int, command: bytes, failed: list[BaseException]) -> None:
        try:
            self.procs[i].write(command)
            self.procs[i].finish()
        except BaseException as e:  # handed to the committing thread
            failed.append(e)

    def _rev(self, rev: str) -> str:
        return git_out(self._repo.path, "rev-parse", "--verify", rev)

    def _grafts(self) -> bytes:
        """`M 040000` lines putting the second process's part subtrees in place."""
        ids: dict[bytes, bytes] = {}
        theirs = [unit for unit, i in self.owner.items() if i == 1]
        for where, prefix in ((PART_REFS[1], b""), (f"{PART_REFS[1]}:metadata/md5-cache", b"metadata/md5-cache/")):
            if prefix and not any(u.startswith(prefix) for u in theirs):
                continue
            for entry in git(self._repo.path, "ls-tree", "-z", where).stdout.split(b"\0"):
                if entry:
                    meta, _, name = entry.partition(b"\t")
                    ids[prefix + name] = meta.split()[2]
        out = bytearray()
        for unit in theirs:
            if unit not in ids:
                raise SnapshotterError(f"split import: {unit.decode(errors='replace')!r} is missing from {PART_REFS[1]}")
            out += b"M 040000 %s %s\n" % (ids[unit], _quote(unit))
        return bytes(out)

    def changed(self) -> int:
        return sum(lines.count(b"\n") for lines in self.lines) + self.late.count(b"\n")

    def abort(self) -> None:
        """Stop every fast-import and remove the temporary packs they left (`tmp_pack_*`, `tmp_idx_*`,
        which hold everything sent so far: after a full disk they would keep the next try failing) and
        the crash reports of a fast-import that died (`fast_import_crash_*`: its reason is in the error)."""
        for proc in self.procs:
            proc.abort()
        for path in sorted(self._temp_packs() - self._temps_before):
            try:
                os.unlink(path)
                log.debug("removed %s after a failed import", path)
            except OSError as e:
                log.warning("cannot remove %s after a failed import: %s", path, e.strerror)

    def failure(self) -> str:
        """After `abort`: why fast-import stopped (a broken pipe says nothing), in its own words."""
        reasons = [p.reason() for p in self.procs]
        said = [r for r in reasons if r.startswith(("fatal:", "error:"))]
        return (said or reasons or ["no reason given"])[0]

    def _temp_packs(self) -> set[str]:
        """The paths of the temporary packs and crash reports now in the repository."""
        found: set[str] = set()
        for where, prefixes in ((self._pack_dir, ("tmp_pack_", "tmp_idx_")), (self._repo.path, ("fast_import_crash_",))):
            try:
                found.update(os.path.join(where, n) for n in os.listdir(where) if n.startswith(prefixes))
            except OSError:
                pass
        return found


def check_names(paths: set[bytes], links: dict[bytes, bytes]) -> None:
    """The door of the pipeline: what every later stage (export, publish, build) can carry, checked on the
    whole new tree before any ref moves, the same on every path through the importer (cold, cached tree,
    split). Refused with SnapshotError naming the member: a name that is not UTF-8 or holds NUL, a path
    that is both a file (or symlink) and a directory (`foo` and `foo/bar`: git can hold only one of them,
    and which one would depend on the order and on the cache), and a symlink that ends outside the tree,
    directly or through other links (git.export.check_links, the rule export and publish apply)."""
    joined = b"\n".join(paths)
    try:
        joined.decode()
    except UnicodeDecodeError:
        bad = min(p for p in paths if not _utf8(p))
        raise SnapshotError(f"member name is not UTF-8: {bad.decode(errors='replace')!r} ({bad!r})") from None
    if b"\0" in joined:
        bad = min(p for p in paths if b"\0" in p)
        raise SnapshotError(f"member name holds a NUL byte: {bad!r}")
    dirs: set[bytes] = set()
    for p in paths:
        d = p.rpartition(b"/")[0]
        while d and d not in dirs:
            dirs.add(d)
            d = d.rpartition(b"/")[0]
    clash = dirs & paths
    if clash:
        d = min(clash)
        inner = min(p for p in paths if p.startswith(d + b"/"))
        what = "symlink" if d in links else "file"
        raise SnapshotError(f"{d.decode()!r} is both a {what} and a directory ({inner.decode()!r}); "
                            "refusing the snapshot")
    targets: dict[str, str] = {}
    for p, t in links.items():
        try:
            targets[p.decode()] = t.decode()
        except UnicodeDecodeError:
            raise SnapshotError(f"symlink {p.decode()!r}: target is not UTF-8 ({t!r})") from None
    check_links(targets)


def _utf8(name: bytes) -> bool:
    try:
        name.decode()
    except UnicodeDecodeError:
        return False
    return True


def snapshot_limits(cfg: Config) -> snapshot.Limits:
    """The bounds of [sync] on what one snapshot may unpack to."""
    return snapshot.Limits(member=cfg.sync.max_member_size, unpacked=cfg.sync.max_unpacked_size)


def import_tarball(repo: Repository, tarball: Path, identity: Identity, *, file_day: date | None = None,
                   sign_tag: Callable[[bytes], bytes] | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   limits: snapshot.Limits = snapshot.Limits()) -> ImportResult:  # noqa: B008 (frozen)
    """Import `tarball` as the next commit of `repo` and tag it; return what was done.

    `file_day` is the date in the snapshot's file name: its timestamp.x must lie in [D, D + 2 days].
    The snapshot must be newer than the newest tag. `sign_tag(tag_body) -> armored signature` signs the
    annotated tag when given. Raises SnapshotError for a bad or unsafe snapshot; refs are untouched then.
    """
    repo.create()
    parent = repo.head()
    newest = repo.newest_tag()
    seen: set[bytes] = set()
    timestamp: int | None = None
    split = _Split(repo)
    try:
        # Locals for the loop below, which runs once per file (100k+ times on a first import).
        blob, change, sha1, see = split.blob, split.change, hashlib.sha1, seen.add
        links: dict[bytes, bytes] = {}
        link_mode = snapshot.MODE_LINK
        with snapshot.decompressed(tarball, progress) as stream:
            # Loaded while the decompressor already runs ahead; becomes the new tree as the tarball
            # streams by.
            tree = previous_tree(repo, parent)
            lookup = tree.get
            for path, mode, data, link_to in snapshot.members(stream, limits):
                if mode is link_mode and isinstance(data, bytes):  # a symlink's target: always bytes
                    links[path] = data
                if isinstance(link_to, snapshot.Streamed):  # a big file: never held whole
                    if path == TIMESTAMP_PATH:
                        raise SnapshotError(f"metadata/timestamp.x is {link_to.size} bytes: not a timestamp")
                    streamed = mode + split.stream(path, link_to)
                    see(path)
                    if lookup(path) != streamed:
                        tree[path] = streamed
                        change(path, b"M %s %s %s\n" % (mode, streamed[6:].hex().encode(), _quote(path)))
                    continue
                if link_to is not None:
                    entry = lookup(link_to)
                    if entry is None or link_to not in seen or entry[:6] == snapshot.MODE_LINK:
                        raise SnapshotError(f"hardlink {path.decode(errors='replace')!r} points to "
                                            f"{link_to.decode(errors='replace')!r}, not an earlier file of the tree")
                    if lookup(path) != entry:
                        split.late += b"M %s %s %s\n" % (entry[:6], entry[6:].hex().encode(), _quote(path))
                    tree[path] = entry
                    see(path)
                    continue
                if path == TIMESTAMP_PATH:
                    timestamp = snapshot.parse_timestamp(data)
                h = sha1(b"blob %d\0" % len(data))
                h.update(data)
                digest = h.digest()
                entry = mode + digest
                see(path)
                old = lookup(path)
                if old == entry:
                    continue
                tree[path] = entry
                line = b"M %s %s %s\n" % (mode, digest.hex().encode(), _quote(path) if _NEEDS_QUOTES(path) else path)
                if old is None or old[6:] != digest:
                    blob(path, data, line)
                else:  # a mode change alone needs no blob
                    change(path, line)
        check_names(seen, {p: t for p, t in links.items() if tree[p][:6] == link_mode})
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
        commit = split.commit(parent, b"author %s\ncommitter %s\ndata %d\n%s" % (who, who, len(msg), msg), deleted)
    except SnapshotError as e:
        split.abort()
        raise SnapshotError(f"{tarball.name}: {e}") from None
    except BrokenPipeError:  # fast-import exited early (a full disk, ...): its stderr says why
        split.abort()
        raise SnapshotterError(f"{tarball.name}: git fast-import failed: {split.failure()}") from None
    except BaseException:
        split.abort()
        raise

    tag_obj = make_tag(repo, commit, tag, identity, timestamp, sign_tag)
    # Move main and create the tag in one transaction; the old value of main is checked.
    old_head = parent or "0" * 40
    transaction = (f"update {repo.branch_ref} {commit} {old_head}\n"
                   f"create refs/tags/{tag} {tag_obj}\n"
                   f"delete {STAGING_REF}\n"
                   f"delete {PART_REFS[0]}\n"
                   f"delete {PART_REFS[1]}\n").encode()
    git(repo.path, "update-ref", "--stdin", input=transaction)
    # The refs moved: the import is done. The cache is only a cache, so failing to write it (a full disk)
    # must not turn the import into an error; a stale one is removed (previous_tree also checks it).
    try:
        _save_tree(repo, commit, tree)
    except OSError as e:
        log.warning("cannot write the tree cache %s (the import is kept; the next import reads the tree "
                    "from git): %s", _cache_path(repo), e.strerror or e)
        try:
            _drop_cache(repo)
        except OSError:
            pass
    changed = len(deleted) + split.changed()
    log.debug("imported %s as %s (%d files changed)", tarball.name, commit, changed)
    return ImportResult(tag, commit, changed, timestamp)


def make_tag(repo: Repository, commit: str, tag: str, identity: Identity, timestamp: int,
             sign_tag: Callable[[bytes], bytes] | None = None) -> str:
    """Write the annotated tag object (optionally signed) and return its id; no ref is touched."""
    body = (b"object %s\ntype commit\ntag %s\ntagger %s\n\n%s"
            % (commit.encode(), tag.encode(), identity.line(timestamp), tag_message(tag)))
    if sign_tag is not None:
        body += sign_tag(body)
    return git(repo.path, "mktag", input=body).stdout.decode().strip()
