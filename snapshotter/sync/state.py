"""What the snapshotter remembers between runs, kept inside the bare repository (`snapshotter/state.json`):
last success and failure (for `snapshotter status`), what each push remote has received, and up to which
tag the builds have been queued.

The repository's refs are the truth; this file only remembers what the refs cannot say. A file that
cannot be read or does not have the expected shape (`[]`, invalid UTF-8, a field of the wrong type) is
reported and rebuilt from the repository (`load` says so in `SyncState.rebuilt`): the newest tag is taken
as queued and pushed-to remotes are pushed again (a push that is not needed is a no-op).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from snapshotter.errors import SnapshotterError
from snapshotter.fsutil import atomic_write
from snapshotter.git.repository import Repository

log = logging.getLogger(__name__)

_STR_FIELDS = ("last_success", "last_failure", "last_failure_reason", "last_tag", "queued_through")


@dataclass
class SyncState:
    last_success: str | None = None  # ISO time, UTC
    last_failure: str | None = None
    last_failure_reason: str | None = None
    last_tag: str | None = None
    pushed: dict[str, str] = field(default_factory=dict)  # remote -> commit of main it has
    # The newest tag whose builds have been queued ("" when none was yet; None: not known, e.g. a state
    # written before this field existed: a sync then takes the newest tag as done). Tags newer than it are
    # queued by the next sync, so a queue error after the refs moved loses nothing.
    queued_through: str | None = None
    # Not saved: why the file on disk could not be used (it was rebuilt from the repository).
    rebuilt: str | None = field(default=None, compare=False)


def _path(repo: Repository) -> Path:
    return repo.state_dir / "state.json"


def _check(data: object) -> str | None:
    """What is wrong with the decoded state, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    for k in _STR_FIELDS:
        if data.get(k) is not None and not isinstance(data[k], str):
            return f"{k!r} is not a string"
    pushed = data.get("pushed", {})
    if not isinstance(pushed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in pushed.items()):
        return "'pushed' is not an object of strings"
    return None


def rebuild(repo: Repository, why: str) -> SyncState:
    """A state made from the repository alone, for a state file that could not be used (`why`)."""
    newest = repo.newest_tag() if repo.exists() else None
    name = newest.name if newest is not None else ""
    return SyncState(last_tag=newest.name if newest is not None else None, queued_through=name,
                     last_failure=now_iso(),
                     last_failure_reason=f"{_path(repo)} was unreadable ({why}); rebuilt from the repository",
                     rebuilt=why)


def load(repo: Repository) -> SyncState:
    """The saved state; a missing file is an empty state, an unusable one is rebuilt (see the module doc)."""
    path = _path(repo)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return SyncState()
    except OSError as e:
        return rebuild(repo, f"cannot read it: {e.strerror}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # invalid UTF-8 or JSON
        return rebuild(repo, f"not JSON: {str(e)[:80]}")
    problem = _check(data)
    if problem is not None:
        return rebuild(repo, problem)
    known = SyncState.__dataclass_fields__
    return SyncState(**{k: v for k, v in data.items() if k in known and k != "rebuilt"})


def save(repo: Repository, state: SyncState) -> None:
    """Write atomically and durably (fsutil.atomic_write); an unusable file it replaces is logged once."""
    if state.rebuilt is not None:
        log.warning("%s was unreadable (%s); rebuilt from the repository", _path(repo), state.rebuilt)
        state.rebuilt = None
    data = asdict(state)
    del data["rebuilt"]
    try:
        repo.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(_path(repo), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), durable=True,
                     nofollow_dir=True)  # pushers can write the repository top: never through a link
    except OSError as e:
        raise SnapshotterError(f"cannot write {_path(repo)}: {e.strerror or e}") from None


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pending_pushes(remotes: list[str], repo: Repository, state: SyncState | None = None) -> list[str]:
    """Remotes that have not yet received the current `main`."""
    head = repo.head() if repo.exists() else None
    if head is None:
        return []
    state = state or load(repo)
    return [r for r in remotes if state.pushed.get(r) != head]
