"""Benchmark of the build queue under contention: 1,000 jobs, 8 worker processes, a no-op build.

For each backend, 1,000 distinct jobs are queued, then 8 processes take them as fast as they can, each
doing per job exactly the queue calls `snapshotter worker` makes around a build (report in, claim,
report the job, one lease renewal, complete, report idle, read the final record) with a build that
does nothing. The processes connect first and start together.

  * SQLite: the embedded backend, 8 processes on this host (it serves one host only);
  * PostgreSQL: a throwaway cluster of Debian's PostgreSQL 15 (fsync on, as a server runs it), the 8
    processes spread over 2 "hosts": network namespaces, 4 each, reaching the database over their own
    veth links (tests/helpers/netns.py); without `ip netns` all 8 run on this host (said in the output).

Reported: jobs lost (queued but never done) and jobs run twice (claimed more than once), both must be 0;
claims per second (1,000 / wall time from start to the last process done); the latency of a claim call
under that contention (median, p95, max). Target: PostgreSQL >= 100 claims/s (the queue is never the
bottleneck of a fleet whose builds take minutes). Needs root (initdb runs as the postgres user, ip netns).

    python benchmarks/bench_queue.py [--jobs 1000] [--workers 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helpers: the PostgreSQL cluster, namespaces
sys.path.insert(0, str(HERE.parent))

from helpers import netns, pglib  # noqa: E402

from snapshotter.service.jobqueue import BuildQueue, Job, JobState, SqliteQueue  # noqa: E402
from snapshotter.service.pgqueue import PgQueue, init_schema  # noqa: E402

TARGET_PG_CLAIMS_PER_S = 100.0
LEASE = 600.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def open_spec(spec: str) -> BuildQueue:
    return SqliteQueue(Path(spec[len("sqlite:"):])) if spec.startswith("sqlite:") else PgQueue(spec)


def child(spec: str, worker: str, out: Path) -> int:
    """One worker process: connect, say ready, wait for go, then take jobs until the queue is empty."""
    q = open_spec(spec)
    q.counts()  # connected (and the SQLite file opened) before the clock starts
    print("ready", flush=True)
    sys.stdin.readline()
    claims: list[tuple[int, float, int]] = []
    while True:
        q.beat(worker, None, 60)
        t0 = time.perf_counter()
        rec = q.claim(worker, LEASE)
        took = time.perf_counter() - t0
        if rec is None:
            break
        q.beat(worker, rec.id, LEASE)
        q.heartbeat(rec.id, worker, LEASE)  # the no-op build
        q.complete(rec.id, worker, True, None, "no-op")
        q.beat(worker, None, 60)
        q.get(rec.id)
        claims.append((rec.id, took, rec.attempts))
    q.forget(worker)
    out.write_text(json.dumps(claims))
    return 0


def jobs(n: int) -> list[Job]:
    per_day = 50
    return [Job(f"p{i % per_day}", (date(2026, 1, 1) + timedelta(days=i // per_day)).isoformat()) for i in range(n)]


def run_phase(name: str, spec_for: dict[str, str], hosts: dict[str, netns.Host | None], q: BuildQueue,
              n_jobs: int, n_workers: int, work: Path) -> dict[str, object]:
    t0 = time.perf_counter()
    ids = [q.enqueue(j, source="bench")[0] for j in jobs(n_jobs)]
    enqueue_s = time.perf_counter() - t0
    assert len(set(ids)) == n_jobs
    names = list(hosts)
    procs = []
    for i in range(n_workers):
        host_name = names[i % len(names)]
        host = hosts[host_name]
        out = work / f"{name}-w{i}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", spec_for[host_name], f"{host_name}:{i}",
                str(out)]
        if host is None:
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        else:
            p = host.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append((p, out, host_name))
    for p, _, _ in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    for p, _, _ in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p, _, _ in procs:
        if p.wait(timeout=3600) != 0:
            raise SystemExit(f"bench: error: a {name} worker failed (exit {p.returncode})")
    wall = time.perf_counter() - t0
    claimed: dict[int, int] = {}
    latencies: list[float] = []
    per_host: dict[str, int] = {}
    first_attempts = 0
    for _, out, host_name in procs:
        for jid, took, attempts in json.loads(out.read_text()):
            claimed[jid] = claimed.get(jid, 0) + 1
            latencies.append(took)
            per_host[host_name] = per_host.get(host_name, 0) + 1
            first_attempts += attempts == 1
    done = {r.id for r in q.list((JobState.DONE,))}
    lost = len([j for j in ids if j not in done or j not in claimed])
    twice = len([j for j, n in claimed.items() if n > 1])
    lat = sorted(latencies)
    return {"backend": name, "jobs": n_jobs, "workers": n_workers, "hosts": per_host, "lost": lost,
            "run_twice": twice, "first_attempts": first_attempts, "wall_s": round(wall, 3),
            "claims_per_s": round(len(latencies) / wall, 1), "enqueue_per_s": round(n_jobs / enqueue_s, 1),
            "claim_ms_median": round(statistics.median(lat) * 1000, 2),
            "claim_ms_p95": round(lat[int(0.95 * (len(lat) - 1))] * 1000, 2),
            "claim_ms_max": round(lat[-1] * 1000, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("QUEUE", "WORKER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child[0], args.child[1], Path(args.child[2]))
    if os.geteuid() != 0 or not pglib.available():
        log("bench: error: needs root and Debian's postgresql-15 (apt-get install postgresql)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    results = []
    load_before = os.getloadavg()
    try:
        log(f"SQLite: {args.jobs} jobs, {args.workers} workers on this host ...")
        sq = work / "queue.sqlite"
        results.append(run_phase("sqlite", {"localhost": f"sqlite:{sq}"}, {"localhost": None}, SqliteQueue(sq),
                                 args.jobs, args.workers, work))
        log("PostgreSQL: starting a throwaway cluster (fsync on) ...")
        cluster = pglib.Cluster.create(prefix="bench-queue-pg-", fsync=True)
        os.environ["PGPASSFILE"] = str(cluster.pgpass)
        try:
            db = cluster.new_database()
            url = cluster.conninfo(db)
            init_schema(url)
            if netns.available():
                with netns.hosts(["hosta", "hostb"]) as made:
                    cluster.restart(listen=["127.0.0.1", *(h.gateway for h in made)])
                    log(f"PostgreSQL: {args.jobs} jobs, {args.workers} workers on 2 hosts (network namespaces) ...")
                    results.append(run_phase(
                        "postgresql", {h.name: cluster.conninfo(db, host=h.gateway) for h in made},
                        {h.name: h for h in made}, PgQueue(url), args.jobs, args.workers, work))
            else:
                log(f"PostgreSQL: no ip netns here: {args.jobs} jobs, {args.workers} workers on this host ...")
                results.append(run_phase("postgresql", {"localhost": url}, {"localhost": None}, PgQueue(url),
                                         args.jobs, args.workers, work))
        finally:
            cluster.remove()
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    load_after = os.getloadavg()
    ok = True
    print(f"{'backend':<11} {'hosts':<22} {'lost':>4} {'twice':>5} {'claims/s':>9} {'claim ms median':>16} "
          f"{'p95':>7} {'max':>7} {'enqueue/s':>10}")
    for r in results:
        hosts = ", ".join(f"{h} {n}" for h, n in sorted(r["hosts"].items()))  # type: ignore[attr-defined]
        print(f"{r['backend']:<11} {hosts:<22} {r['lost']:>4} {r['run_twice']:>5} {r['claims_per_s']:>9} "
              f"{r['claim_ms_median']:>16} {r['claim_ms_p95']:>7} {r['claim_ms_max']:>7} {r['enqueue_per_s']:>10}")
        ok = ok and r["lost"] == 0 and r["run_twice"] == 0
    pg = [r for r in results if r["backend"] == "postgresql"]
    met = bool(pg) and float(pg[0]["claims_per_s"]) >= TARGET_PG_CLAIMS_PER_S  # type: ignore[arg-type]
    print(f"PostgreSQL >= {TARGET_PG_CLAIMS_PER_S:.0f} claims/s: {'PASS' if met else 'FAIL'}; "
          f"0 lost, 0 run twice: {'PASS' if ok else 'FAIL'}; load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "load": [load_before, load_after]}, indent=2) + "\n")
    return 0 if ok and met else 1


if __name__ == "__main__":
    sys.exit(main())
