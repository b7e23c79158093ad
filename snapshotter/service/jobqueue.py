"""The durable build queue: jobs `(profile, tag, overlay pins)`, deduplicated, leased to workers.

Callers use only `BuildQueue` (the abstract interface), `Job`, `JobRecord`, `WorkerRecord` and
`open_queue()`. The embedded backend is SQLite in the state directory (WAL, one short IMMEDIATE
transaction per call, a busy timeout), so several workers and git hooks of one host may use it at once;
`service.queue` set to a PostgreSQL URL or libpq connection string selects the backend in pgqueue.py,
for workers on many hosts. Nothing about either leaks out.

Semantics:
- `enqueue` deduplicates among queued and running jobs: the same job queued twice runs once.
- `claim` hands the oldest queued job to one worker with a lease; a running job whose lease has
  expired (its worker died) is claimable again. A job is never held by two workers at once: only
  the lease holder may `heartbeat` or `complete` it, and a worker that lost its lease is told so.
- A failed job keeps its log path and detail and can be `retry`ed (queued again, same id).
- `complete` repeated by the worker that completed the job is a no-op (its first answer may have been
  lost with the connection).
- Workers report themselves (`beat`): `workers()` lists the live ones, across hosts.
- QueueUnavailable (a QueueError) means the queue could not be reached: transient, the next call tries
  again; a worker keeps building while its lease can still be proven.
"""

from __future__ import annotations

import abc
import builtins
import json
import logging
import os
import re
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from snapshotter.errors import SnapshotterError
from snapshotter.fsutil import as_writers_of, writers_identity
from snapshotter.git.repository import tag_date

if TYPE_CHECKING:
    from snapshotter.config import Config

log = logging.getLogger(__name__)


class JobState(StrEnum):
    """Where a job is; the values are the strings the queue stores (and `str()` gives)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")  # profile and overlay names
COMMIT_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
WORKER_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


class QueueError(SnapshotterError):
    """A bad job, an unknown job id, or an operation the job's state does not allow."""


class QueueUnavailable(QueueError):
    """The queue cannot be reached now (database down or restarting, network gone): transient. The
    backend reconnects on the next call; whether a write whose answer was lost took effect is unknown
    (enqueue, heartbeat and complete are safe to repeat)."""


@dataclass(frozen=True, order=True)
class Job:
    """What to build. Equal jobs are the same build: the deduplication key."""

    profile: str
    tag: str
    overlays: tuple[tuple[str, str], ...] = ()  # (overlay name, commit), sorted by name

    def __post_init__(self) -> None:
        if not isinstance(self.profile, str) or not NAME_RE.match(self.profile):
            raise QueueError(f"not a valid profile name: {self.profile!r}")
        if not isinstance(self.tag, str) or tag_date(self.tag) is None:
            raise QueueError(f"not a snapshot tag (YYYY-MM-DD): {self.tag!r}")
        pins = tuple(sorted((str(n), str(c)) for n, c in dict(self.overlays).items()))
        if len(pins) != len(self.overlays):
            raise QueueError(f"an overlay is pinned twice: {self.overlays!r}")
        for name, commit in pins:
            if not NAME_RE.match(name):
                raise QueueError(f"not a valid overlay name: {name!r}")
            if not COMMIT_RE.match(commit):
                raise QueueError(f"overlay {name}: not a full commit id: {commit!r}")
        object.__setattr__(self, "overlays", pins)

    @property
    def key(self) -> str:
        """A canonical string for the job (same job, same bytes)."""
        return json.dumps([self.profile, self.tag, [list(p) for p in self.overlays]], separators=(",", ":"))

    def describe(self) -> str:
        pins = "".join(f" {n}@{c[:12]}" for n, c in self.overlays)
        return f"{self.profile} at {self.tag}{pins}"


@dataclass(frozen=True)
class JobRecord:
    """A job in the queue and what happened to it."""

    id: int
    job: Job
    state: JobState
    worker: str | None
    lease_until: float | None
    attempts: int
    created: float
    started: float | None
    finished: float | None
    log_path: str | None
    detail: str | None
    source: str | None  # who queued it (a hook, sync, a user)


@dataclass(frozen=True)
class WorkerRecord:
    """A worker as it last reported itself (`BuildQueue.beat`); times by the queue's clock."""

    ident: str  # HOST:PID
    host: str
    pid: int | None
    job: int | None  # the job it is building, None when idle
    started: float  # first report
    heartbeat: float  # last report
    age: float  # seconds since the last report
    live: bool  # reported within its promised interval


def split_worker_id(ident: str) -> tuple[str, int | None]:
    """(host, pid) of a worker id `HOST:PID`; (ident, None) for any other id."""
    host, sep, pid = ident.rpartition(":")
    return (host, int(pid)) if sep and host and pid.isdigit() else (ident, None)


class LeaseLost(QueueError):
    """The worker no longer holds the job's lease (it expired and another worker took the job)."""


class BuildQueue(abc.ABC):
    """The queue interface every backend implements; callers see nothing else."""

    @abc.abstractmethod
    def enqueue(self, job: Job, source: str | None = None) -> tuple[int, bool]:
        """Queue `job` unless an equal job is queued or running; return (id, created)."""

    @abc.abstractmethod
    def claim(self, worker: str, lease_seconds: float, skip: Collection[int] = ()) -> JobRecord | None:
        """Give the oldest claimable job (not in `skip`) to `worker` for `lease_seconds`, or None."""

    @abc.abstractmethod
    def heartbeat(self, job_id: int, worker: str, lease_seconds: float) -> None:
        """Extend the lease; raises LeaseLost if `worker` does not hold the job any more."""

    @abc.abstractmethod
    def complete(self, job_id: int, worker: str, ok: bool, log_path: str | None, detail: str | None) -> None:
        """Record the outcome; raises LeaseLost if `worker` does not hold the job any more."""

    @abc.abstractmethod
    def release(self, job_id: int, worker: str) -> None:
        """Give a running job back to the queue at once (its worker is shutting down)."""

    @abc.abstractmethod
    def retry(self, job_id: int) -> JobRecord:
        """Queue a failed job again (same id); its previous log path stays until it runs."""

    @abc.abstractmethod
    def list(self, states: tuple[JobState | str, ...] | None = None, limit: int | None = None) -> list[JobRecord]:
        """Jobs, oldest first, optionally only those in `states` (the newest `limit` of them); a state
        given as a string that is no JobState value raises QueueError."""

    @abc.abstractmethod
    def get(self, job_id: int) -> JobRecord:
        """One job; raises QueueError if there is no such job."""

    def counts(self) -> dict[JobState, int]:
        """Number of jobs per state (every state present)."""
        out = dict.fromkeys(JobState, 0)
        for rec in self.list():
            out[rec.state] += 1
        return out

    @abc.abstractmethod
    def beat(self, worker: str, job_id: int | None, ttl: float) -> None:
        """`worker` is alive, building `job_id` (None: idle), and reports again within `ttl` seconds."""

    @abc.abstractmethod
    def forget(self, worker: str) -> None:
        """`worker` stopped: remove it from `workers()`."""

    @abc.abstractmethod
    def workers(self, include_stale: bool = False) -> builtins.list[WorkerRecord]:
        """Workers that reported within their promised interval (with `include_stale`: every worker
        seen within the last week), by host and pid."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    profile TEXT NOT NULL,
    tag TEXT NOT NULL,
    overlays TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    worker TEXT,
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    log_path TEXT,
    detail TEXT,
    source TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_active_key ON jobs(key) WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER,
    job INTEGER,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
WORKERS_KEPT = 7 * 86400  # a worker that has not reported for this long is dropped from the list



class SqliteQueue(BuildQueue):
    """The embedded backend: one SQLite database file, safe for several processes."""

    def __init__(self, path: Path, busy_timeout: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._clock = clock
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = self._connect()
            try:
                db.executescript(_SCHEMA)  # IF NOT EXISTS: safe when several processes start at once
            finally:
                db.close()
        except sqlite3.Error as e:
            raise QueueError(f"build queue {self.path}: {e}") from None
        except OSError as e:
            raise QueueError(f"build queue {self.path}: {e.strerror}") from None

    def _now(self) -> float:
        return float(self._clock())

    def _connect(self) -> sqlite3.Connection:
        """A connection to the queue file, guarded against links planted in state_dir.

        Hook users can write state_dir (docs/service.md): SQLite follows a symlink planted at the
        database or at its -wal/-shm names and would create or write the file it points at. Python 3.11's
        sqlite3 cannot pass SQLITE_OPEN_NOFOLLOW, so SQLite opens the three names itself; what we can do
        (docs/security.md, "Files in directories others may write"):
        - before: each name, looked at relative to a descriptor of state_dir, must be missing or a
          regular file with one link (a hard link could name another file);
        - the database is created by us (O_CREAT|O_EXCL|O_NOFOLLOW), and SQLite opens it with
          `mode=rw`: it never creates the database, so a dangling link cannot make it create a file;
        - after a first read (which opens the database and, in WAL mode, its -wal/-shm) and before the
          first write: the names are still regular files with one link, and the database is the very
          file we checked (device, inode); else the connection is closed unused.
        A swap that wins the race between the checks and SQLite's own open remains possible, and SQLite
        initialises a -shm it opens (truncates and writes it) before any check can run: so everything
        here, where SQLite opens the three files, runs with the file system identity of those who may
        write state_dir (`fsutil.as_writers_of`), and a swapped-in link reaches only a file they could
        write themselves. The statements after this use the descriptors SQLite opened here."""
        try:
            with as_writers_of(self.path.parent):
                return self._open_checked()
        except (sqlite3.Error, PermissionError) as e:
            raise self._error(e) from None

    def _error(self, e: sqlite3.Error | OSError) -> QueueError:
        """The one line for an error of SQLite (or of opening its files), saying whose rights it had."""
        msg = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        ident = writers_identity(self.path.parent)
        if ident is not None and ("readonly" in msg or "unable to open" in msg or isinstance(e, PermissionError)):
            msg += (f" (state_dir {self.path.parent} may be written by others, so the queue is opened as them, "
                    f"uid {ident[0]} gid {ident[1]}: its files must be writable by the directory's owner or group)")
        return QueueError(f"build queue {self.path}: {msg}")

    def _open_checked(self) -> sqlite3.Connection:
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            main = self._check_files(dir_fd)
            if main is None:
                try:
                    os.close(os.open(self.path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                                     os.O_CLOEXEC, 0o644, dir_fd=dir_fd))
                except FileExistsError:
                    pass  # another process created it first: checked below like any existing file
                main = self._check_files(dir_fd)
            uri = f"file:{urllib.parse.quote(str(self.path))}?mode=rw"
            db = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout, isolation_level=None)
            try:
                db.row_factory = sqlite3.Row
                db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                # A read opens the database (and a WAL database's -wal and -shm) and writes nothing to it:
                # check what was opened before the first write (the journal mode below).
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
                if self._check_files(dir_fd) != main:
                    raise QueueError(f"build queue {self.path}: the database file was replaced while it was "
                                     "being opened; refusing to use it")
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = FULL")  # a queued job survives a power loss
            except BaseException:
                db.close()
                raise
            return db
        finally:
            os.close(dir_fd)

    def _check_files(self, dir_fd: int) -> tuple[int, int] | None:
        """QueueError unless the database and its -wal/-shm (relative to `dir_fd`) are each missing or a
        regular file with one link; the database's (device, inode), None if it is missing."""
        found = None
        for name in (self.path.name, self.path.name + "-wal", self.path.name + "-shm"):
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise QueueError(f"build queue {self.path}: {self.path.with_name(name)} is a symlink or not a "
                                 "regular file (or has other hard links); refusing to use it")
            if name == self.path.name:
                found = (st.st_dev, st.st_ino)
        return found

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: committed on success, rolled back on any error."""
        try:
            db = self._connect()
        except sqlite3.Error as e:
            raise QueueError(f"build queue {self.path}: {e}") from None
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                moved = db.execute("SELECT value FROM meta WHERE key = 'moved_to'").fetchone()
                if moved is not None:
                    raise QueueError(f"build queue {self.path} was moved to {moved[0]} (snapshotter queue migrate): "
                                     f"set [service] queue = \"{moved[0]}\" in the configuration")
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as e:
            raise self._error(e) from None
        finally:
            db.close()

    @staticmethod
    def _record(row: sqlite3.Row) -> JobRecord:
        pins = tuple((n, c) for n, c in json.loads(row["overlays"]))
        return JobRecord(id=row["id"], job=Job(row["profile"], row["tag"], pins), state=JobState(row["state"]),
                         worker=row["worker"], lease_until=row["lease_until"], attempts=row["attempts"],
                         created=row["created"], started=row["started"], finished=row["finished"],
                         log_path=row["log_path"], detail=row["detail"], source=row["source"])

    def enqueue(self, job: Job, source: str | None = None) -> tuple[int, bool]:
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE key = ? AND state IN ('queued', 'running')",
                             (job.key,)).fetchone()
            if row is not None:
                log.debug("job %s already queued as %d", job.describe(), row["id"])
                return int(row["id"]), False
            cur = db.execute(
                "INSERT INTO jobs (key, profile, tag, overlays, state, created, source) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.key, job.profile, job.tag, json.dumps([list(p) for p in job.overlays]), JobState.QUEUED,
                 self._now(), source))
            return int(cur.lastrowid or 0), True

    def claim(self, worker: str, lease_seconds: float, skip: Collection[int] = ()) -> JobRecord | None:
        if not WORKER_RE.match(worker):
            raise QueueError(f"not a valid worker id: {worker!r}")
        skipped = [int(i) for i in skip]
        with self._tx() as db:
            now = self._now()
            row = db.execute(
                "SELECT * FROM jobs WHERE (state = 'queued' OR (state = 'running' AND lease_until < ?)) "
                f"AND id NOT IN ({', '.join('?' * len(skipped))}) ORDER BY id LIMIT 1", (now, *skipped)).fetchone()
            if row is None:
                return None
            if row["state"] == JobState.RUNNING:
                log.warning("job %d: lease of worker %s expired; taking it over", row["id"], row["worker"])
            db.execute("UPDATE jobs SET state = 'running', worker = ?, lease_until = ?, started = ?, "
                       "attempts = attempts + 1, finished = NULL WHERE id = ?",
                       (worker, now + lease_seconds, now, row["id"]))
            return self._record(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def _held(self, db: sqlite3.Connection, job_id: int, worker: str) -> None:
        row = db.execute("SELECT state, worker FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise QueueError(f"no job {job_id}")
        if row["state"] != JobState.RUNNING or row["worker"] != worker:
            raise LeaseLost(f"job {job_id}: worker {worker} no longer holds it (now {row['state']}"
                            f"{' by ' + row['worker'] if row['worker'] else ''})")

    def heartbeat(self, job_id: int, worker: str, lease_seconds: float) -> None:
        with self._tx() as db:
            self._held(db, job_id, worker)
            db.execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (self._now() + lease_seconds, job_id))

    def complete(self, job_id: int, worker: str, ok: bool, log_path: str | None, detail: str | None) -> None:
        with self._tx() as db:
            row = db.execute("SELECT state, worker FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row["state"] in (JobState.DONE, JobState.FAILED) and row["worker"] == worker:
                return  # completed by this worker already (a repeated call)
            self._held(db, job_id, worker)
            state = JobState.DONE if ok else JobState.FAILED
            db.execute("UPDATE jobs SET state = ?, lease_until = NULL, finished = ?, log_path = ?, detail = ? "
                       "WHERE id = ?", (state, self._now(), log_path, detail, job_id))

    def release(self, job_id: int, worker: str) -> None:
        with self._tx() as db:
            self._held(db, job_id, worker)
            db.execute("UPDATE jobs SET state = 'queued', worker = NULL, lease_until = NULL WHERE id = ?",
                       (job_id,))

    def retry(self, job_id: int) -> JobRecord:
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise QueueError(f"no job {job_id}")
            if row["state"] != JobState.FAILED:
                raise QueueError(f"job {job_id} is {row['state']}; only failed jobs can be retried")
            other = db.execute("SELECT id FROM jobs WHERE key = ? AND state IN ('queued', 'running')",
                               (row["key"],)).fetchone()
            if other is not None:
                raise QueueError(f"job {job_id}: the same build is already queued as job {other['id']}")
            db.execute("UPDATE jobs SET state = 'queued', worker = NULL, lease_until = NULL WHERE id = ?",
                       (job_id,))
            return self._record(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def list(self, states: tuple[JobState | str, ...] | None = None, limit: int | None = None) -> list[JobRecord]:
        wanted = [_job_state(s) for s in states or ()]
        sql = "SELECT * FROM jobs"
        args: list[str | int] = []
        if wanted:
            sql += f" WHERE state IN ({', '.join('?' * len(wanted))})"
            args.extend(wanted)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._tx() as db:
            rows = db.execute(sql, args).fetchall()
        return [self._record(r) for r in reversed(rows)]

    def get(self, job_id: int) -> JobRecord:
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise QueueError(f"no job {job_id}")
        return self._record(row)

    def counts(self) -> dict[JobState, int]:
        out = dict.fromkeys(JobState, 0)
        with self._tx() as db:
            for row in db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
                out[JobState(row["state"])] = int(row["n"])
        return out

    def beat(self, worker: str, job_id: int | None, ttl: float) -> None:
        if not WORKER_RE.match(worker):
            raise QueueError(f"not a valid worker id: {worker!r}")
        host, pid = split_worker_id(worker)
        with self._tx() as db:
            now = self._now()
            db.execute("INSERT INTO workers (id, host, pid, job, started, heartbeat, expires) VALUES (?, ?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (id) DO UPDATE SET job = excluded.job, heartbeat = excluded.heartbeat, "
                       "expires = excluded.expires", (worker, host, pid, job_id, now, now, now + ttl))
            db.execute("DELETE FROM workers WHERE expires < ?", (now - WORKERS_KEPT,))

    def forget(self, worker: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM workers WHERE id = ?", (worker,))

    def workers(self, include_stale: bool = False) -> builtins.list[WorkerRecord]:
        with self._tx() as db:
            now = self._now()
            rows = db.execute("SELECT * FROM workers WHERE expires >= ? ORDER BY host, pid, id",
                              (now - WORKERS_KEPT if include_stale else now,)).fetchall()
        return [WorkerRecord(ident=r["id"], host=r["host"], pid=r["pid"], job=r["job"], started=r["started"],
                             heartbeat=r["heartbeat"], age=max(0.0, now - r["heartbeat"]), live=r["expires"] >= now)
                for r in rows]

    @contextmanager
    def moving_out(self, target: str) -> Iterator[builtins.list[JobRecord]]:
        """Every job, oldest first, with every other writer held off; when the block ends without an
        error the queue is marked as moved to `target` (shown, so never a password) and refuses all
        further use, so that nothing is queued where no worker looks any more."""
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
            yield [self._record(r) for r in rows]
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('moved_to', ?)", (target,))


def _job_state(value: JobState | str) -> JobState:
    try:
        return JobState(value)
    except ValueError:
        raise QueueError(f"unknown job state {value!r} (known: {', '.join(JobState)})") from None


SQLITE = "sqlite"  # service.queue's value for the embedded backend


def queue_path(state_dir: Path) -> Path:
    return Path(state_dir) / "queue.sqlite"


def open_queue(cfg: Config) -> BuildQueue:
    """The configured queue: `service.queue` "sqlite" is the embedded backend under `cfg.state_dir`,
    anything else a PostgreSQL database (pgqueue.py; psycopg is imported only then)."""
    if cfg.service.queue == SQLITE:
        return SqliteQueue(queue_path(cfg.state_dir))
    from snapshotter.service.pgqueue import PgQueue

    return PgQueue(cfg.service.queue)


def queue_exists(cfg: Config) -> bool:
    """Has anything ever been queued (so that reading the queue needs no new state)? A database
    queue always exists (`snapshotter queue init` made it)."""
    return cfg.service.queue != SQLITE or queue_path(cfg.state_dir).exists()
