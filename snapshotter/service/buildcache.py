"""The build's caches under `[build] cache_dir`: stages unpacked once per sha256 (the lower layer of
overlay build roots) and trees exported once per git tree id (bind-mounted read-only into builds).

Both are `EntryCache`s (snapshotter/cachedir.py): made into a temporary name and renamed, held with a
shared lock while a build uses them, trimmed to the least recently used beyond `[build] cached_stages` /
`cached_trees` after each build and by `snapshotter purge`.

    CACHE_DIR/roots/<sha256>/       a stage unpacked as the builder extracts it (owners, modes, xattrs,
                                    ACLs); the directory is 0700: a stage holds setuid programs
    CACHE_DIR/trees/<tree id>/      a tree as `snapshotter export` writes it
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from chroot.stage import extract_stage, verify_stage
from snapshotter.cachedir import EntryCache
from snapshotter.config import Config
from snapshotter.errors import SnapshotterError
from snapshotter.git.treecache import TreeCache

log = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class StageCache(EntryCache):
    """Stages unpacked once per sha256 into `path` (private) for overlay build roots."""

    def __init__(self, path: Path, keep: int) -> None:
        super().__init__(path, keep, "unpacked stage", SHA256_RE, private=True)

    @contextmanager
    def unpacked(self, stage: Path, sha256: str) -> Iterator[Path]:
        """The stage file `stage`, whose sha256 must be `sha256`, unpacked (first verified and unpacked
        when the cache does not have it yet), for as long as the `with` block lasts. A build uses it as
        the read-only lower layer of its root; nothing may write into it."""

        def unpack(tmp: Path) -> None:
            log.info("unpacking stage %s (sha256 %s) into the stage cache %s", stage.name, sha256[:12], self.path)
            verify_stage(stage, sha256)
            extract_stage(stage, tmp)

        with self.entry(sha256, unpack) as path:
            yield path


def stage_cache(cfg: Config) -> StageCache:
    return StageCache(cfg.build.cache_dir / "roots", cfg.build.cached_stages)


def tree_cache(cfg: Config) -> TreeCache:
    return TreeCache(cfg.build.cache_dir / "trees", cfg.build.cached_trees)


@dataclass
class CachePurge:
    """What `purge_caches` removed (or, dry, would remove): names under CACHE_DIR/roots and /trees."""

    stages: list[str] = field(default_factory=list)
    trees: list[str] = field(default_factory=list)
    error: str = ""  # why a cache could not be purged ("" when both were)


def purge_caches(cfg: Config, *, dry_run: bool = False) -> CachePurge:
    """Trim both caches to their bounds (entries in use are skipped). Problems are reported in `error`,
    never raised: a build's result or another purge step stands whatever happens here."""
    report = CachePurge()
    for name, cache in (("stages", stage_cache(cfg)), ("trees", tree_cache(cfg))):
        try:
            setattr(report, name, cache.purge(dry_run=dry_run))
        except (SnapshotterError, OSError) as e:
            report.error = f"{cache.path}: {e}"
            log.warning("purging the build cache %s: %s", cache.path, e)
    return report
