"""Benchmark of the service's reaction times: the bounds that were timing asserts in the tests (the tests
keep the functional checks; the durations are measured here, on a quiet machine):

  * `git push` of a new date tag into the snapshot repository, its post-receive hook queueing a build
    for each of 3 profiles (target <= 1 s; what gets queued: tests/service/test_hooks.py);
  * `git push` of an overlay commit, the hook pinning it for the profile that follows the branch (<= 1 s);
  * `snapshotter run`, idle after its catch-up cycle: SIGTERM to exit (<= 2 s; tests/service/test_service.py);
  * `snapshotter build` mid-emerge, real Portage in the stand-in stage: SIGTERM, and Ctrl-C (SIGINT), to
    the build stopped, its root and partial output removed, the process gone (<= 30 s;
    tests/chroot/test_build_portage.py). Needs root and the stand-in stage (built once and cached by
    `python tests/helpers/stage.py`); --no-build skips it. Build roots go where the test puts them: on
    /dev/shm when it is writable (--build-work elsewhere).

Every step is timed --repeat times (the builds --build-repeat times per signal); a target is met when the
slowest run is within it (the tests asserted every run). Everything lives in a temporary directory
(--work to keep it somewhere), every command is given its own --config: nothing is written to
/var/lib/snapshotter or the other built-in defaults.

    python benchmarks/bench_service.py [--repeat 5] [--build-repeat 1] [--no-build] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helpers: repositories, keys, HTTP mirror, stage
sys.path.insert(0, str(HERE.parent))  # so that `chroot` is the library, not the namespace tests/chroot/ makes
sys.path.insert(0, str(HERE))

import bench_import  # noqa: E402
from helpers import ebuild_repo, servicelib, stage, testlib  # noqa: E402

from chroot.mounts import mounts_under, safe_rmtree  # noqa: E402

SNAPSHOTTER = str(Path(sys.executable).parent / "snapshotter")  # the one of this virtualenv
TARGETS = {"push_tag": 1.0, "push_overlay": 1.0, "run_sigterm_idle": 2.0, "build_sigterm": 30.0,
           "build_sigint": 30.0}
LABELS = {
    "push_tag": "git push of a date tag, hook queues 3 builds",
    "push_overlay": "git push of an overlay commit, hook queues 1 build",
    "run_sigterm_idle": "snapshotter run idle: SIGTERM to exit",
    "build_sigterm": "snapshotter build mid-emerge: SIGTERM to clean exit",
    "build_sigint": "snapshotter build mid-emerge: Ctrl-C to clean exit",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cli(*args: str) -> str:
    proc = subprocess.run([SNAPSHOTTER, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: snapshotter {' '.join(args[:3])} failed: {proc.stderr.strip()}")
    return proc.stdout


def bench_pushes(root: Path, repeat: int) -> dict[str, list[float]]:
    """Pushes into bare repositories with the hook installed (the set-up of tests/service/test_hooks.py)."""
    repos = servicelib.make_repos(root)
    cfg = servicelib.make_config(root, repos.mirror, {
        "basic": [],
        "desktop": [{"name": "myov", "url": str(repos.overlay), "ref": "main"}],
        "server": [{"name": "myov", "url": f"file://{repos.overlay}", "ref": "stable"}],
    })
    for bare in (repos.mirror, repos.overlay):
        cli("--config", str(cfg), "hooks", "install", str(bare), "--executable", SNAPSHOTTER)
    times: dict[str, list[float]] = {"push_tag": [], "push_overlay": []}
    for i in range(repeat):
        tag = f"{date(2026, 11, 20) + timedelta(days=i):%Y-%m-%d}"
        repos.date_tag(tag)
        t0 = time.perf_counter()
        out = servicelib.git_run(repos.mirror_work, "push", "origin", "main", tag)
        times["push_tag"].append(time.perf_counter() - t0)
        if out.count("queued build") != 3:
            raise SystemExit(f"bench: the hook did not queue 3 builds for {tag}:\n{out}")
        repos.commit(repos.overlay_work, "NEWS", f"{i}\n")
        t0 = time.perf_counter()
        out = servicelib.git_run(repos.overlay_work, "push", "origin", "main")
        times["push_overlay"].append(time.perf_counter() - t0)
        if out.count("queued build") != 1:
            raise SystemExit(f"bench: the hook did not queue the overlay's build:\n{out}")
    return times


def _wait_line(lines: list[str], text: str, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: no {text!r} from snapshotter run:\n{''.join(lines)[-2000:]}")
        time.sleep(0.02)


def bench_run_stop(root: Path, repeat: int) -> list[float]:
    """`snapshotter run` against a loopback mirror holding the newest day: once the catch-up cycle is done
    (the first run imports the day, the next ones find it up to date) it is idle; then SIGTERM."""
    key = testlib.make_key(root / "gnupg")
    mirror = testlib.serve(root / "mirror")
    try:
        testlib.build_snapshot(mirror.root, date(2026, 11, 20), key=key)
        cfg = root / "run.toml"
        cfg.write_text(f'repo = "{root / "gentoo.git"}"\nstate_dir = "{root / "state"}"\n[sync]\n'
                       f'mirrors = ["{mirror.url}"]\nkeyring = ["{key.public}"]\nfingerprints = ["{key.fingerprint}"]\n'
                       f'cache_dir = "{root / "cache"}"\ntimeout = 5.0\nretries = 0\n')
        now = datetime(2026, 11, 21, 2, 0, tzinfo=UTC)  # the newest snapshot then: 2026-11-20
        env = {**os.environ, "SNAPSHOTTER_NOW": str(int(now.timestamp()))}
        times = []
        for _ in range(repeat):
            proc = subprocess.Popen([SNAPSHOTTER, "--config", str(cfg), "run"], stdin=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, env=env)
            lines: list[str] = []
            assert proc.stderr is not None
            reader = threading.Thread(target=lines.extend, args=(proc.stderr,), daemon=True)
            reader.start()
            try:
                _wait_line(lines, "sync: ", proc, 60)  # "sync: imported ..." or "sync: up to date ..."
                time.sleep(0.5)  # into the idle wait
                t0 = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(timeout=60)
                times.append(time.perf_counter() - t0)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            reader.join(5)
            if rc != 0 or "snapshotter run: stopped" not in "".join(lines):
                raise SystemExit(f"bench: snapshotter run did not stop cleanly ({rc}):\n{''.join(lines)[-2000:]}")
        return times
    finally:
        mirror.server.shutdown()
        mirror.server.server_close()
        testlib.stop_agents()


def bench_build_stop(root: Path, work: Path, repeat: int) -> dict[str, list[float]]:
    """`snapshotter build` of app-misc/trouble-1 (sleeps in src_compile) in the stand-in stage: once emerge
    is in src_compile, the signal; timed until the process is gone (root and partial output removed)."""
    stage_file = stage.ensure_stage()
    repo = root / "gentoo.git"
    ebuild_repo.git_repo_with_tags(repo, [("2026-01-01", ebuild_repo.tree_files(trouble="1"))])
    out = root / "out"
    cfg = root / "build.toml"
    cfg.write_text(f'repo = "{repo}"\nstate_dir = "{root / "state"}"\n[build]\nwork_dir = "{work}"\n'
                   f'output = "{out}"\ncache_dir = "{root / "build-cache"}"\n[profiles.trouble]\n'
                   f'stage = "{stage_file}"\nportage_profile = "default"\nworld = ["app-misc/trouble"]\n')
    times: dict[str, list[float]] = {"build_sigterm": [], "build_sigint": []}
    for key, sig, status in (("build_sigterm", signal.SIGTERM, 143), ("build_sigint", signal.SIGINT, 130)):
        for _ in range(repeat):
            proc = subprocess.Popen([SNAPSHOTTER, "--config", str(cfg), "build", "--profile", "trouble",
                                     "--tag", "2026-01-01"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            try:
                deadline = time.monotonic() + 300
                while True:
                    logs = list((out / "trouble").glob(".2026-01-01.partial-*/build.log"))
                    if logs and ebuild_repo.SLOW_MARKER in logs[0].read_text(errors="replace"):
                        break
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("bench: the build ended (or took 300 s) before the slow ebuild started")
                    time.sleep(0.2)
                t0 = time.perf_counter()
                proc.send_signal(sig)
                _, stderr = proc.communicate(timeout=300)
                times[key].append(time.perf_counter() - t0)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            left = [p.name for p in (work / "trouble").iterdir()] + [p.name for p in (out / "trouble").glob(".*")]
            if proc.returncode != status or left:
                raise SystemExit(f"bench: the build exited {proc.returncode} (expected {status}), left {left}:\n"
                                 f"{stderr[-2000:]}")
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="runs of each push and of the run stop (default 5)")
    ap.add_argument("--build-repeat", type=int, default=1, help="builds stopped per signal (default 1)")
    ap.add_argument("--no-build", action="store_true", help="skip the build stops (they need root and Portage)")
    ap.add_argument("--work", type=Path, help="keep everything here (default: a temporary directory, removed)")
    ap.add_argument("--build-work", type=Path, help="where build roots go (default: on /dev/shm if writable)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not args.no_build and os.geteuid() != 0:
        log("bench: error: the build stops need root (or pass --no-build)")
        return 2

    root = Path(args.work or tempfile.mkdtemp(prefix="bench-service-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    build_work = args.build_work or (Path(tempfile.mkdtemp(prefix="bench-service-work-", dir=shm))
                                     if os.access(shm, os.W_OK) else root / "work")
    load_before = os.getloadavg()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    runs: dict[str, list[float]] = {}
    try:
        log(f"pushes with the hook, {args.repeat} of each ...")
        runs.update(bench_pushes(root / "push", args.repeat))
        log(f"snapshotter run stopped while idle, {args.repeat} times ...")
        runs["run_sigterm_idle"] = bench_run_stop(root / "run", args.repeat)
        if not args.no_build:
            log(f"snapshotter build stopped mid-emerge, {args.build_repeat} per signal (root on "
                f"{bench_import.fs_type(build_work.parent)}) ...")
            runs.update(bench_build_stop(root / "build", build_work, args.build_repeat))
    finally:
        for d in (build_work, root):
            if d.exists() and (d == build_work or args.work is None):
                if mounts_under(d):
                    log(f"bench: warning: {d} has mounts under it; not removed")
                else:
                    safe_rmtree(d)

    ok = {k: max(v) <= TARGETS[k] for k, v in runs.items()}
    m = bench_import.machine()
    lines = [f"Service benchmark, {started}; {m['cores']} cores {m['cpu']}; load average before "
             f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}", "",
             f"{'step':52} {'runs':>4} {'best':>7} {'median':>7} {'worst':>7} {'target':>7}"]
    for k, v in runs.items():
        lines.append(f"{LABELS[k]:52} {len(v):4} {min(v):7.3f} {statistics.median(v):7.3f} {max(v):7.3f} "
                     f"{'<= ' + format(TARGETS[k], 'g'):>7}  {'PASS' if ok[k] else 'FAIL'}")
    lines.append("(seconds; a target is met when the worst run is within it)")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"started": started, "machine": m, "runs": runs, "targets": TARGETS,
                                         "ok": ok, "load_before": load_before}, indent=1) + "\n")
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
