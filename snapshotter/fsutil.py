"""Files on disk: digests, and (one implementation) writing a file atomically."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from snapshotter.errors import SnapshotterError

TEMP_INFIX = ".tmp."  # temporary names are `.NAME.tmp.RANDOM`, next to the file they will replace


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's content ("md5", "sha256", ...), read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def is_temp(name: str) -> bool:
    """Whether `name` is one of the temporary names `create_temp` makes (for cleaning up after a crash)."""
    return name.startswith(".") and TEMP_INFIX in name


def fsync_dir(directory: Path) -> None:
    """Make the renames and removals done in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A fresh random temporary name `.NAME.tmp.RANDOM` next to `path` (nothing is created)."""
    return path.with_name(f".{path.name}{TEMP_INFIX}{os.urandom(4).hex()}")


def open_dir(path: Path, *, create: bool = False) -> int:
    """A descriptor of the directory `path` (created 0755 first when `create` and missing), opened with
    O_NOFOLLOW: when someone who may write its parent replaced it with a symlink, SnapshotterError, never
    the directory the link points at. Files are then made relative to it (`dir_fd`), so swapping the
    directory afterwards changes nothing either. Only the last component is checked: the directories
    above it are the configuration's (and must not be writable by others)."""
    if create:
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        except OSError as e:
            raise SnapshotterError(f"cannot create {path}: {e.strerror}") from None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SnapshotterError(f"{path} is a symlink or not a directory; refusing to write through it "
                                   "(remove it if you did not make it)") from None
        raise SnapshotterError(f"cannot open {path}: {e.strerror}") from None


def check_private_dir(path: Path) -> None:
    """SnapshotterError unless nobody but us (and root) can change what `path` names: `path` and every
    directory above it must be owned by root or by us and not writable by group or others, except a
    sticky directory (/tmp, /var/tmp) above one of ours. For directories under /var/tmp, where any user
    could have made `/var/tmp/snapshotter` first and swap what we create inside it for symlinks."""
    path = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    if real != path:
        check_private_dir(real)  # where the links lead must be private too (and the links, below)
    me = os.geteuid()
    for d in (path, *path.parents):
        try:
            st = os.lstat(d)
        except OSError as e:
            raise SnapshotterError(f"cannot check {d}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, me):
                raise SnapshotterError(f"{d} is a symlink of uid {st.st_uid}: refusing to work under {path}")
            st = os.stat(d)
        if st.st_uid not in (0, me):
            raise SnapshotterError(f"{d} belongs to uid {st.st_uid}, not to us: refusing to work under {path}")
        if st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and d != path):
            raise SnapshotterError(f"{d} is writable by others: refusing to work under {path}")
        if st.st_mode & stat.S_ISVTX and d != path:
            break  # a sticky directory: only the owner of what we checked below can replace it


def create_temp(path: Path, mode: int = 0o644, *, dir_fd: int | None = None) -> tuple[int, Path]:
    """A new, empty file `.NAME.tmp.RANDOM` in the directory of `path`, open for writing: (fd, its path).

    Created with O_CREAT|O_EXCL|O_NOFOLLOW, so it is never a file that existed before and never the
    target of a symlink planted under that name; in the same directory, so renaming it over `path` is
    atomic. Its mode is exactly `mode` (whatever the umask). The caller closes the fd. With `dir_fd`
    (`open_dir`), the file is made in that directory, by name only.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = temp_name(path)
        try:
            fd = os.open(tmp if dir_fd is None else tmp.name, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            _unlink(tmp, dir_fd)
            raise
        return fd, tmp
    raise FileExistsError(f"no free temporary name next to {path}")


def _unlink(path: Path, dir_fd: int | None) -> None:
    try:
        os.unlink(path if dir_fd is None else path.name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def write_temp(path: Path, data: bytes, *, mode: int = 0o644, durable: bool, dir_fd: int | None = None) -> Path:
    """`data` in a new temporary file next to `path` (see `create_temp`), fsynced when `durable`;
    returns its path, for the caller to rename over `path` (removed again if writing fails)."""
    fd, tmp = create_temp(path, mode, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink(tmp, dir_fd)
        raise
    return tmp


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, durable: bool, nofollow_dir: bool = False) -> None:
    """Replace `path` with a file holding `data`: readers see the old content or the new, never a part.

    The one implementation of write-temp-then-rename: a temporary file is created next to `path`
    (O_CREAT|O_EXCL|O_NOFOLLOW: never through a planted symlink), written, fsynced when `durable`,
    renamed over `path`, and then the directory is fsynced when `durable`. On an error the temporary
    file is removed and `path` is left as it was.

    `durable=True` makes the new content survive a power loss or kernel crash once this returns (without
    it, the rename may reach the disk before the data, and a crash can leave an empty file). Who needs it:
    - yes: `state.json` (sync/state.py: what each push remote has, the last success and failure: losing it
      misreports `status` and repeats pushes); published snapshot files (publish/snapshots.py, which uses
      `write_temp`, `create_temp` and `fsync_dir` for its ordered multi-file renames: clients download
      them, and a side file must never point at an empty tarball); the post-receive hook
      (service/hooks.py: an empty hook after a crash would silently stop queuing builds).
    - no: the importer's tree cache (sync/importer.py: it is checked against the head commit and a missing
      or unreadable cache only costs time); the build child's result file (service/worker.py: read by its
      parent right after the child exits; after a machine crash the job runs again anyway).
    The chroot library cannot use this (it imports nothing of snapshotter): chroot/newfile.py is its one
    equivalent for build.json and the stage4 (an O_EXCL|O_NOFOLLOW temporary, fsynced, then link(2),
    which never replaces an existing file).

    `nofollow_dir=True` is for directories others may write the parent of (the repository's
    `snapshotter/`, which a pusher could replace with a symlink; `worker-logs/` in the state directory):
    the directory is opened with `open_dir` (a symlink there is refused) and everything happens relative
    to that descriptor.
    """
    if not nofollow_dir:
        tmp = write_temp(path, data, mode=mode, durable=durable)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if durable:
            fsync_dir(path.parent)
        return
    dfd = open_dir(path.parent)
    try:
        tmp = write_temp(path, data, mode=mode, durable=durable, dir_fd=dfd)
        try:
            os.replace(tmp.name, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            _unlink(tmp, dfd)
            raise
        if durable:
            os.fsync(dfd)
    finally:
        os.close(dfd)


def tree_hash(path: Path) -> str:
    """sha256 over a directory's relative paths, kinds, modes, symlink targets and file contents: the
    digest of a build profile's portage_confdir that build.json records (the build hands it to chroot)
    and that publishing and `rebuild` check against."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, path)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                h.update(f"L {rel} {os.readlink(full)}\0".encode())
            else:
                h.update(f"F {rel} {stat.S_IMODE(st.st_mode):o}\0".encode())
                with open(full, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
        for d in dirnames:
            if not os.path.islink(os.path.join(dirpath, d)):
                h.update(f"D {os.path.normpath(os.path.join(rel_dir, d))}\0".encode())
    return h.hexdigest()


NOBODY = 65534  # the file system identity for a root-owned directory that others may write


def writers_identity(directory: Path) -> tuple[int, int] | None:
    """The (uid, gid) `as_writers_of` takes for `directory`; None when it changes nothing (we are not
    root, or only root may write the directory)."""
    if os.geteuid() != 0:
        return None
    st = os.stat(directory)
    if st.st_uid != 0:
        return st.st_uid, st.st_gid
    if st.st_mode & 0o022:
        return NOBODY, st.st_gid
    return None


@contextmanager
def as_writers_of(directory: Path) -> Iterator[None]:
    """Open files in `directory` as the ones who may write it could, not as root.

    For a program that lets a library open files by name in a directory others may write (SQLite and its
    -wal/-shm in state_dir, which git hook users write): whatever they plant there (a symlink to
    /etc/shadow, swapped in between our checks and the library's open), the open is checked against the
    file system identity of the directory's owner (setfsuid/setfsgid), so the worst it reaches is a file
    those users could write themselves. Only when running as root and the directory is writable by
    someone else: owned by another user (that user's identity), or group- or world-writable (nobody, with
    the directory's group). It applies to the calling thread only (Linux keeps it per thread) and is
    undone on leaving; root's other capabilities are untouched. Root's supplementary groups still count
    (usually only group 0): a file that group root may write stays writable."""
    ident = writers_identity(directory)
    if ident is None:
        yield  # not root, or only root may write it: nothing can be planted there
        return
    uid, gid = ident
    libc = ctypes.CDLL(None, use_errno=True)
    old_gid = libc.setfsgid(gid)
    old_uid = libc.setfsuid(uid)
    try:
        if libc.setfsuid(-1) != uid or libc.setfsgid(-1) != gid:  # -1: ask without changing
            raise SnapshotterError(f"cannot take the file system identity {uid}:{gid} of {directory}")
        yield
    finally:
        libc.setfsuid(old_uid)
        libc.setfsgid(old_gid)
