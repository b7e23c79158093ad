"""A directory of entries made once per key and shared by concurrent users, bounded by a purge.

The build's caches use it: the tree cache (git/treecache.py: exported trees by git tree id) and the stage
cache (service/stagecache.py: unpacked stages by sha256). On disk, under PATH (which must be private:
`fsutil.check_private_dir`):

    PATH/<key>/                   an entry, complete, or not there at all
    PATH/<key>.lock               flock: exclusive while the entry is made or removed, shared while in use;
                                  its mtime is when the entry was last used
    PATH/.<key>.tmp.<random>      an entry being made, or what a crashed maker left (`purge` removes it)

An entry is made into a temporary name and renamed into place, so an entry under its final name is
always whole. Concurrent users of one key wait for the one that makes it, then share it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from snapshotter.errors import LockedError, SnapshotterError
from snapshotter.fsutil import check_private_dir, is_temp, open_dir, temp_name
from snapshotter.lock import flocked

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
WAIT = 3600.0  # seconds a caller waits for another process making the same entry (a big one on a slow disk)


class EntryCache:
    """Entries made once per key into `path` and kept for later users; `purge` bounds it to the `keep`
    most recently used. `what` names an entry in messages ("cached tree"), `key_re` says what a key
    looks like; with `private` PATH is made mode 0700 (entries that must not be reachable by other users,
    such as an unpacked stage with its setuid programs).
    """

    def __init__(self, path: Path, keep: int, what: str, key_re: re.Pattern[str], *, private: bool = False) -> None:
        if keep < 0:
            raise SnapshotterError(f"a cache keeps 0 or more entries, not {keep}")
        self.path = Path(path)
        self.keep = keep
        self.what = what
        self.key_re = key_re
        self.private = private

    def _open(self, create: bool) -> bool:
        """Make sure PATH is a private directory of ours and no symlink (SnapshotterError otherwise);
        False when it does not exist and `create` is off."""
        if not create and not os.path.lexists(self.path):
            return False
        if create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SnapshotterError(f"cannot create {self.path.parent}: {e.strerror}") from None
        fd = open_dir(self.path, create=create)  # a symlink at PATH itself is refused here
        try:
            if self.private:
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        check_private_dir(self.path)
        return True

    def contains(self, key: str) -> bool:
        """Whether the entry is there now (a hint: `entry` makes it again if it is purged meanwhile)."""
        return bool(self.key_re.match(key)) and os.path.isdir(self.path / key) and not os.path.islink(self.path / key)

    @contextmanager
    def entry(self, key: str, make: Callable[[Path], None]) -> Iterator[Path]:
        """The entry `key` as a directory for as long as the `with` block lasts, made first by
        `make(tmp)` (which fills the new, empty directory `tmp`) when it is not in the cache yet.

        While the block runs a shared lock on PATH/<key>.lock is held, so `purge` leaves the entry
        alone; its mtime is set on entering and leaving (the entry's "last used"). When the entry is
        missing, the caller makes it under the exclusive lock (others wanting the same key wait for it,
        up to WAIT seconds, then use it). Whatever `make` raises is raised, with nothing left under the
        entry's final name.
        """
        if not self.key_re.match(key):
            raise SnapshotterError(f"{self.what} {key!r}: not a valid key")
        self._open(create=True)
        final = self.path / key
        lock = self.path / f"{key}{LOCK_SUFFIX}"
        for _ in range(10):  # purge may remove the entry between its making and our shared lock: again
            with flocked(lock, f"{self.what} {key}", wait=WAIT, shared=True):
                if self._present(final):
                    os.utime(lock, follow_symlinks=False)
                    try:
                        yield final
                    finally:
                        os.utime(lock, follow_symlinks=False)
                    return
            with flocked(lock, f"{self.what} {key}", wait=WAIT):
                if not self._present(final):
                    self._make(key, make)
        raise SnapshotterError(f"{self.what} {key} keeps disappearing from {self.path} (purged meanwhile?)")

    def _present(self, final: Path) -> bool:
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise SnapshotterError(f"{final} is not a directory; refusing to use it (remove it if you did not "
                                   "make it)")
        return True

    def _make(self, key: str, make: Callable[[Path], None]) -> None:
        """Make under the exclusive lock: leftovers of a crashed making of this key first, then a fresh
        temporary directory, renamed into place when complete (removed when not)."""
        self._remove_temps(key)
        final = self.path / key
        tmp = temp_name(final)
        os.mkdir(tmp, 0o755)
        try:
            os.chmod(tmp, 0o755)  # whatever the umask: builds read it as another user
            make(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _remove_temps(self, key: str) -> list[str]:
        removed = []
        for name in os.listdir(self.path):
            if is_temp(name) and name.startswith(f".{key}."):
                shutil.rmtree(self.path / name)  # never follows a symlink
                removed.append(name)
        return removed

    def purge(self, keep: int | None = None, *, dry_run: bool = False) -> list[str]:
        """Remove the least recently used entries beyond the `keep` (default: the cache's) most recently
        used, except those in use (a shared lock held: skipped), and what crashed makers left. Returns
        the names removed under PATH (keys and temporary names); with `dry_run` the entries that would be
        removed if none were in use, removing nothing. A missing PATH holds nothing."""
        keep = self.keep if keep is None else keep
        if not self._open(create=False):
            return []
        names = os.listdir(self.path)
        entries = [n for n in names if self.contains(n)]
        last_used = {t: self._last_used(t) for t in entries}
        entries.sort(key=lambda t: last_used[t], reverse=True)
        if dry_run:
            return entries[keep:]
        temps = {n[1:].split(".", 1)[0] for n in names if is_temp(n)}  # crashed makers
        locks = {n[:-len(LOCK_SUFFIX)] for n in names if n.endswith(LOCK_SUFFIX)}  # of removed entries too
        removed: list[str] = []
        for key in entries[keep:] + sorted((temps | locks) - set(entries)):
            removed += self._remove(key, whole=True)
        for key in sorted(temps & set(entries[:keep])):
            removed += self._remove(key, whole=False)
        return removed

    def _last_used(self, key: str) -> float:
        for p in (self.path / f"{key}{LOCK_SUFFIX}", self.path / key):
            try:
                return os.lstat(p).st_mtime
            except FileNotFoundError:
                continue
        return 0.0

    def _remove(self, key: str, *, whole: bool) -> list[str]:
        """Under the exclusive lock, if nobody holds it (else nothing): the temporary leftovers of
        `key`, and when `whole` also the entry (renamed to a temporary name first, so a removal cut
        short never leaves a partial entry under the final name) and its lock file."""
        if not self.key_re.match(key):
            return []
        lock = self.path / f"{key}{LOCK_SUFFIX}"
        used = self._last_used(key)
        try:
            with flocked(lock, f"{self.what} {key}"):
                removed = self._remove_temps(key)
                if not whole:  # the entry stays: so does its "last used" (taking the lock wrote our PID)
                    os.utime(lock, (used, used), follow_symlinks=False)
                else:
                    final = self.path / key
                    if self._present(final):
                        doomed = temp_name(final)
                        os.rename(final, doomed)
                        shutil.rmtree(doomed)
                        removed.append(key)
                    lock.unlink()  # who waits for it notices (flocked) and starts over with a new file
                return removed
        except LockedError:
            log.debug("%s %s is in use or being made: kept", self.what, key)
            return []
