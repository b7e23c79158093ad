"""What only the PostgreSQL backend of the build queue has: the configuration key and its credentials,
the versioned schema (`queue init`), reconnecting after a restart, claims that skip locked rows, moving a
SQLite queue (`queue migrate`), the worker list across hosts (`workers`). The semantics both backends
share are tested on both in test_queue.py; workers on several hosts in test_pg_hosts.py."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import psycopg
import pytest
from helpers import pglib, testlib
from helpers.servicelib import make_config, make_repos

from snapshotter import config
from snapshotter.errors import ConfigError
from snapshotter.service import pgqueue
from snapshotter.service.jobqueue import Job, JobState, QueueError, QueueUnavailable, SqliteQueue, queue_path
from snapshotter.service.pgqueue import PgQueue, init_schema

SECRET = "s3cr3t-Pw"


def errors(out) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("snapshotter: error:")]


def test_service_queue_is_validated_and_a_password_is_refused_and_never_shown(tmp_path: Path):
    for good in ("sqlite", "postgresql://snap@db.example.org/snapshotter", "postgres://db/q?sslmode=require",
                 "service=snapshotter", "host=db dbname=q user=snap"):
        (tmp_path / "c.toml").write_text(f'[service]\nqueue = "{good}"\n')
        assert config.load(tmp_path / "c.toml").service.queue == good
    for bad, msg in [("mysql://x", "expected \"sqlite\", a postgresql:// URL"),
                     (f"postgresql://snap:{SECRET}@db/q", "holds a password"),
                     (f"postgresql://snap@db/q?password={SECRET}", "holds a password"),
                     (f"service=snap password={SECRET}", "holds a password"),
                     (f"host=db password='{SECRET} x'", "holds a password")]:
        (tmp_path / "c.toml").write_text(f'[service]\nqueue = "{bad}"\n')
        with pytest.raises(ConfigError, match=msg) as e:
            config.load(tmp_path / "c.toml")
        assert "service.queue" in str(e.value) and SECRET not in str(e.value)
    repos = make_repos(tmp_path)
    cfg = make_config(tmp_path, repos.mirror, {"basic": []},
                      extra=f'[service]\nqueue = "postgresql://snap:{SECRET}@127.0.0.1/q"\n')
    out = testlib.run_cli("--config", str(cfg), "queue")
    assert out.returncode == 1 and len(errors(out)) == 1 and "holds a password" in out.stderr
    assert SECRET not in out.stderr + out.stdout and "Traceback" not in out.stderr
    cfg.write_text(cfg.read_text().replace(f"snap:{SECRET}@", "snap@").replace("postgresql://", "sqlite").split(
        "[service]")[0])
    out = testlib.run_cli("--config", str(cfg), "queue", "migrate", "--to", f"postgresql://snap:{SECRET}@127.0.0.1/q")
    assert out.returncode == 1 and len(errors(out)) == 1 and "--to: " in errors(out)[0]
    assert "holds a password" in out.stderr and SECRET not in out.stderr + out.stdout


def test_queue_init_creates_and_migrates_the_schema_and_a_queue_without_it_is_refused(tmp_path: Path, pg_url: str,
                                                                                     pg_cluster: pglib.Cluster):
    with pytest.raises(QueueError, match="no queue schema .* `snapshotter queue init`"):
        PgQueue(pg_url).list()
    repos = make_repos(tmp_path)
    cfg = make_config(tmp_path, repos.mirror, {"basic": []}, extra=f'[service]\nqueue = "{pg_url}"\n')
    out = testlib.run_cli("--config", str(cfg), "status")
    assert out.returncode == 1 and "queue init" in errors(out)[0]
    out = testlib.run_cli("--config", str(cfg), "queue", "init")
    assert out.returncode == 0 and out.stdout == f"build queue {pg_url}: schema version 1 created\n", out.stderr
    out = testlib.run_cli("--config", str(cfg), "queue", "init")
    assert out.stdout == f"build queue {pg_url}: schema version 1, up to date\n"
    assert PgQueue(pg_url).enqueue(Job("basic", "2026-11-19")) == (1, True)
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as a newer snapshotter would leave it
        conn.execute("UPDATE snapshotter.meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(QueueError, match="schema version 99 is newer than this snapshotter knows"):
        PgQueue(pg_url).list()
    out = testlib.run_cli("--config", str(cfg), "queue", "init")
    assert out.returncode == 1 and "upgrade snapshotter" in errors(out)[0]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE snapshotter.meta SET value = '1' WHERE key = 'schema_version'")
    assert [r.job.profile for r in PgQueue(pg_url).list()] == ["basic"]  # init never touched the jobs


def test_an_unreachable_database_is_one_line_and_transient(tmp_path: Path, pg_url: str,
                                                           pg_cluster: pglib.Cluster):
    nowhere = f"postgresql://snap@127.0.0.1:{pglib.free_port()}/q"
    with pytest.raises(QueueUnavailable, match="connection refused|Connection refused"):
        PgQueue(nowhere).list()
    repos = make_repos(tmp_path)
    cfg = make_config(tmp_path, repos.mirror, {"basic": []}, extra=f'[service]\nqueue = "{nowhere}"\n')
    for args in (["queue"], ["status"], ["workers"], ["queue", "init"], ["worker", "--once"]):
        out = testlib.run_cli("--config", str(cfg), *args)
        assert out.returncode == 1 and len(errors(out)) == 1 and nowhere in errors(out)[0], (args, out.stderr)
        assert "Traceback" not in out.stderr
    # The same queue object reconnects after the server comes back: nothing queued is lost.
    init_schema(pg_url)
    q = PgQueue(pg_url)
    jid, _ = q.enqueue(Job("basic", "2026-11-19"))
    pg_cluster.stop("immediate")
    with pytest.raises(QueueUnavailable):
        q.get(jid)
    pg_cluster.start()
    try:
        q.get(jid)
    except QueueUnavailable:  # the first call after the restart may still find the old connection dead
        pass
    assert q.get(jid).state == JobState.QUEUED and q.enqueue(Job("basic", "2026-11-19")) == (jid, False)


def test_an_enqueue_during_a_database_restart_waits_for_it(pg_url: str, pg_cluster: pglib.Cluster):
    """A hook pushing while the database restarts still queues its build (enqueue waits a few seconds)."""
    init_schema(pg_url)
    q = PgQueue(pg_url)
    q.enqueue(Job("a", "2026-11-18"))  # connected before the crash
    pg_cluster.stop("immediate")
    later = threading.Timer(1.0, pg_cluster.start)
    later.start()
    try:
        jid, created = q.enqueue(Job("a", "2026-11-19"))
    finally:
        later.join()
    assert created and q.get(jid).state == JobState.QUEUED and len(q.list()) == 2


def test_claims_skip_rows_another_transaction_holds_instead_of_waiting(pg_url: str):
    init_schema(pg_url)
    q = PgQueue(pg_url)
    first, _ = q.enqueue(Job("a", "2026-11-19"))
    second, _ = q.enqueue(Job("b", "2026-11-19"))
    with psycopg.connect(pg_url) as other:  # a claim in progress elsewhere holds the oldest row
        other.execute("SELECT id FROM snapshotter.jobs WHERE id = %s FOR UPDATE", (first,))
        rec = q.claim("hosta:1", 60)
        assert rec is not None and rec.id == second
        assert q.claim("hosta:2", 60) is None
    assert q.claim("hosta:2", 60).id == first  # released: claimable again


def test_leases_are_the_database_servers_time(pg_url: str):
    init_schema(pg_url)
    q = PgQueue(pg_url)
    jid, _ = q.enqueue(Job("a", "2026-11-19"))
    rec = q.claim("hosta:1", 90)
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT extract(epoch FROM started)::float8, extract(epoch FROM lease_until)::float8, "
                           "extract(epoch FROM now())::float8 FROM snapshotter.jobs WHERE id = %s", (jid,)).fetchone()
    started, until, server_now = row
    assert (rec.started, rec.lease_until) == (started, until) and until - started == pytest.approx(90)
    assert started <= server_now  # set by the server's now(), not by this host's clock


def test_queue_migrate_moves_a_sqlite_queue_with_its_history(tmp_path: Path, pg_url: str):
    repos = make_repos(tmp_path)
    cfg = make_config(tmp_path, repos.mirror, {"basic": []})
    path = queue_path(tmp_path / "state")
    old = SqliteQueue(path)
    done, _ = old.enqueue(Job("basic", "2026-11-18"), source="sync")
    old.claim("build1:10", 600)
    old.complete(done, "build1:10", True, "/out/basic/2026-11-18.1/build.log", "ok")
    failed, _ = old.enqueue(Job("basic", "2026-11-19", (("ov", "c" * 40),)), source="push:/srv/git/ov.git")
    old.claim("build1:10", 600)
    old.complete(failed, "build1:10", False, "/out/basic/2026-11-19.1/build.log", "build failed (exit 1)")
    running, _ = old.enqueue(Job("desktop", "2026-11-19"))
    old.claim("build1:11", 600)
    queued, _ = old.enqueue(Job("server", "2026-11-19"), source="cli")
    before = {r.id: r for r in old.list()}

    out = testlib.run_cli("--config", str(cfg), "queue", "migrate", "--to", pg_url)
    assert out.returncode == 1 and f"job {running} is running on build1:11" in errors(out)[0]
    assert old.list() == list(before.values())  # refused: nothing changed, the SQLite queue still works
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM snapshotter.jobs").fetchone() == (0,)
    old.release(running, "build1:11")  # its worker stopped
    before = {r.id: r for r in old.list()}

    out = testlib.run_cli("--config", str(cfg), "queue", "migrate", "--to", pg_url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"moved 4 job(s) (2 queued, 0 running, 1 done, 1 failed) from {path} to {pg_url}\n")
    assert f'[service] queue = "{pg_url}"' in out.stdout
    new = PgQueue(pg_url)
    after = {r.id: r for r in new.list()}
    assert after.keys() == before.keys()
    for jid, rec in before.items():
        got = after[jid]
        assert (got.job, got.state, got.worker, got.attempts, got.log_path, got.detail, got.source) == \
               (rec.job, rec.state, rec.worker, rec.attempts, rec.log_path, rec.detail, rec.source)
        for a, b in ((got.created, rec.created), (got.started, rec.started), (got.finished, rec.finished)):
            assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-3)
    assert new.enqueue(Job("basic", "2026-11-18")) == (queued + 1, True)  # ids go on after the moved ones
    assert new.enqueue(Job("server", "2026-11-19")) == (queued, False)  # still deduplicated
    assert new.retry(failed).state == JobState.QUEUED
    # The SQLite queue refuses every further use, naming where the queue went; a second move is refused.
    with pytest.raises(QueueError, match=f"was moved to {pg_url}"):
        old.enqueue(Job("late", "2026-11-20"))
    out = testlib.run_cli("--config", str(cfg), "queue")
    assert out.returncode == 1 and "queue migrate" in errors(out)[0]
    out = testlib.run_cli("--config", str(cfg), "queue", "migrate", "--to", pg_url)
    assert out.returncode == 1 and len(errors(out)) == 1
    with sqlite3.connect(path) as db:  # the file stays, as a backup
        assert db.execute("SELECT count(*) FROM jobs").fetchone() == (4,)


def test_migrate_refuses_a_database_that_already_holds_jobs(tmp_path: Path, pg_url: str):
    repos = make_repos(tmp_path)
    cfg = make_config(tmp_path, repos.mirror, {"basic": []})
    SqliteQueue(queue_path(tmp_path / "state")).enqueue(Job("basic", "2026-11-19"))
    init_schema(pg_url)
    PgQueue(pg_url).enqueue(Job("other", "2026-11-19"))
    out = testlib.run_cli("--config", str(cfg), "queue", "migrate", "--to", pg_url)
    assert out.returncode == 1 and "already holds 1 job(s)" in errors(out)[0]
    assert [r.job.profile for r in SqliteQueue(queue_path(tmp_path / "state")).list()] == ["basic"]
    with_pg = make_config(tmp_path, repos.mirror, {"basic": []}, extra=f'[service]\nqueue = "{pg_url}"\n')
    out = testlib.run_cli("--config", str(with_pg), "queue", "migrate", "--to", pg_url)
    assert out.returncode == 1 and "already names a database" in errors(out)[0]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_lists_live_workers_across_hosts(tmp_path: Path, backend: str, request: pytest.FixtureRequest):
    repos = make_repos(tmp_path)
    extra = ""
    if backend == "postgresql":
        url = request.getfixturevalue("pg_url")
        init_schema(url)
        extra = f'[service]\nqueue = "{url}"\n'
    cfg = make_config(tmp_path, repos.mirror, {"basic": []}, extra=extra)
    out = testlib.run_cli("--config", str(cfg), "workers")
    assert out.returncode == 0 and out.stdout == "no live worker\n"
    if backend == "sqlite":
        assert not queue_path(tmp_path / "state").exists()  # a look creates nothing
    from snapshotter.service.jobqueue import open_queue

    q = open_queue(config.load(cfg))
    jid, _ = q.enqueue(Job("basic", "2026-11-19"))
    q.claim("build2.example.org:812", 600)
    q.beat("build2.example.org:812", jid, 600)
    q.beat("build1.example.org:4711", None, 600)
    q.beat("build3.example.org:99", None, 0.001)  # promised to report again at once, and did not
    q.beat("gone.example.org:7", None, 600)
    q.forget("gone.example.org:7")  # stopped cleanly
    out = testlib.run_cli("--config", str(cfg), "workers")
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["HOST", "PID", "JOB", "LAST", "HEARTBEAT"]
    assert [line.split()[:3] for line in lines[1:]] == [["build1.example.org", "4711", "-"],
                                                        ["build2.example.org", "812", str(jid)]], out.stdout
    out = testlib.run_cli("--config", str(cfg), "workers", "--all")
    stale = [line for line in out.stdout.splitlines() if line.startswith("build3.example.org")]
    assert len(out.stdout.splitlines()) == 4 and len(stale) == 1 and stale[0].endswith(" stale"), out.stdout
    assert pgqueue.SCHEMA_VERSION == len(pgqueue.MIGRATIONS)
