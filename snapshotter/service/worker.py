"""Build workers: take jobs from the queue one at a time and run the chroot build for each.

Each build runs in a child process inside its own PID namespace
(`unshare --pid --fork --kill-child`), started with PR_SET_PDEATHSIG: when the worker dies, even by
kill -9, the kernel kills the whole build process tree, so a job whose lease expires and is taken by
another worker is never built twice at the same time. While the build runs, a thread renews the
lease; if the lease is lost (or cannot be renewed before it runs out) the build is killed and its
result discarded. On SIGTERM/SIGINT the worker kills the current build and gives its job back to
the queue at once.

The lease is what the worker can prove by its own monotonic clock: the start of its last successful
claim or renewal plus the lease length (the queue set the lease end from its own clock after that
moment). When the queue cannot be reached (QueueUnavailable: a database restarting, a network gone) the
build goes on and the worker retries with backoff; only when the lease can no longer be proven
(KILL_MARGIN before it ends) does it kill the build and give the job up, so the job is never built by
two workers at once. A finished build whose result cannot be recorded yet is retried the same way
while the lease still holds (the heartbeat goes on meanwhile), so a restart of the queue's database
neither loses a job nor runs one twice.

The child (`python -m snapshotter.service.worker --build-child SPEC RESULT`) runs the build
(service.build.run_build) and writes a small JSON result file. SPEC is a `BuildChildSpec`, RESULT a
`BuildChildResult`; their to_json/from_json are the only writer and reader of each.

Test seam (tests only, never set in production): with $SNAPSHOTTER_TEST_BUILD_COMMAND set, the child
runs that shell command instead of the chroot build (with $SNAPSHOTTER_JOB, $SNAPSHOTTER_PROFILE and
$SNAPSHOTTER_TAG set; exit status 0 is a successful build), so the queue's multi-host tests and its
benchmark run many cheap builds through the real worker.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from chroot.procs import die_with_parent
from snapshotter import config as configmod
from snapshotter.errors import EXIT_BUILD_FAILED, EXIT_LOCKED, SnapshotterError
from snapshotter.fsutil import atomic_write, open_dir
from snapshotter.logs import setup_logging
from snapshotter.service.build import BuildRequest, run_build
from snapshotter.service.jobqueue import (
    BuildQueue,
    JobRecord,
    JobState,
    LeaseLost,
    QueueError,
    QueueUnavailable,
    open_queue,
)

if TYPE_CHECKING:
    from snapshotter.config import Config

log = logging.getLogger(__name__)

STOP_GRACE = 30.0  # seconds a stopping build gets to clean up before it is killed
MAX_BACKOFF = 60.0  # longest wait between tries to reach an unreachable queue
TEST_BUILD_COMMAND_ENV = "SNAPSHOTTER_TEST_BUILD_COMMAND"  # tests only: see the module's docstring


class Lease:
    """A worker's lease on its job as the worker can prove it, by its own monotonic clock."""

    def __init__(self, seconds: float, start: float) -> None:
        self.seconds = seconds
        self.expires = start + seconds  # `start`: taken just before the call that set the lease
        self.margin = min(5.0, seconds / 10)  # the build is killed this long before the lease ends
        self.lost = threading.Event()  # taken by another worker, or no longer provable

    def renewed(self, start: float) -> None:
        self.expires = max(self.expires, start + self.seconds)

    def left(self) -> float:
        """Seconds until the build must be dead (the lease's end minus the margin)."""
        return self.expires - self.margin - time.monotonic()

    def provable(self) -> bool:
        return not self.lost.is_set() and self.left() > 0


@dataclass
class Outcome:
    ok: bool
    log_path: str | None
    detail: str
    locked: bool = False  # the build could not start: another build holds the profile's lock


@dataclass(frozen=True)
class BuildChildSpec:
    """What the worker hands its build child (the SPEC argument): one job of the queue."""

    config: Path | None  # the configuration file the worker was started with (None: the default)
    profile: str
    tag: str
    overlays: dict[str, str]  # overlay name -> commit
    job: int  # the job's id (shows in `ps`)

    def to_json(self) -> str:
        return json.dumps({"config": str(self.config) if self.config else None, "profile": self.profile,
                           "tag": self.tag, "overlays": self.overlays, "job": self.job})

    @classmethod
    def from_json(cls, text: str) -> BuildChildSpec:
        """The spec `to_json` wrote; ValueError if `text` is not one."""
        data = json.loads(text)
        try:
            config, profile, tag, overlays, job = (data[k] for k in ("config", "profile", "tag", "overlays", "job"))
        except (TypeError, KeyError) as e:
            raise ValueError(f"not a build child spec: {e!r}") from None
        if not (isinstance(config, str | None) and isinstance(profile, str) and isinstance(tag, str)
                and isinstance(overlays, dict) and all(isinstance(v, str) for v in [*overlays, *overlays.values()])
                and isinstance(job, int)):
            raise ValueError(f"not a build child spec: {text}")
        return cls(Path(config) if config else None, profile, tag, overlays, job)


@dataclass(frozen=True)
class BuildChildResult:
    """What the build child reports back (the RESULT file)."""

    ok: bool
    detail: str  # "ok", or why the build failed or could not start
    log: str | None = None  # the build's log (None: the build did not start; the child's output is the log)
    output: str | None = None  # the build's output directory

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "detail": self.detail, "log": self.log, "output": self.output})

    @classmethod
    def from_json(cls, text: str) -> BuildChildResult:
        """The result `to_json` wrote; ValueError if `text` is not one."""
        data = json.loads(text)
        try:
            ok, detail, log_path, output = (data[k] for k in ("ok", "detail", "log", "output"))
        except (TypeError, KeyError) as e:
            raise ValueError(f"not a build child result: {e!r}") from None
        if not (isinstance(ok, bool) and isinstance(detail, str) and isinstance(log_path, str | None)
                and isinstance(output, str | None)):
            raise ValueError(f"not a build child result: {text}")
        return cls(ok, detail, log_path, output)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """Takes jobs one at a time; several workers (processes or hosts) may share one queue."""

    def __init__(self, cfg: Config, config_path: Path | None, queue: BuildQueue | None = None, *,
                 lease_seconds: float | None = None, poll_interval: float | None = None,
                 ident: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.queue = queue or open_queue(cfg)
        self.lease = float(lease_seconds or cfg.service.lease_seconds)
        self.poll = float(poll_interval or cfg.service.poll_interval)
        self.ident = ident or worker_id()
        self.stopping = threading.Event()
        self.log_dir = Path(cfg.state_dir) / "worker-logs"
        self._child: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        """Ask the worker to stop: the current build is stopped and its job handed back.

        The build gets SIGTERM first (the builder then removes its root and exits); if it has not
        exited after STOP_GRACE seconds it is killed with its whole process tree.
        """
        if self.stopping.is_set():
            return
        self.stopping.set()
        child = self._child
        if child is None or child.poll() is not None:
            return
        try:  # the build process: unshare's only child, PID 1 of the build's namespace
            kids = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()
            for pid in kids:
                os.kill(int(pid), signal.SIGTERM)
        except (OSError, ValueError):
            kids = []
        if not kids:
            child.kill()
            return
        def kill_if_running() -> None:
            if child.poll() is None:
                child.kill()

        timer = threading.Timer(STOP_GRACE, kill_if_running)
        timer.daemon = True
        timer.start()

    # -- one job -------------------------------------------------------------------------------
    def run_one(self, skip: Collection[int] = ()) -> JobRecord | None:
        """Claim one job (not in `skip`) and build it; returns its final record, or None when the queue
        had none. QueueUnavailable from the claim itself is raised (nothing was started)."""
        t0 = time.monotonic()
        rec = self.queue.claim(self.ident, self.lease, skip)
        if rec is None:
            return None
        lease = Lease(self.lease, t0)
        self._beat(rec.id, self.lease)
        log.info("job %d: building %s (attempt %d, worker %s)", rec.id, rec.job.describe(), rec.attempts,
                 self.ident)
        done = threading.Event()
        beat = threading.Thread(target=self._keep_lease, args=(rec.id, lease, done), daemon=True)
        started = time.monotonic()
        try:
            beat.start()
            outcome = self._build(rec, lease)
            return self._record(rec, outcome, lease, started)
        finally:
            done.set()
            beat.join()

    def _record(self, rec: JobRecord, outcome: Outcome, lease: Lease, started: float) -> JobRecord:
        """Record the build's outcome while the lease holds (the heartbeat goes on meanwhile)."""
        if lease.lost.is_set():
            log.error("job %d: lease lost; result discarded (the job is another worker's now)", rec.id)
            return self._final(rec, JobState.RUNNING)
        if (self.stopping.is_set() or outcome.locked) and not outcome.ok:
            try:
                self.queue.release(rec.id, self.ident)
                log.info("job %d: %s; handed back to the queue", rec.id,
                         outcome.detail if outcome.locked else "stopped")
                return self._final(rec, JobState.QUEUED)
            except LeaseLost:
                return self._final(rec, JobState.RUNNING)
            except QueueError as e:
                log.warning("job %d: cannot hand it back (%s); it returns to the queue when its lease runs out",
                            rec.id, e)
                return replace(rec, state=JobState.RUNNING)
        state = JobState.DONE if outcome.ok else JobState.FAILED
        wait = 0.5
        while True:
            try:
                self.queue.complete(rec.id, self.ident, outcome.ok, outcome.log_path, outcome.detail)
                break
            except LeaseLost as e:
                log.error("job %d: %s; result discarded", rec.id, e)
                return self._final(rec, JobState.RUNNING)
            except QueueUnavailable as e:
                if not lease.provable():
                    log.error("job %d: built, but the queue stayed unreachable until the lease could no longer "
                              "be proven; result discarded (the job will be built again): %s", rec.id, e)
                    return replace(rec, state=JobState.RUNNING)
                pause = min(wait, max(0.05, lease.left() / 2))
                log.warning("job %d: cannot record the result yet (%s); retry in %.1f s", rec.id, e, pause)
                time.sleep(pause)
                wait = min(wait * 2, MAX_BACKOFF)
        log.info("job %d: %s in %.1f s: %s (log %s)", rec.id, "done" if outcome.ok else "FAILED",
                 time.monotonic() - started, outcome.detail, outcome.log_path)
        self._beat(None, self._idle_ttl())
        return self._final(rec, state)

    def _final(self, rec: JobRecord, state: JobState) -> JobRecord:
        """The job as the queue has it now; as far as this worker knows if the queue cannot tell."""
        try:
            return self.queue.get(rec.id)
        except QueueError:
            return replace(rec, state=state)

    def _idle_ttl(self) -> float:
        return max(3 * self.poll, 30.0)

    def _beat(self, job_id: int | None, ttl: float) -> None:
        """Report this worker in the queue's worker list (best effort: the list is informational)."""
        try:
            self.queue.beat(self.ident, job_id, ttl)
        except QueueError as e:
            log.debug("worker %s: cannot report in: %s", self.ident, e)

    def _keep_lease(self, job_id: int, lease: Lease, done: threading.Event) -> None:
        """Renew the lease every lease/4 until `done`; on an unreachable queue retry with backoff."""
        interval = max(0.2, self.lease / 4)
        wait = min(1.0, interval)
        failures = 0
        next_at = time.monotonic() + interval
        while not done.wait(max(0.0, next_at - time.monotonic())):
            t0 = time.monotonic()
            try:
                self.queue.heartbeat(job_id, self.ident, self.lease)
            except LeaseLost as e:
                log.error("%s", e)
                lease.lost.set()
                return
            except QueueError as e:
                failures += 1
                if not lease.provable():
                    return  # the build is being killed (see _wait_for_child)
                pause = min(wait, interval, max(0.05, lease.left() / 2))
                log.warning("job %d: cannot renew the lease (%.1f s of it left): %s; retry in %.1f s",
                            job_id, lease.left(), e, pause)
                wait = min(wait * 2, interval)
                next_at = time.monotonic() + pause
                continue
            lease.renewed(t0)
            if failures:
                log.info("job %d: lease renewed after %d failed tries", job_id, failures)
            failures, wait = 0, min(1.0, interval)
            next_at = t0 + interval
            self._beat(job_id, self.lease)

    def _wait_for_child(self, child: subprocess.Popen[bytes], lease: Lease | None) -> int:
        """Wait for the build; kill it when the lease is lost or can no longer be proven."""
        while True:
            try:
                return child.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
            if lease is not None and not lease.provable() and child.poll() is None:
                if not lease.lost.is_set():
                    log.error("lease could not be renewed before it ran out; killing the build")
                    lease.lost.set()
                child.kill()

    def _build(self, rec: JobRecord, lease: Lease | None = None) -> Outcome:
        capture = self.log_dir / f"job-{rec.id}-{rec.attempts}.log"
        result_path = self.log_dir / f"job-{rec.id}-{rec.attempts}.result.json"
        # worker-logs/ is in the state directory, which others may be able to write: the directory is
        # opened without following a symlink, and the log is a new file made relative to it (O_EXCL|
        # O_NOFOLLOW: a symlink or file planted at its name is removed, never written through).
        try:
            self.log_dir.parent.mkdir(parents=True, exist_ok=True)
            dfd = open_dir(self.log_dir, create=True)
        except (SnapshotterError, OSError) as e:
            return Outcome(False, str(capture), f"cannot use the job log directory: {e}")
        try:
            for name in (capture.name, result_path.name):
                try:
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    pass
            out_fd = os.open(capture.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644, dir_fd=dfd)
        except OSError as e:
            os.close(dfd)
            return Outcome(False, str(capture), f"cannot create the job log {capture}: {e.strerror}")
        try:
            return self._run_child(rec, lease, capture, result_path, out_fd, dfd)
        finally:
            os.close(dfd)

    def _run_child(self, rec: JobRecord, lease: Lease | None, capture: Path, result_path: Path, out_fd: int,
                   dfd: int) -> Outcome:
        spec = BuildChildSpec(self.config_path, rec.job.profile, rec.job.tag, dict(rec.job.overlays), rec.id)
        cmd = ["unshare", "--pid", "--fork", "--kill-child", "--",
               sys.executable, "-m", "snapshotter.service.worker", "--build-child", spec.to_json(), str(result_path)]
        with os.fdopen(out_fd, "wb") as out:
            try:
                self._child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                               preexec_fn=die_with_parent())
            except OSError as e:
                return Outcome(False, str(capture), f"cannot start the build: {e.strerror}: {cmd[0]}")
            try:
                status = self._wait_for_child(self._child, lease)
            finally:
                self._child = None
        try:
            with open(os.open(result_path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)) as f:
                result: BuildChildResult | None = BuildChildResult.from_json(f.read())
        except (OSError, ValueError):
            result = None  # the child died before writing it
        given = result.detail if result is not None else ""
        log_path = (result.log if result is not None else None) or str(capture)
        if status == 0 and result is not None and result.ok:
            return Outcome(True, log_path, given or "ok")
        if status == EXIT_LOCKED:
            return Outcome(False, log_path, given or "locked", locked=True)
        if status < 0:
            detail = f"build killed by signal {-status}"
        elif status == 137 and result is None:
            detail = "build killed"
        else:
            detail = given or f"build exited with status {status}"
        return Outcome(False, log_path, detail)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, once: bool = False) -> int:
        """Work until stopped (or, with `once`, take at most one job). Exit status: 0, or 4 if the
        `once` job failed."""
        log.info("worker %s: watching the build queue (lease %.0f s)", self.ident, self.lease)
        try:
            status = self._loop(once)
        finally:
            try:
                self.queue.forget(self.ident)
            except QueueError as e:
                log.debug("worker %s: cannot sign off: %s", self.ident, e)
        if not once:
            log.info("worker %s: stopped", self.ident)
        return status

    def _loop(self, once: bool) -> int:
        waiting: set[int] = set()  # jobs handed back because their profile is being built elsewhere
        wait = 1.0
        while not self.stopping.is_set():
            self._beat(None, self._idle_ttl())
            try:
                rec = self.run_one(waiting)
            except QueueUnavailable as e:
                if once:
                    raise
                log.warning("worker %s: %s; retry in %.0f s", self.ident, e, wait)
                self.stopping.wait(wait)
                wait = min(wait * 2, MAX_BACKOFF)
                continue
            wait = 1.0
            if once:
                if rec is None:
                    log.info("no job in the queue")
                return EXIT_BUILD_FAILED if rec is not None and rec.state == JobState.FAILED else 0
            if rec is None:
                waiting.clear()
                self.stopping.wait(self.poll)
            elif rec.state == JobState.QUEUED:
                waiting.add(rec.id)  # try the other jobs first
        return 0


def _test_build(spec: BuildChildSpec, command: str) -> BuildChildResult:
    """Tests only ($SNAPSHOTTER_TEST_BUILD_COMMAND): run `command` with sh instead of a chroot build."""
    env = dict(os.environ, SNAPSHOTTER_JOB=str(spec.job), SNAPSHOTTER_PROFILE=spec.profile, SNAPSHOTTER_TAG=spec.tag)
    proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, env=env)
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.kill())  # a stopping worker: as a build would
    status = proc.wait()
    return BuildChildResult(ok=status == 0, detail="ok" if status == 0 else f"test build command exited {status}")


def _build_child(spec_json: str, result_path: str) -> int:
    """In the build's PID namespace: run the real build, write the result file."""
    setup_logging(0, False)
    try:
        spec = BuildChildSpec.from_json(spec_json)
        test_command = os.environ.get(TEST_BUILD_COMMAND_ENV)
        if test_command:
            result = _test_build(spec, test_command)
            atomic_write(Path(result_path), result.to_json().encode(), durable=False, nofollow_dir=True)
            return 0 if result.ok else EXIT_BUILD_FAILED
        cfg = configmod.load(spec.config)
        res = run_build(cfg, BuildRequest(profile=spec.profile, tag=spec.tag, overlay_refs=dict(spec.overlays)))
        result = BuildChildResult(ok=res.ok, detail="ok" if res.ok else f"build failed (exit {res.exit_status})",
                                  log=str(res.log), output=str(res.output_dir))
        status = 0 if res.ok else EXIT_BUILD_FAILED
    except SnapshotterError as e:
        result = BuildChildResult(ok=False, detail=str(e))
        log.error("snapshotter: error: %s", e)
        status = e.exit_code
    except Exception as e:  # a bug: keep the traceback in the job's log
        log.exception("build crashed")
        result = BuildChildResult(ok=False, detail=f"internal error: {type(e).__name__}: {e}")
        status = 1
    atomic_write(Path(result_path), result.to_json().encode(), durable=False, nofollow_dir=True)
    return status


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--build-child":
        sys.exit(_build_child(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m snapshotter.service.worker --build-child SPEC RESULT (internal)")
