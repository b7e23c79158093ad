"""The pinned ebuild trees of a build: the mirror's tag at /var/db/repos/gentoo, overlays at their refs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from chroot.mounts import inside, safe_rmtree
from chroot.profile import Overlay
from snapshotter.errors import SnapshotterError
from snapshotter.export import export_tree
from snapshotter.gitrepo import git
from snapshotter.lock import flocked

log = logging.getLogger(__name__)

REPOS_DIR = "var/db/repos"


@dataclass(frozen=True)
class ResolvedOverlay:
    name: str
    url: str
    ref: str
    commit: str
    cache: Path  # the local bare clone holding `commit`


def _empty_target(root: Path, name: str) -> Path:
    dest = inside(root, f"{REPOS_DIR}/{name}")
    if dest.exists():
        safe_rmtree(dest)  # whatever the stage shipped there is replaced by the pinned tree
    return dest


def place_gentoo(root: Path, repo: Path, commit: str) -> Path:
    """Export `commit` of the mirror to ROOT/var/db/repos/gentoo."""
    dest = _empty_target(root, "gentoo")
    export_tree(repo, commit, dest)
    return dest


def fetch_overlay(overlay: Overlay, cache_dir: Path) -> ResolvedOverlay:
    """Fetch the overlay's git repository into a bare cache clone and resolve its ref to a commit.

    The ref is tried as a tag, then a branch, then a commit id (hex); anything else is an error naming
    the overlay.
    """
    cache = cache_dir / "overlays" / f"{overlay.name}.git"
    # Builds of different profiles may share an overlay cache: one fetch at a time.
    with flocked(cache_dir / "overlays" / f"{overlay.name}.lock", f"overlay cache {overlay.name}", wait=600):
        if not (cache / "HEAD").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            git(cache, "init", "--quiet", "--bare")
        log.info("overlay %s: fetching %s", overlay.name, overlay.url)
        try:
            git(cache, "fetch", "--quiet", "--force", "--prune", "--no-write-fetch-head", "--end-of-options",
                overlay.url, "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
        except SnapshotterError as e:
            raise SnapshotterError(f"overlay {overlay.name}: fetching {overlay.url} failed: {e}") from None
    candidates = [f"refs/tags/{overlay.ref}", f"refs/heads/{overlay.ref}"]
    if all(c in "0123456789abcdef" for c in overlay.ref.lower()) and 7 <= len(overlay.ref) <= 64:
        candidates.append(overlay.ref)
    for cand in candidates:
        proc = git(cache, "rev-parse", "--verify", "--quiet", f"{cand}^{{commit}}", check=False)
        if proc.returncode == 0:
            commit = proc.stdout.decode().strip()
            log.info("overlay %s: %s is %s", overlay.name, overlay.ref, commit)
            return ResolvedOverlay(overlay.name, overlay.url, overlay.ref, commit, cache)
    raise SnapshotterError(f"overlay {overlay.name}: ref {overlay.ref!r} is not a tag, branch or commit of "
                           f"{overlay.url}")


def place_overlay(root: Path, ov: ResolvedOverlay) -> Path:
    dest = _empty_target(root, ov.name)
    export_tree(ov.cache, ov.commit, dest)
    return dest
