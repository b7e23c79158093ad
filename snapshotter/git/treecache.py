"""A bounded cache of exported trees, one per git tree id, for builds to bind-mount read-only.

On disk, under PATH (`build.cache_dir`/trees, which must be private: `fsutil.check_private_dir`):

    PATH/<tree id>/                   the tree, as `export_tree` writes it (complete, or not there at all)
    PATH/<tree id>.lock               flock: exclusive while it is exported or removed, shared while in use;
                                      its mtime is when the tree was last used
    PATH/.<tree id>.tmp.<random>      an export in progress, or what a crashed one left (`purge` removes it)

A tree is exported into a temporary name and renamed into place, so a tree under its final name is
always whole. Trees are keyed by the git tree id, so two commits holding the same tree (a tag on an
unchanged day, an overlay commit that changed nothing) share one export; its mtimes are the commit time
of the commit it was first exported for.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from snapshotter.errors import LockedError, SnapshotterError
from snapshotter.fsutil import check_private_dir, is_temp, open_dir, temp_name
from snapshotter.git.export import check_rev, export_tree
from snapshotter.git.repository import git
from snapshotter.lock import flocked

log = logging.getLogger(__name__)

TREE_ID_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
LOCK_SUFFIX = ".lock"
WAIT = 3600.0  # seconds a caller waits for another process exporting the same tree (a big tree on a slow disk)


class TreeCache:
    """Trees of commits exported once per tree id into `path` and kept for the next builds; `purge`
    bounds it to the `keep` most recently used trees.

        cache = TreeCache(cfg.build.cache_dir / "trees", keep=cfg.build.cached_trees)
        with cache.tree(repo, commit) as tree_dir:
            ...  # bind-mount tree_dir read-only; never write into it
        removed = cache.purge()  # e.g. after a build, or from `snapshotter purge`
    """

    def __init__(self, path: Path, keep: int) -> None:
        if keep < 0:
            raise SnapshotterError(f"a tree cache keeps 0 or more trees, not {keep}")
        self.path = Path(path)
        self.keep = keep

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
        os.close(open_dir(self.path, create=create))  # a symlink at PATH itself is refused here
        check_private_dir(self.path)
        return True

    @contextmanager
    def tree(self, repo: Path, commit: str) -> Iterator[Path]:
        """The tree of `commit` (a commit id or tag of the bare repository `repo`) as a directory, exported
        first when it is not in the cache yet, for as long as the `with` block lasts.

        While the block runs a shared lock on PATH/<tree id>.lock is held, so `purge` leaves the tree
        alone; its mtime is set on entering and leaving (the tree's "last used"). When the tree is
        missing, the caller exports it under the exclusive lock (others wanting the same tree wait for it,
        up to WAIT seconds, then use that export). Raises SnapshotterError (SnapshotError for a tree
        `export_tree` refuses) with nothing left under the tree's final name.
        """
        self._open(create=True)
        tree_id = self.tree_id(repo, commit)
        final = self.path / tree_id
        lock = self.path / f"{tree_id}{LOCK_SUFFIX}"
        for _ in range(10):  # purge may remove the tree between its export and our shared lock: again
            with flocked(lock, f"cached tree {tree_id}", wait=WAIT, shared=True):
                if self._present(final):
                    os.utime(lock, follow_symlinks=False)
                    try:
                        yield final
                    finally:
                        os.utime(lock, follow_symlinks=False)
                    return
            with flocked(lock, f"cached tree {tree_id}", wait=WAIT):
                if not self._present(final):
                    self._export(repo, commit, tree_id)
        raise SnapshotterError(f"cached tree {tree_id} keeps disappearing from {self.path} (purged meanwhile?)")

    def tree_id(self, repo: Path, commit: str) -> str:
        """The id of the tree of `commit` in `repo` (SnapshotterError when it names no commit)."""
        check_rev(commit)
        proc = git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}^{{tree}}", check=False)
        tree_id = proc.stdout.decode().strip()
        if proc.returncode != 0 or not TREE_ID_RE.match(tree_id):
            raise SnapshotterError(f"{commit!r} is not a commit in {repo}")
        return tree_id

    def _present(self, final: Path) -> bool:
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise SnapshotterError(f"{final} is not a directory; refusing to use it (remove it if you did not "
                                   "make it)")
        return True

    def _export(self, repo: Path, commit: str, tree_id: str) -> None:
        """Export under the exclusive lock: leftovers of a crashed export of this tree first, then a fresh
        temporary directory, renamed into place when complete (removed when not)."""
        self._remove_temps(tree_id)
        final = self.path / tree_id
        tmp = temp_name(final)
        os.mkdir(tmp, 0o755)
        try:
            os.chmod(tmp, 0o755)  # whatever the umask: builds read it as another user
            log.info("exporting tree %s of %s into the tree cache %s", tree_id, commit, self.path)
            export_tree(repo, commit, tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _remove_temps(self, tree_id: str) -> list[str]:
        removed = []
        for name in os.listdir(self.path):
            if is_temp(name) and name.startswith(f".{tree_id}."):
                shutil.rmtree(self.path / name)  # never follows a symlink
                removed.append(name)
        return removed

    def purge(self, keep: int | None = None) -> list[str]:
        """Remove the least recently used trees beyond the `keep` (default: the cache's) most recently
        used, except those in use (a shared lock held: skipped), and what crashed exports left. Returns
        the names removed under PATH (tree ids and temporary names). A missing PATH holds nothing."""
        keep = self.keep if keep is None else keep
        if not self._open(create=False):
            return []
        names = os.listdir(self.path)
        trees = [n for n in names if TREE_ID_RE.match(n) and os.path.isdir(self.path / n)
                 and not os.path.islink(self.path / n)]
        last_used = {t: self._last_used(t) for t in trees}
        trees.sort(key=lambda t: last_used[t], reverse=True)
        temps = {n[1:].split(".", 1)[0] for n in names if is_temp(n)}  # crashed exports
        locks = {n[:-len(LOCK_SUFFIX)] for n in names if n.endswith(LOCK_SUFFIX)}  # of removed trees too
        removed: list[str] = []
        for tree_id in trees[keep:] + sorted((temps | locks) - set(trees)):
            removed += self._remove(tree_id, whole=True)
        for tree_id in sorted(temps & set(trees[:keep])):
            removed += self._remove(tree_id, whole=False)
        return removed

    def _last_used(self, tree_id: str) -> float:
        for p in (self.path / f"{tree_id}{LOCK_SUFFIX}", self.path / tree_id):
            try:
                return os.lstat(p).st_mtime
            except FileNotFoundError:
                continue
        return 0.0

    def _remove(self, tree_id: str, *, whole: bool) -> list[str]:
        """Under the exclusive lock, if nobody holds it (else nothing): the temporary leftovers of
        `tree_id`, and when `whole` also the tree (renamed to a temporary name first, so a removal cut
        short never leaves a partial tree under the final name) and its lock file."""
        if not TREE_ID_RE.match(tree_id):
            return []
        lock = self.path / f"{tree_id}{LOCK_SUFFIX}"
        used = self._last_used(tree_id)
        try:
            with flocked(lock, f"cached tree {tree_id}"):
                removed = self._remove_temps(tree_id)
                if not whole:  # the tree stays: so does its "last used" (taking the lock wrote our PID)
                    os.utime(lock, (used, used), follow_symlinks=False)
                else:
                    final = self.path / tree_id
                    if self._present(final):
                        doomed = temp_name(final)
                        os.rename(final, doomed)
                        shutil.rmtree(doomed)
                        removed.append(tree_id)
                    lock.unlink()  # who waits for it notices (flocked) and starts over with a new file
                return removed
        except LockedError:
            log.debug("tree %s is in use or being exported: kept", tree_id)
            return []
