"""Workers on several build hosts sharing one build queue on PostgreSQL, for real.

Each "host" is a network namespace with its own hostname and address (tests/helpers/netns.py) and its
own configuration and state directory; its worker reaches the session's throwaway PostgreSQL
(tests/service/conftest.py) over its own veth link, logging in the libpq way (PGPASSFILE). The workers
are the real `snapshotter worker` processes; their builds are cheap: the test-only seam
$SNAPSHOTTER_TEST_BUILD_COMMAND (snapshotter/service/worker.py) runs BUILD below instead of a chroot
build, which appends "start JOB HOST" and "end JOB HOST" to a file, so the tests can count how often
each job ran and where. The real chroot build on a "remote" host is the last test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import netns, pglib, testlib
from helpers.servicelib import git_run, make_config
from helpers.tinystage import make_mirror, tiny_stage

from snapshotter.service.jobqueue import Job, JobState, QueueUnavailable
from snapshotter.service.pgqueue import PgQueue, init_schema

pytestmark = pytest.mark.slow

SNAPSHOTTER = shutil.which("snapshotter") or "snapshotter"
BUILD = """#!/bin/sh
echo "start $SNAPSHOTTER_JOB $(hostname)" >> "$RUNS"
case "$SNAPSHOTTER_PROFILE" in
    slow) sleep 8 ;;
    mid) sleep 4 ;;
    short) sleep 1 ;;
    *) sleep 0.3 ;;
esac
echo "end $SNAPSHOTTER_JOB $(hostname)" >> "$RUNS"
"""


@pytest.fixture(scope="module")
def hosts(pg_cluster: pglib.Cluster) -> Iterator[list[netns.Host]]:
    if not netns.available():
        pytest.skip("ip netns is not available (iproute2, CAP_SYS_ADMIN)")
    with netns.hosts(["hosta", "hostb"]) as made:
        pg_cluster.restart(listen=["127.0.0.1", *(h.gateway for h in made)])
        try:
            yield made
        finally:
            pg_cluster.restart(listen=["127.0.0.1"])


class Fleet:
    """A database, one configuration per host pointing at it over that host's link, the build script."""

    def __init__(self, root: Path, cluster: pglib.Cluster, hosts: list[netns.Host]) -> None:
        self.root = root
        self.cluster = cluster
        self.db = cluster.new_database()
        self.url = cluster.conninfo(self.db)  # the test's own view, over 127.0.0.1
        init_schema(self.url)
        self.queue = PgQueue(self.url)
        self.runs = root / "runs.log"
        self.runs.touch()
        self.script = root / "build.sh"
        self.script.write_text(BUILD)
        self.configs: dict[str, Path] = {}
        for h in hosts:
            home = root / h.name
            home.mkdir()
            self.configs[h.name] = make_config(home, root / "gentoo.git", extra=(
                f'[service]\nqueue = "{cluster.conninfo(self.db, host=h.gateway)}"\n'))
        self.logs: dict[str, Path] = {}
        self.procs: list[subprocess.Popen[str]] = []

    def env(self) -> dict[str, str]:
        return dict(os.environ, SNAPSHOTTER_TEST_BUILD_COMMAND=f"sh {self.script}", RUNS=str(self.runs))

    def start_worker(self, host: netns.Host, lease: float) -> subprocess.Popen[str]:
        self.logs[host.name] = self.root / f"worker-{host.name}.log"
        with open(self.logs[host.name], "w") as out:
            proc = host.popen([SNAPSHOTTER, "--config", str(self.configs[host.name]), "worker", "--poll", "0.2",
                               "--lease", str(lease)], stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, env=self.env())
        self.procs.append(proc)
        return proc

    def output(self, host: netns.Host) -> str:
        return self.logs[host.name].read_text()

    def runs_of(self, job: int) -> list[tuple[str, str]]:
        """(start|end, host) for each line of the build script about `job`."""
        return [(w[0], w[2]) for w in (line.split() for line in self.runs.read_text().splitlines())
                if w[1] == str(job)]

    def stop(self) -> list[int | None]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        status = []
        for p in self.procs:
            try:
                status.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.kill()
                status.append(None)
        return status


@pytest.fixture
def fleet(tmp_path: Path, pg_cluster: pglib.Cluster, hosts: list[netns.Host]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, pg_cluster, hosts)
    try:
        yield f
    finally:
        f.stop()
        f.queue.close()
        if not pg_cluster.running():
            pg_cluster.start()


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `cond`; the test's own queue connection may be the one a restart broke: it reconnects."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if cond():
                return
        except QueueUnavailable:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_hosts_share_the_queue_and_a_database_restart_loses_and_repeats_nothing(fleet: Fleet,
                                                                                   hosts: list[netns.Host]):
    q = fleet.queue
    slow = [q.enqueue(Job("slow", tag), source="test")[0] for tag in ("2026-11-19", "2026-11-20")]
    quick = [q.enqueue(Job("quick", f"2026-11-0{d}"))[0] for d in range(1, 7)]
    assert q.enqueue(Job("quick", "2026-11-01")) == (quick[0], False)  # deduplicated across the fleet
    for h in hosts:
        fleet.start_worker(h, lease=10)
    # The two oldest jobs are the slow ones: each host builds one of them.
    wait_for(lambda: all(("start", h.name) in [r for j in slow for r in fleet.runs_of(j)] for h in hosts), 60,
             "both hosts to start a slow build")
    out = testlib.run_cli("--config", str(fleet.configs["hosta"]), "workers")
    assert out.returncode == 0, out.stderr
    building = {line.split()[0]: line.split()[2] for line in out.stdout.splitlines()[1:]}
    assert building.keys() == {"hosta", "hostb"} and sorted(int(j) for j in building.values()) == slow, out.stdout
    # The database goes away mid-build (a crash, then a start): no heartbeat gets through meanwhile.
    fleet.cluster.stop("immediate")
    time.sleep(3)  # longer than a heartbeat interval (10/4 s), well within the lease
    fleet.cluster.start()
    wait_for(lambda: q.counts()[JobState.DONE] == len(slow + quick), 120, "every job to be done")
    assert fleet.stop() == [0, 0]
    for jid in slow + quick:
        runs = fleet.runs_of(jid)
        assert [kind for kind, _ in runs] == ["start", "end"] and runs[0][1] == runs[1][1], (jid, runs)
        rec = q.get(jid)
        assert rec.state == JobState.DONE and rec.attempts == 1 and rec.worker.startswith(runs[0][1] + ":")
    for h in hosts:
        text = fleet.output(h)
        assert "cannot renew the lease" in text and "lease renewed after" in text, text
        assert "Traceback" not in text and "lease lost" not in text
        assert f"worker {h.name}:" in text
    # Both hosts carried on after the restart: the quick jobs were spread over both.
    ran_on = {fleet.runs_of(j)[0][1] for j in quick}
    assert ran_on == {"hosta", "hostb"}, ran_on


def test_a_result_finished_while_the_database_is_down_is_recorded_once_it_is_back(fleet: Fleet,
                                                                                 hosts: list[netns.Host]):
    q = fleet.queue
    jid, _ = q.enqueue(Job("short", "2026-11-19"))
    fleet.start_worker(hosts[0], lease=10)
    wait_for(lambda: fleet.runs_of(jid), 60, "the build to start")
    fleet.cluster.stop("fast")
    wait_for(lambda: len(fleet.runs_of(jid)) == 2, 30, "the build to finish")
    time.sleep(1)  # the worker tries to record the result and cannot
    fleet.cluster.start()
    wait_for(lambda: q.get(jid).state == JobState.DONE, 60, "the result to be recorded")
    assert fleet.stop() == [0]
    assert "cannot record the result yet" in fleet.output(hosts[0])
    rec = q.get(jid)
    assert rec.attempts == 1 and [k for k, _ in fleet.runs_of(jid)] == ["start", "end"]


def test_kill_9_of_a_host_mid_build_hands_its_job_to_the_other_host_after_the_lease(fleet: Fleet,
                                                                                    hosts: list[netns.Host]):
    q = fleet.queue
    jid, _ = q.enqueue(Job("mid", "2026-11-19"))
    for h in hosts:
        fleet.start_worker(h, lease=3)
    wait_for(lambda: fleet.runs_of(jid), 60, "the build to start")
    first = fleet.runs_of(jid)[0][1]
    dead, alive = (hosts[0], hosts[1]) if first == hosts[0].name else (hosts[1], hosts[0])
    dead.kill_all()  # the worker, its build and everything else on that host, at once
    assert not dead.pids()
    assert q.get(jid).state == JobState.RUNNING  # the queue learns it only from the lease
    wait_for(lambda: q.get(jid).state == JobState.DONE, 60, "the other host to take the job over and finish it")
    rec = q.get(jid)
    assert rec.attempts == 2 and rec.worker.startswith(f"{alive.name}:")
    assert fleet.runs_of(jid) == [("start", dead.name), ("start", alive.name), ("end", alive.name)]
    assert "taking it over" in fleet.output(alive)
    # The dead host's worker no longer counts as live; --all still shows it, as stale.
    out = testlib.run_cli("--config", str(fleet.configs[alive.name]), "workers")
    assert [line.split()[0] for line in out.stdout.splitlines()[1:]] == [alive.name], out.stdout
    out = testlib.run_cli("--config", str(fleet.configs[alive.name]), "workers", "--all")
    stale = [line for line in out.stdout.splitlines() if line.startswith(dead.name)]
    assert len(stale) == 1 and stale[0].endswith(" stale"), out.stdout


def test_a_push_enqueues_into_postgresql_and_a_remote_host_builds_it_for_real(tmp_path: Path,
                                                                           pg_cluster: pglib.Cluster,
                                                                           hosts: list[netns.Host]):
    """The mirror server's hook queues into the database; a worker on another host runs the real chroot
    build (the tiny stand-in stage) into the shared output directory."""
    stage = tiny_stage(tmp_path / "tiny-stage.tar.xz")
    bare = make_mirror(tmp_path, {"2026-11-19": {"BUILD_SECONDS": "0", "VERSION": "v19\n"}})
    db = pg_cluster.new_database()
    init_schema(pg_cluster.conninfo(db))
    shared = tmp_path / "shared"  # what every build host mounts (NFS in production): the builds' output

    def host_config(name: str, address: str) -> Path:
        home = tmp_path / name
        home.mkdir()
        return make_config(home, bare, {"tiny": []}, stage=stage, extra=(
            f'[service]\nqueue = "{pg_cluster.conninfo(db, host=address)}"\n'
            f'[build]\nwork_dir = "{home / "work"}"\noutput = "{shared / "out"}"\ncache_dir = "{home / "cache"}"\n'))

    mirror_cfg = host_config("mirror", "127.0.0.1")
    remote = hosts[1]
    remote_cfg = host_config(remote.name, remote.gateway)
    assert testlib.run_cli("--config", str(mirror_cfg), "hooks", "install", str(bare)).returncode == 0
    work = tmp_path / "clone"
    git_run(tmp_path, "clone", "-q", str(bare), str(work))
    testlib.write_tree(work, {"VERSION": "v20\n"})
    git_run(work, "commit", "-q", "-am", "Update portage tree to 2026-11-20")
    git_run(work, "tag", "-a", "-m", "2026-11-20", "2026-11-20")
    out = git_run(work, "push", "origin", "main", "2026-11-20")
    assert "queued build 1: tiny at 2026-11-20" in out
    q = PgQueue(pg_cluster.conninfo(db))
    try:
        rec = q.get(1)
        assert rec.state == JobState.QUEUED and rec.source == f"push:{bare.resolve()}"
        log = tmp_path / "remote-worker.log"
        with open(log, "w") as f:
            worker = remote.popen([SNAPSHOTTER, "--config", str(remote_cfg), "worker", "--once"],
                                  stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        assert worker.wait(timeout=300) == 0, log.read_text()
        rec = q.get(1)
        assert rec.state == JobState.DONE and rec.worker.startswith(f"{remote.name}:"), (rec, log.read_text())
        assert (shared / "out/tiny/2026-11-20.1/packages/app-misc/fake/fake-1.gpkg.tar").read_text() == "v20\n"
        assert rec.log_path == str(shared / "out/tiny/2026-11-20.1/build.log")
    finally:
        q.close()
