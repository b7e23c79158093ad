"""Read the tree of a commit or tag straight out of a bare repository, without a checkout.

`tree_entries` + `BlobReader` stream what `git ls-tree -r` and `git cat-file --batch` say; `publish`
streams them into a tarball, and `export_tree` checks them and then has `git archive | tar -x` write
the tree into a directory. Path names come from the
repository, which may hold anything a crafted import put there, so every name is checked: no absolute
paths, no `.`/`..`/empty components, nothing ever written through a symlink. What a symlink may point at
is decided here once (`check_symlink`, `check_links`: resolved against the tree itself, through its other
links) for the importer, `export`, `publish` and the build's tree.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from snapshotter.errors import SnapshotError, SnapshotterError, child_failure
from snapshotter.git.repository import git, git_env

log = logging.getLogger(__name__)

MODE_FILE = "100644"
MODE_EXEC = "100755"
MODE_SYMLINK = "120000"
MODE_TREE = "040000"
MODE_GITLINK = "160000"


@dataclass(frozen=True)
class Entry:
    """One path of a git tree: kind is "file", "exec", "symlink" or "dir"."""

    path: str  # relative, "/"-separated, validated
    kind: str
    oid: str


def check_rev(rev: str) -> str:
    """A revision name from outside must not look like an option or hold odd characters."""
    if not rev or rev.startswith("-") or any(c.isspace() or c in "\0\\:~^?*[" for c in rev) or ".." in rev:
        raise SnapshotterError(f"not a valid revision name: {rev!r}")
    return rev


def resolve(repo: Path, rev: str) -> tuple[str, int]:
    """The commit `rev` (a tag or commit) names, and its committer time (unix seconds)."""
    check_rev(rev)
    proc = git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if proc.returncode != 0:
        raise SnapshotterError(f"{rev!r} is not a commit or tag in {repo}")
    commit = proc.stdout.decode().strip()
    when = int(git(repo, "show", "-s", "--format=%ct", commit).stdout.decode().strip())
    return commit, when


def check_path(path: str) -> str:
    """Refuse paths that could escape the destination: absolute, `..`, `.`, empty parts, NUL."""
    parts = path.split("/")
    if not path or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise SnapshotError(f"unsafe path in tree: {path!r}")
    return path


MAX_LINK_HOPS = 40  # symlinks followed while resolving one link, as Linux (ELOOP): more is refused


def check_symlink(path: str, target: str) -> None:
    """What one symlink's text alone must satisfy: non-empty, relative, no NUL, and not climbing above the
    top directory on its own. Whether it stays inside the tree through other links is `check_links`."""
    if not target or "\0" in target or target.startswith("/"):
        raise SnapshotError(f"symlink {path!r} points outside the tree: {target!r}")
    _resolve({}, path, target)


def _resolve(links: Mapping[str, str], path: str, target: str,
             memo: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Where the symlink `path` -> `target` ends, as components below the top of the tree.

    The one rule of what a link may point at (import, export, publish and build all use it, through
    `check_symlink` and `check_links`): the link's directory and then `target` are walked component by
    component from the top of the tree; a component naming another symlink of the tree is replaced by
    where that link ends (recursively, at most MAX_LINK_HOPS links in all), `..` goes up one level and
    must never leave the top, and every other component is taken as it is, whether it exists or not
    (as `os.path.realpath` does; the kernel would fail on a missing directory, so this only refuses
    more). Raises SnapshotError naming the link when it ends outside the tree or loops. `memo` keeps where
    each link already resolved ends, so a tree of many chained links costs linear time.
    """
    hops = 0

    def walk(parts: list[str], text: str) -> list[str]:
        nonlocal hops
        if not text or "\0" in text or text.startswith("/"):
            raise SnapshotError(f"symlink {path!r} points outside the tree: {target!r}")
        for part in text.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise SnapshotError(f"symlink {path!r} points outside the tree: {target!r}")
                parts.pop()
                continue
            parts.append(part)
            key = "/".join(parts) if links else ""
            link = links.get(key) if links else None
            if link is not None:
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise SnapshotError(f"symlink {path!r} -> {target!r}: more than {MAX_LINK_HOPS} "
                                        "symlinks to follow (a loop?)")
                known = memo.get(key) if memo is not None else None
                if known is not None:
                    parts = list(known)
                    continue
                parts.pop()
                parts = walk(parts, link)
                if memo is not None:
                    memo[key] = tuple(parts)
        return parts

    parent = path.rpartition("/")[0]
    return walk(walk([], parent) if parent else [], target)


def check_links(links: Mapping[str, str]) -> None:
    """Every symlink of a tree (path -> target) must end inside the tree, following the tree's other
    links (`_resolve`); SnapshotError naming the first (in path order) that does not."""
    memo: dict[str, tuple[str, ...]] = {}
    for path in sorted(links):
        if path not in memo:
            memo[path] = tuple(_resolve(links, path, links[path], memo))


def tree_entries(repo: Path, commit: str, *, dirs: bool = True) -> list[Entry]:
    """Every path of the commit's tree in git's order (a directory comes before its contents)."""
    args = ["ls-tree", "-r", "-z", "--full-tree"]
    if dirs:
        args.append("-t")
    out = git(repo, *args, commit).stdout
    entries = []
    for record in out.split(b"\0"):
        if not record:
            continue
        meta, _, raw_path = record.partition(b"\t")
        mode, _type, oid = meta.decode().split(" ")
        try:
            path = raw_path.decode()
        except UnicodeDecodeError:
            raise SnapshotError(f"path in tree is not UTF-8: {raw_path!r}") from None
        check_path(path)
        kind = {MODE_FILE: "file", MODE_EXEC: "exec", MODE_SYMLINK: "symlink", MODE_TREE: "dir",
                MODE_GITLINK: "dir"}.get(mode)
        if kind is None:
            raise SnapshotError(f"unsupported mode {mode} for {path!r}")
        if kind == "dir" and not dirs and mode != MODE_GITLINK:
            continue
        entries.append(Entry(path, kind, oid))
    return entries


def read_links(repo: Path, entries: Iterable[Entry]) -> dict[str, str]:
    """The symlinks among `entries` (path -> target), for `check_links` before anything is written."""
    links = [e for e in entries if e.kind == "symlink"]
    out: dict[str, str] = {}
    if not links:
        return out
    with BlobReader(repo, [e.oid for e in links]) as blobs:
        for e in links:
            try:
                out[e.path] = blobs.read_blob(e.oid).decode()
            except UnicodeDecodeError:
                raise SnapshotError(f"symlink {e.path!r}: target is not UTF-8") from None
    return out


class BlobReader:
    """Contents of blobs in a given order, streamed from one `git cat-file --batch`."""

    def __init__(self, repo: Path, oids: Iterable[str]) -> None:
        self._proc = subprocess.Popen(["git", f"--git-dir={repo}", "cat-file", "--batch"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=git_env())
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._out: BinaryIO = self._proc.stdout  # type: ignore[assignment]
        oid_list = list(oids)
        self._feeder = threading.Thread(target=self._feed, args=(oid_list,), daemon=True)
        self._feeder.start()

    def _feed(self, oids: list[str]) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            for i in range(0, len(oids), 512):
                stdin.write("".join(f"{o}\n" for o in oids[i:i + 512]).encode())
            stdin.close()
        except (BrokenPipeError, ValueError):
            pass  # the reader gave up early (an error); close() reports it

    def next_blob(self, oid: str) -> tuple[int, BinaryIO]:
        """Header of the next blob: its size; then read exactly that many bytes + 1 (LF) from the stream."""
        header = self._out.readline()
        parts = header.split()
        if len(parts) != 3 or parts[0].decode() != oid or parts[1] != b"blob":
            raise SnapshotterError(f"git cat-file: unexpected answer for {oid}: {header[:100]!r}")
        return int(parts[2]), self._out

    def read_blob(self, oid: str) -> bytes:
        size, stream = self.next_blob(oid)
        data = stream.read(size + 1)
        if len(data) != size + 1:
            raise SnapshotterError(f"git cat-file: short read for {oid}")
        return data[:-1]

    def close(self) -> None:
        """Stop git and reap it. After an error the feeder may be blocked writing to git's full stdin
        (git waits for us to read): kill git first so the feeder's write fails, then close the pipes."""
        try:
            if self._feeder.is_alive() or self._proc.poll() is None:
                self._proc.kill()
            self._feeder.join()
            self._proc.wait()
        finally:
            for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except (BrokenPipeError, OSError, ValueError):
                        pass

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_exact(src: BinaryIO, size: int, write: Callable[[bytes], object]) -> None:
    """Copy `size` bytes from `src` to the callable `write`, then eat cat-file's trailing LF."""
    remaining = size
    while remaining:
        chunk = src.read(min(remaining, 1 << 20))
        if not chunk:
            raise SnapshotterError("git cat-file: short read")
        write(chunk)
        remaining -= len(chunk)
    if src.read(1) != b"\n":
        raise SnapshotterError("git cat-file: malformed output")


# Attributes that change what `git archive` writes (export-ignore, export-subst) or convert a blob on its
# way out (text/crlf/eol, ident, filter, working-tree-encoding). A tree may set them in its own
# .gitattributes; `$GIT_DIR/info/attributes` takes precedence over every in-tree file, so unsetting them
# there for every path makes the archive hold the blobs exactly as they are.
_EXACT_ATTRIBUTES = ("* -export-ignore -export-subst -text -crlf -eol -ident -filter -working-tree-encoding\n")

# What `tar -x` does with git's archive: no option from the environment (TAR_OPTIONS), modes exactly as
# the archive says (0644/0755, 0755 directories, whatever the umask), owned by whoever extracts,
# never over an existing file.
_TAR_EXTRACT = ("tar", "--extract", "--file=-", "--no-same-owner", "--numeric-owner", "--same-permissions",
                "--keep-old-files", "--warning=no-timestamp")


@contextmanager
def exact_gitdir(repo: Path) -> Iterator[Path]:
    """A throwaway git directory that reads the objects of `repo` (through `objects/info/alternates`)
    and whose `info/attributes` unsets every attribute that would make `git archive` differ from the blobs
    (`_EXACT_ATTRIBUTES`). It has no refs and no config of its own: only ids name anything there (no
    replace refs either), so `ls-tree`, `cat-file` and `archive` of one commit all see the same tree."""
    objects = os.path.abspath(Path(repo) / "objects")
    if "\n" in objects:
        raise SnapshotterError(f"cannot use a repository path holding a newline: {repo!r}")
    tmp = Path(tempfile.mkdtemp(prefix="snapshotter-gitdir-"))
    try:
        for sub in ("objects/info", "refs", "info"):
            (tmp / sub).mkdir(parents=True)
        (tmp / "HEAD").write_text("ref: refs/heads/none\n")
        (tmp / "objects/info/alternates").write_text(objects + "\n")
        (tmp / "info/attributes").write_text(_EXACT_ATTRIBUTES)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_layout(entries: Iterable[Entry]) -> None:
    """Every entry's directory is a directory of the tree listed before it, and no path appears twice
    (a symlink and a directory of one name, or a path through a symlink or a file, are refused): what
    `tar -x` then writes is exactly the tree, below the destination, and never through a link."""
    kinds: dict[str, str] = {}
    for e in entries:
        if e.path in kinds:
            raise SnapshotError(f"{e.path!r} appears twice in the tree")
        parent = e.path.rpartition("/")[0]
        if parent and kinds.get(parent) != "dir":
            raise SnapshotError(f"{e.path!r}: its directory {parent!r} is not a directory of the tree")
        kinds[e.path] = e.kind


def export_tree(repo: Path, rev: str, dest: Path) -> None:
    """Materialize the tree of `rev` (tag or commit) into `dest` (created if missing; must be empty).

    Regular files keep their exec bit (0644/0755), symlinks stay symlinks, directories are 0755, and
    everything below `dest` gets the commit's time as mtime. Before anything is written, every name is
    checked (`tree_entries`: no absolute path, `.`/`..`/empty component, NUL or non-UTF-8), the layout
    (`check_layout`: no duplicate, nothing below a symlink or a file) and every symlink (`check_links`:
    it ends inside the tree, through other links too); a refused tree raises SnapshotError. Then
    `git archive | tar -x` writes it (`exact_gitdir`: the blobs byte for byte, whatever the tree's
    .gitattributes say), and what is on disk is compared with the tree's listing. On any failure what
    was written is removed again (and `dest` if this made it); nothing is ever written outside `dest`.
    """
    commit, _when = resolve(repo, rev)
    dest = Path(dest)
    with exact_gitdir(repo) as gitdir:
        entries = tree_entries(gitdir, commit)
        check_layout(entries)
        check_links(read_links(gitdir, entries))
        created = not os.path.lexists(dest)
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SnapshotterError(f"cannot create {dest}: {err.strerror}") from None
        if not dest.is_dir() or dest.is_symlink():
            raise SnapshotterError(f"{dest} is not a directory")
        if any(dest.iterdir()):
            raise SnapshotterError(f"{dest} is not empty")
        log.debug("exporting %s (%d entries) into %s", commit, len(entries), dest)
        try:
            _archive_into(gitdir, commit, dest)
            _check_written(dest, entries)
        except BaseException:
            _remove_partial(dest, created)
            raise


def _archive_into(gitdir: Path, commit: str, dest: Path) -> None:
    """`git archive COMMIT | tar -x -C DEST`, argument lists only, no deadline (a tree of any size takes
    what it takes); when one side fails the other is killed, and the error names the one that failed."""
    tar_env = {k: v for k, v in os.environ.items() if not k.startswith("TAR_")}
    tar_env["LC_ALL"] = "C"
    with tempfile.TemporaryFile() as git_err, tempfile.TemporaryFile() as tar_err:
        archive = subprocess.Popen(["git", f"--git-dir={gitdir}", "-c", "tar.umask=022", "archive",
                                    "--format=tar", commit],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=git_err, env=git_env())
        procs = [archive]
        try:
            assert archive.stdout is not None
            tar = subprocess.Popen([*_TAR_EXTRACT, f"--directory={dest}"], stdin=archive.stdout,
                                   stdout=subprocess.DEVNULL, stderr=tar_err, env=tar_env)
            procs.append(tar)
            archive.stdout.close()  # tar's end only: git gets SIGPIPE when tar dies
            tar_rc = tar.wait()
            if tar_rc != 0:
                archive.kill()
            git_rc = archive.wait()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        if git_rc != 0 and (tar_rc == 0 or git_rc > 0):
            git_err.seek(0)
            raise SnapshotterError(f"git archive {commit} failed: {child_failure(git_err.read(), git_rc)}")
        if tar_rc != 0:
            tar_err.seek(0)
            raise SnapshotterError(f"tar -x into {dest} failed: {child_failure(tar_err.read(), tar_rc)}")


def _check_written(dest: Path, entries: list[Entry]) -> None:
    """What `tar -x` wrote is the tree: the same paths, kinds and exec bits, nothing more (SnapshotError
    otherwise). Cheap next to writing it: one readdir per directory, one lstat per regular file."""
    expected = {e.path: e.kind for e in entries}
    found = 0
    todo = [("", str(dest))]
    while todo:
        prefix, directory = todo.pop()
        with os.scandir(directory) as it:
            for d in it:
                path = prefix + d.name
                if d.is_symlink():
                    kind = "symlink"
                elif d.is_dir(follow_symlinks=False):
                    kind = "dir"
                    todo.append((path + "/", d.path))
                elif d.is_file(follow_symlinks=False):
                    kind = "exec" if d.stat(follow_symlinks=False).st_mode & 0o100 else "file"
                else:
                    kind = "other"
                if expected.get(path) != kind:
                    raise SnapshotError(f"export of the tree wrote {path!r} as {kind}, the tree has "
                                        f"{expected.get(path, 'nothing')}")
                found += 1
    if found != len(expected):
        raise SnapshotError(f"export of the tree wrote {found} of its {len(expected)} entries")


def _remove_partial(dest: Path, created: bool) -> None:
    """After a failed export: remove what it wrote into `dest` (empty before), and `dest` if it made it.

    shutil.rmtree works through directory fds and never follows a symlink, so nothing outside `dest` is
    touched even if the partial tree holds links."""
    try:
        for child in os.scandir(dest):
            if child.is_dir(follow_symlinks=False):
                shutil.rmtree(child.path)
            else:
                os.unlink(child.path)
        if created:
            os.rmdir(dest)
    except OSError as e:
        log.warning("cannot remove the partial export in %s: %s", dest, e.strerror or e)
