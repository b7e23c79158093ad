"""Pushing `main` and the date tags to the configured remotes. A failure keeps the local import; the
remote stays pending and the next run tries again."""

from __future__ import annotations

import logging

from snapshotter.errors import SnapshotterError
from snapshotter.git.repository import Repository, git
from snapshotter.sync import state as syncstate

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 900.0


def push_pending(repo: Repository, remotes: list[str], state: syncstate.SyncState, *,
                 timeout: float = PUSH_TIMEOUT) -> list[tuple[str, str]]:
    """Push to every remote that lacks the current `main`; record successes in `state`.

    Each push has `timeout` seconds (sync.deadline), after which git and what it started (ssh, a
    remote helper) are killed and the remote counts as failed: a remote that accepts and never answers
    cannot hold the repository's lock.

    Returns the failures as (remote, reason), for the caller to report (logged here at debug level only, so
    that each push is reported once). Never forces: a remote that diverged is a failure to look at.
    """
    failed: list[tuple[str, str]] = []
    head = repo.head()
    for remote in syncstate.pending_pushes(remotes, repo, state):
        try:
            git(repo.path, "push", "--porcelain", "--", remote,
                f"{repo.branch_ref}:{repo.branch_ref}", "refs/tags/*:refs/tags/*",
                hermetic=False, timeout=timeout)
        except SnapshotterError as e:
            reason = str(e).removeprefix("git push failed: ")
            log.debug("push to %s failed: %s", remote, reason)
            failed.append((remote, reason))
            continue
        state.pushed[remote] = head  # type: ignore[assignment]
        log.debug("pushed %s to %s", repo.branch, remote)
    return failed
