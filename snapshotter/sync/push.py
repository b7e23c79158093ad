"""Pushing `main` and the date tags to the configured remotes. A failure keeps the local import; the
remote stays pending and the next run tries again."""

from __future__ import annotations

import logging

from snapshotter.errors import SnapshotterError
from snapshotter.git.repository import Repository, git
from snapshotter.sync import state as syncstate

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 900.0


def push_pending(mirror: Repository, remotes: list[str], state: syncstate.SyncState) -> list[tuple[str, str]]:
    """Push to every remote that lacks the current `main`; record successes in `state`.

    Returns the failures as (remote, reason). Never forces: a remote that diverged is a failure to look at.
    """
    failed: list[tuple[str, str]] = []
    head = mirror.head()
    for remote in syncstate.pending_pushes(remotes, mirror, state):
        try:
            git(mirror.path, "push", "--porcelain", "--", remote,
                f"{mirror.branch_ref}:{mirror.branch_ref}", "refs/tags/*:refs/tags/*",
                hermetic=False, timeout=PUSH_TIMEOUT)
        except SnapshotterError as e:
            reason = str(e).removeprefix("git push failed: ")
            log.error("push to %s failed: %s (the import is kept; the next run retries)", remote, reason)
            failed.append((remote, reason))
            continue
        state.pushed[remote] = head  # type: ignore[assignment]
        log.info("pushed %s to %s", mirror.branch, remote)
    return failed
