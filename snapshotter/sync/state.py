"""What the snapshotter remembers between runs, kept inside the bare repository (`snapshotter/state.json`):
last success and failure (for `snapshotter status`) and what each push remote has received."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from snapshotter.fsutil import atomic_write
from snapshotter.git.repository import Repository


@dataclass
class SyncState:
    last_success: str | None = None  # ISO time, UTC
    last_failure: str | None = None
    last_failure_reason: str | None = None
    last_tag: str | None = None
    pushed: dict[str, str] = field(default_factory=dict)  # remote -> commit of main it has


def _path(repo: Repository) -> Path:
    return repo.state_dir / "state.json"


def load(repo: Repository) -> SyncState:
    try:
        with open(_path(repo)) as f:
            data = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return SyncState()
    known = SyncState.__dataclass_fields__
    return SyncState(**{k: v for k, v in data.items() if k in known})


def save(repo: Repository, state: SyncState) -> None:
    """Write atomically and durably (fsutil.atomic_write)."""
    repo.state_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(asdict(state), indent=2, sort_keys=True) + "\n"
    atomic_write(_path(repo), data.encode(), durable=True, nofollow_dir=True)  # pushers can write the repo's top


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pending_pushes(remotes: list[str], repo: Repository, state: SyncState | None = None) -> list[str]:
    """Remotes that have not yet received the current `main`."""
    head = repo.head() if repo.exists() else None
    if head is None:
        return []
    state = state or load(repo)
    return [r for r in remotes if state.pushed.get(r) != head]
