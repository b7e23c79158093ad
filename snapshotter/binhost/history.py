"""The history of edition switches: `WEB_ROOT/.snapshotter/history.jsonl`, one JSON object per line.

Each line: time (UTC, ISO 8601 with Z), user, action (promote | rollback | automatic), profile, edition,
from (build id or null), to (build id), root (the roots directory switched to, `EDITION.N`). A line is
appended after the switch; the switched-to root carries the same record in its edition.json, so a switch
whose line was lost (kill -9 between the rename and the append) is written at the next switch
(`reconcile`). Lines that do not parse (a torn last line) are skipped.
"""

from __future__ import annotations

import getpass
import json
import os
import pwd
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from snapshotter.errors import SnapshotterError

ACTIONS = ("promote", "rollback", "automatic")


@dataclass(frozen=True)
class Entry:
    time: str
    user: str
    action: str
    profile: str
    edition: str
    from_build: str | None
    to_build: str
    root: str

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time, "user": self.user, "action": self.action, "profile": self.profile,
                "edition": self.edition, "from": self.from_build, "to": self.to_build, "root": self.root}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        for key in ("time", "user", "action", "profile", "edition", "to", "root"):
            if not isinstance(d.get(key), str):
                raise ValueError(f"history entry: {key} missing")
        frm = d.get("from")
        if frm is not None and not isinstance(frm, str):
            raise ValueError("history entry: from is not a string")
        return cls(d["time"], d["user"], d["action"], d["profile"], d["edition"], frm, d["to"], d["root"])

    def when(self) -> datetime:
        return parse_time(self.time)


def now_utc() -> datetime:
    """Now, or `SNAPSHOTTER_NOW` (unix seconds; tests) like the rest of the snapshotter."""
    env = os.environ.get("SNAPSHOTTER_NOW")
    if env:
        try:
            return datetime.fromtimestamp(int(env), UTC)
        except ValueError:
            raise SnapshotterError(f"SNAPSHOTTER_NOW must be a unix time, got {env!r}") from None
    return datetime.now(UTC)


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def current_user() -> str:
    """Who switches: $SUDO_USER (an operator behind sudo), else the login name, else the uid's name or number."""
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        return sudo
    try:
        return os.getlogin()
    except OSError:
        pass
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        pass
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return str(os.getuid())


def read(path: Path) -> list[Entry]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
            if isinstance(data, dict):
                out.append(Entry.from_dict(data))
        except ValueError:
            continue
    return out


def append(path: Path, entry: Entry) -> None:
    """Append `entry` as one line (one write, fsynced); a torn last line is ended first."""
    line = json.dumps(entry.to_dict(), sort_keys=True) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def last_for(entries: list[Entry], profile: str, edition: str) -> Entry | None:
    for e in reversed(entries):
        if e.profile == profile and e.edition == edition:
            return e
    return None


def pointed_at_since(entries: list[Entry], since: datetime) -> set[tuple[str, str]]:
    """(profile, build) pairs an edition pointed at some time after `since`: both ends of every switch
    made after it (the build switched away from was pointed at until then)."""
    out: set[tuple[str, str]] = set()
    for e in entries:
        try:
            when = e.when()
        except ValueError:
            continue
        if when >= since:
            out.add((e.profile, e.to_build))
            if e.from_build:
                out.add((e.profile, e.from_build))
    return out


def window_start(days: int) -> datetime:
    return now_utc() - timedelta(days=days)
