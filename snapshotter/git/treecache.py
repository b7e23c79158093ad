"""A bounded cache of exported trees, one per git tree id, for builds to bind-mount read-only.

An `EntryCache` (snapshotter/cachedir.py: locks, temporary names, purge) under `build.cache_dir`/trees:
PATH/<tree id>/ is the tree as `export_tree` writes it. Trees are keyed by the git tree id, so two commits holding the same tree (a tag on an
unchanged day, an overlay commit that changed nothing) share one export; its mtimes are the commit time
of the commit it was first exported for.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from snapshotter.cachedir import EntryCache
from snapshotter.errors import SnapshotterError
from snapshotter.git.export import check_rev, export_tree
from snapshotter.git.repository import git

log = logging.getLogger(__name__)

TREE_ID_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


class TreeCache(EntryCache):
    """Trees of commits exported once per tree id into `path` and kept for the next builds; `purge`
    bounds it to the `keep` most recently used trees.

        cache = TreeCache(cfg.build.cache_dir / "trees", keep=cfg.build.cached_trees)
        with cache.tree(repo, commit) as tree_dir:
            ...  # bind-mount tree_dir read-only; never write into it
        removed = cache.purge()  # e.g. after a build, or from `snapshotter purge`
    """

    def __init__(self, path: Path, keep: int) -> None:
        super().__init__(path, keep, "cached tree", TREE_ID_RE)

    @contextmanager
    def tree(self, repo: Path, commit: str) -> Iterator[Path]:
        """The tree of `commit` (a commit id or tag of the bare repository `repo`) as a directory, exported
        first when it is not in the cache yet, for as long as the `with` block lasts (EntryCache.entry:
        held shared, so `purge` leaves it alone). Raises SnapshotterError (SnapshotError for a tree
        `export_tree` refuses) with nothing left under the tree's final name.
        """
        tree_id = self.tree_id(repo, commit)

        def export(tmp: Path) -> None:
            log.info("exporting tree %s of %s into the tree cache %s", tree_id, commit, self.path)
            export_tree(repo, commit, tmp)

        with self.entry(tree_id, export) as path:
            yield path

    def tree_id(self, repo: Path, commit: str) -> str:
        """The id of the tree of `commit` in `repo` (SnapshotterError when it names no commit)."""
        check_rev(commit)
        proc = git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}^{{tree}}", check=False)
        tree_id = proc.stdout.decode().strip()
        if proc.returncode != 0 or not TREE_ID_RE.match(tree_id):
            raise SnapshotterError(f"{commit!r} is not a commit in {repo}")
        return tree_id
