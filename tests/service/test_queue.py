"""The durable build queue on its real backends: dedup, leases, retry, concurrent processes.

Every test that takes `make_queue` runs twice: on the embedded SQLite backend and on PostgreSQL (a
throwaway cluster, one fresh database per test: tests/service/conftest.py), with the same assertions.
`make_queue(clock)` opens the test's queue (again: same store); `clock` stands in for the time source
(the host's for SQLite, the database server's now() for PostgreSQL).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import testlib
from helpers.servicelib import make_config, make_repos

from snapshotter.service.jobqueue import BuildQueue, Job, JobState, LeaseLost, QueueError, SqliteQueue
from snapshotter.service.pgqueue import PgQueue, init_schema

C1 = "a" * 40
C2 = "b" * 40


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


MakeQueue = Callable[..., BuildQueue]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_queue(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> MakeQueue:
    if backend == "sqlite":
        path = tmp_path / "q.sqlite"
        return lambda clock=None: SqliteQueue(path, clock=clock or time.time)
    url = request.getfixturevalue("pg_url")
    init_schema(url)
    return lambda clock=None: PgQueue(url, clock=clock)


@pytest.fixture
def queue_setting(backend: str, request: pytest.FixtureRequest) -> str:
    """The configuration's [service] table for the backend ("" for the default, SQLite)."""
    if backend == "sqlite":
        return ""
    url = request.getfixturevalue("pg_url")
    init_schema(url)
    return f'[service]\nqueue = "{url}"\n'


def test_job_is_validated_and_canonical():
    j1 = Job("basic", "2026-11-20", (("zeta", C1), ("alpha", C2)))
    j2 = Job("basic", "2026-11-20", (("alpha", C2), ("zeta", C1)))
    assert j1 == j2 and j1.key == j2.key
    assert j1.overlays == (("alpha", C2), ("zeta", C1))
    for bad in [("-x", "2026-11-20", ()), ("a b", "2026-11-20", ()), ("basic", "2026-13-01", ()),
                ("basic", "main", ()), ("basic", "2026-11-20", (("o", "HEAD"),)),
                ("basic", "2026-11-20", (("$(id)", C1),)), ("basic", "2026-11-20", (("o", C1), ("o", C2)))]:
        with pytest.raises(QueueError):
            Job(*bad)


def test_enqueue_dedups_among_active_jobs(make_queue: MakeQueue):
    q = make_queue()
    job = Job("basic", "2026-11-20")
    id1, created1 = q.enqueue(job, source="test")
    id2, created2 = q.enqueue(Job("basic", "2026-11-20"))
    assert created1 and (id2, created2) == (id1, False)
    other, created = q.enqueue(Job("basic", "2026-11-20", (("ov", C1),)))
    assert created and other != id1
    rec = q.claim("w1", 60)
    assert rec is not None and rec.id == id1 and rec.state == JobState.RUNNING
    assert q.enqueue(job) == (id1, False)  # still running: same build, not queued again
    q.complete(id1, "w1", True, "/logs/1.log", None)
    id3, created3 = q.enqueue(job)  # finished: a new request is a new job
    assert created3 and id3 not in (id1, other)
    assert q.counts() == {JobState.QUEUED: 2, JobState.RUNNING: 0, JobState.DONE: 1, JobState.FAILED: 0}


def test_lease_expiry_hands_job_to_next_worker_and_fences_the_old_one(make_queue: MakeQueue):
    clock = Clock()
    q = make_queue(clock)
    jid, _ = q.enqueue(Job("basic", "2026-11-20"))
    assert q.claim("w1", 10).id == jid
    assert q.claim("w2", 10) is None  # held: never two workers at once
    clock.t += 5
    q.heartbeat(jid, "w1", 10)  # renewed until t+15
    clock.t += 9
    assert q.claim("w2", 10) is None
    clock.t += 7  # w1 stopped renewing (died)
    rec = q.claim("w2", 10)
    assert rec is not None and rec.id == jid and rec.worker == "w2" and rec.attempts == 2
    with pytest.raises(LeaseLost):
        q.heartbeat(jid, "w1", 10)
    with pytest.raises(LeaseLost):
        q.complete(jid, "w1", True, None, None)
    q.complete(jid, "w2", True, "/l", "ok")
    assert q.get(jid).state == JobState.DONE and q.claim("w3", 10) is None


def test_failed_job_keeps_log_and_can_be_retried(make_queue: MakeQueue):
    q = make_queue()
    jid, _ = q.enqueue(Job("basic", "2026-11-20"))
    with pytest.raises(QueueError, match="only failed"):
        q.retry(jid)
    q.claim("w1", 60)
    q.complete(jid, "w1", False, "/logs/x.log", "emerge failed (exit 1)")
    rec = q.get(jid)
    assert (rec.state, rec.log_path, rec.detail) == (JobState.FAILED, "/logs/x.log", "emerge failed (exit 1)")
    dup, created = q.enqueue(Job("basic", "2026-11-20"))
    assert created
    with pytest.raises(QueueError, match=f"already queued as job {dup}"):
        q.retry(jid)
    q.claim("w1", 60)
    q.complete(dup, "w1", False, None, "x")
    again = q.retry(jid)
    assert again.id == jid and again.state == JobState.QUEUED and again.log_path == "/logs/x.log"
    assert q.claim("w2", 60).id == jid
    with pytest.raises(QueueError, match="no job 999"):
        q.get(999)
    with pytest.raises(QueueError, match="unknown job state"):
        q.list(("bogus",))


def test_queue_survives_reopen(make_queue: MakeQueue):
    jid, _ = make_queue().enqueue(Job("basic", "2026-11-20"))
    assert [r.id for r in make_queue().list((JobState.QUEUED,))] == [jid]
    assert [r.id for r in make_queue().list(("queued",))] == [jid]  # a state's value names it too


def test_sqlite_queue_is_wal_and_rejects_a_corrupt_file(tmp_path: Path):
    path = tmp_path / "state" / "q.sqlite"
    SqliteQueue(path).enqueue(Job("basic", "2026-11-20"))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT state FROM jobs").fetchall() == [("queued",)]  # stored as the plain string
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(QueueError, match="bad.sqlite"):
        SqliteQueue(bad)


def _victims(tmp_path: Path) -> tuple[Path, Path, dict[Path, bytes]]:
    """A text file and another program's SQLite database outside state_dir, with their bytes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    text = outside / "passwd"
    text.write_bytes(b"root:x:0:0:must stay\n")
    other = outside / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (1)")
    db.close()
    return text, other, {text: text.read_bytes(), other: other.read_bytes()}


def test_sqlite_queue_never_creates_through_a_dangling_link_nor_uses_hard_links(tmp_path: Path):
    """Hook users can write state_dir: a dangling link at the database would have SQLite create its target;
    a hard link at -wal or -shm names another file. Both refused before SQLite opens anything."""
    text, _, before = _victims(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    target = tmp_path / "outside" / "created-by-sqlite"
    (state / "queue.sqlite").symlink_to(target)
    with pytest.raises(QueueError, match="is a symlink or not a regular file"):
        SqliteQueue(state / "queue.sqlite")
    assert not target.exists() and not target.is_symlink()
    (state / "queue.sqlite").unlink()
    q = SqliteQueue(state / "queue.sqlite")  # created by us, O_EXCL|O_NOFOLLOW
    for name in ("queue.sqlite-wal", "queue.sqlite-shm"):
        (state / name).unlink(missing_ok=True)
        (state / name).hardlink_to(text)
        with pytest.raises(QueueError, match="has other hard links"):
            q.enqueue(Job("basic", "2026-11-20"))
        (state / name).unlink()
    assert {p: p.read_bytes() for p in before} == before
    jid, _ = q.enqueue(Job("basic", "2026-11-20"))
    assert [r.id for r in q.list()] == [jid]


@pytest.mark.parametrize("swap", ["symlink", "other file"])
def test_sqlite_queue_checks_what_sqlite_opened_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               swap: str):
    """Fault injection for the race no check can close (Python cannot ask SQLite for NOFOLLOW): the
    database is swapped after the checks, as SQLite opens it, for a link to another program's database
    (or another file renamed over it). SQLite opens what it finds, but the check after the first read sees
    the swap, and nothing is written there (not even the journal mode)."""
    _, other, before = _victims(tmp_path)
    state = tmp_path / "state"
    q = SqliteQueue(state / "queue.sqlite")
    real_connect = sqlite3.connect
    copy = state / "copy"

    def swapping_connect(*args, **kw):
        if swap == "symlink":
            (state / "queue.sqlite").unlink()
            (state / "queue.sqlite").symlink_to(other)
        else:
            copy.write_bytes(other.read_bytes())
            copy.rename(state / "queue.sqlite")
        return real_connect(*args, **kw)

    monkeypatch.setattr(sqlite3, "connect", swapping_connect)
    with pytest.raises(QueueError, match="is a symlink" if swap == "symlink" else "was replaced while") as e:
        q.enqueue(Job("basic", "2026-11-20"))
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in before} == before
    for path in (other, state / "queue.sqlite"):
        with real_connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # never switched to WAL
            assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("t",)]
        db.close()


@pytest.fixture
def shared_dir():
    """A directory every user can reach (pytest's own tmp dirs are root's 0700), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="snapshotter-test-queue-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the queue of a state_dir others may write")
def test_sqlite_queue_in_a_directory_others_write_is_opened_as_them(shared_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """state_dir owned by a hook user (here nobody): root's worker opens the queue's files with that user's
    file system identity (the files it makes are that user's), so whatever SQLite opens by name there,
    links swapped in after our checks included, is opened with that user's rights; root's files stay as
    they were (SQLite 3.40 also refuses links at -wal/-shm itself), and root is root again afterwards."""
    text, other, before = _victims(shared_dir)
    state = shared_dir / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    q = SqliteQueue(state / "queue.sqlite")
    jid, _ = q.enqueue(Job("basic", "2026-11-20"))
    assert q.get(jid).state == JobState.QUEUED
    assert (state / "queue.sqlite").stat().st_uid == 65534  # made as the directory's owner, not as root
    real_connect = sqlite3.connect

    def swapping_connect(*args, **kw):
        for name, victim in (("queue.sqlite-shm", text), ("queue.sqlite-wal", other)):
            (state / name).unlink(missing_ok=True)
            (state / name).symlink_to(victim)
        return real_connect(*args, **kw)

    monkeypatch.setattr(sqlite3, "connect", swapping_connect)
    with pytest.raises(QueueError) as e:
        q.enqueue(Job("basic", "2026-11-21"))
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in before} == before
    for name in ("queue.sqlite-shm", "queue.sqlite-wal"):
        (state / name).unlink()
    assert [r.id for r in q.list()] == [jid]  # the queue itself is intact
    with open(text, "ab"):  # and root is root again afterwards
        pass


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_queue_its_writers_cannot_write_says_so_in_one_line(shared_dir: Path):
    state = shared_dir / "state"
    state.mkdir()
    SqliteQueue(state / "queue.sqlite")  # root's own directory: made by root
    os.chown(state, 65534, 65534)  # then handed to a hook user, the database still root's 0644
    with pytest.raises(QueueError, match="may be written by others, so the queue is opened as them, uid 65534") as e:
        SqliteQueue(state / "queue.sqlite").enqueue(Job("basic", "2026-11-20"))
    assert "\n" not in str(e.value)


def _claimer(make_queue: MakeQueue, worker: str, out: multiprocessing.Queue) -> None:
    q = make_queue()  # its own connection: forked children share nothing but the queue's store
    got = []
    while (rec := q.claim(worker, 600)) is not None:
        got.append(rec.id)
    out.put(got)


def _enqueuer(make_queue: MakeQueue, out: multiprocessing.Queue) -> None:
    q = make_queue()
    out.put([q.enqueue(Job("p", f"2026-01-{d:02d}")) for d in range(1, 21)])


def test_concurrent_processes_never_share_a_job(make_queue: MakeQueue):
    make_queue()
    ctx = multiprocessing.get_context("fork")  # the children inherit make_queue (nothing is pickled)
    out = ctx.Queue()
    enq = [ctx.Process(target=_enqueuer, args=(make_queue, out)) for _ in range(3)]
    for p in enq:
        p.start()
    results = [out.get(timeout=60) for _ in enq]
    for p in enq:
        p.join()
    ids = {jid for r in results for jid, _ in r}
    assert len(ids) == 20  # three processes queued the same 20 jobs: 20 rows
    assert sum(created for r in results for _, created in r) == 20
    workers = [ctx.Process(target=_claimer, args=(make_queue, f"w{i}", out)) for i in range(4)]
    for p in workers:
        p.start()
    claimed = [jid for _ in workers for jid in out.get(timeout=60)]
    for p in workers:
        p.join()
    assert sorted(claimed) == sorted(ids)  # every job claimed exactly once


def test_release_gives_the_job_back(make_queue: MakeQueue):
    q = make_queue()
    jid, _ = q.enqueue(Job("basic", "2026-11-20"))
    q.claim("w1", 600)
    with pytest.raises(LeaseLost):
        q.release(jid, "w2")
    q.release(jid, "w1")
    assert q.get(jid).state == JobState.QUEUED
    assert q.claim("w2", 600).id == jid


def test_claim_can_skip_jobs(make_queue: MakeQueue):
    q = make_queue()
    a, _ = q.enqueue(Job("a", "2026-11-20"))
    b, _ = q.enqueue(Job("b", "2026-11-20"))
    assert q.claim("w1", 60, skip={a}).id == b
    assert q.claim("w1", 60, skip={a}) is None
    assert q.claim("w1", 60).id == a


def test_queue_cli_add_show_list_and_one_line_errors(tmp_path: Path, queue_setting: str):
    repos = make_repos(tmp_path)
    ov = [{"name": "myov", "url": str(repos.overlay), "ref": "main"}]
    cfg = str(make_config(tmp_path, repos.mirror, {"basic": ov, "desktop": ov}, extra=queue_setting))
    out = testlib.run_cli("--config", cfg, "queue", "add", "--profile", "basic", "--profile", "desktop",
                          "--overlay", f"myov={C1}")
    assert out.returncode == 0 and out.stdout == "queued: job 1\nqueued: job 2\n", out.stderr
    out = testlib.run_cli("--config", cfg, "queue", "add", "--profile", "basic", "--overlay", f"myov={C1}")
    assert out.stdout == "already queued: job 1\n"
    out = testlib.run_cli("--config", cfg, "queue", "show", "1")
    assert "tag: 2026-11-19\n" in out.stdout and f"overlays: myov={C1}\n" in out.stdout
    assert "source: cli\n" in out.stdout
    out = testlib.run_cli("--config", cfg, "queue", "--state", "queued", "-n", "1")
    assert out.stdout.count("\n") == 1 and out.stdout.split()[:2] == ["2", "queued"]
    for args, msg in [(["queue", "show", "99"], "no job 99"),
                      (["queue", "retry", "99"], "no job 99"),
                      (["queue", "add", "--profile", "nope"], "no profile 'nope'"),
                      (["queue", "add", "--profile", "basic", "--tag", "2026-01-01"], "no tag 2026-01-01"),
                      (["queue", "add", "--profile", "basic", "--tag", "$(id)"], "not a snapshot tag"),
                      (["queue", "add", "--profile", "basic", "--overlay", "x"], "expected NAME=COMMIT"),
                      (["queue", "add", "--profile", "basic", "--overlay", "myov=HEAD"], "not a full commit id"),
                      (["queue", "add", "--profile", "basic", "--overlay", f"other={C1}"], "has no overlay 'other'")]:
        out = testlib.run_cli("--config", cfg, *args)
        errors = [line for line in out.stderr.splitlines() if line.startswith("snapshotter: error:")]
        assert out.returncode == 1 and len(errors) == 1 and msg in errors[0], (args, out.stderr)
        assert "Traceback" not in out.stderr
    other = tmp_path / "other"
    other.mkdir()
    bad = make_config(other, repos.mirror, {"basic": []}, extra='[service]\nbuild_profiles = ["nope"]')
    out = testlib.run_cli("--config", str(bad), "status")
    assert out.returncode == 1 and "service.build_profiles[0]: no profile 'nope'" in out.stderr
