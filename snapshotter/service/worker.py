"""Build workers: take jobs from the queue one at a time and run the chroot build for each.

Each build runs in a child process inside its own PID namespace
(`unshare --pid --fork --kill-child`), started with PR_SET_PDEATHSIG: when the worker dies, even by
kill -9, the kernel kills the whole build process tree, so a job whose lease expires and is taken by
another worker is never built twice at the same time. While the build runs, a thread renews the
lease; if the lease is lost (or cannot be renewed before it runs out) the build is killed and its
result discarded. On SIGTERM/SIGINT the worker kills the current build and gives its job back to
the queue at once.

The child (`python -m snapshotter.service.worker --build-child SPEC RESULT`) runs the build
(service.build.run_build) and writes a small JSON result file. SPEC is a `BuildChildSpec`, RESULT a
`BuildChildResult`; their to_json/from_json are the only writer and reader of each.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chroot.procs import die_with_parent
from snapshotter import config as configmod
from snapshotter.errors import EXIT_BUILD_FAILED, EXIT_LOCKED, SnapshotterError
from snapshotter.fsutil import atomic_write
from snapshotter.logs import setup_logging
from snapshotter.service.build import BuildRequest, run_build
from snapshotter.service.jobqueue import BuildQueue, JobRecord, JobState, LeaseLost, QueueError, open_queue

if TYPE_CHECKING:
    from snapshotter.config import Config

log = logging.getLogger(__name__)

STOP_GRACE = 30.0  # seconds a stopping build gets to clean up before it is killed


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
        had none."""
        rec = self.queue.claim(self.ident, self.lease, skip)
        if rec is None:
            return None
        log.info("job %d: building %s (attempt %d, worker %s)", rec.id, rec.job.describe(), rec.attempts,
                 self.ident)
        lost = threading.Event()
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(rec.id, lost, done), daemon=True)
        started = time.monotonic()
        try:
            beat.start()
            outcome = self._build(rec)
        finally:
            done.set()
            beat.join()
        if lost.is_set():
            log.error("job %d: lease lost; result discarded (another worker has the job)", rec.id)
            return self.queue.get(rec.id)
        if (self.stopping.is_set() or outcome.locked) and not outcome.ok:
            try:
                self.queue.release(rec.id, self.ident)
                log.info("job %d: %s; handed back to the queue", rec.id,
                         outcome.detail if outcome.locked else "stopped")
            except LeaseLost:
                pass
            return self.queue.get(rec.id)
        try:
            self.queue.complete(rec.id, self.ident, outcome.ok, outcome.log_path, outcome.detail)
        except LeaseLost as e:
            log.error("job %d: %s; result discarded", rec.id, e)
        log.info("job %d: %s in %.1f s: %s (log %s)", rec.id, "done" if outcome.ok else "FAILED",
                 time.monotonic() - started, outcome.detail, outcome.log_path)
        return self.queue.get(rec.id)

    def _heartbeat(self, job_id: int, lost: threading.Event, done: threading.Event) -> None:
        interval = max(0.2, self.lease / 4)
        expires = time.monotonic() + self.lease
        while not done.wait(interval):
            try:
                self.queue.heartbeat(job_id, self.ident, self.lease)
                expires = time.monotonic() + self.lease
                continue
            except LeaseLost as e:
                log.error("%s", e)
            except QueueError as e:
                if time.monotonic() + interval < expires:
                    log.warning("job %d: cannot renew the lease yet: %s", job_id, e)
                    continue
                log.error("job %d: lease ran out without renewal: %s", job_id, e)
            lost.set()
            child = self._child
            if child is not None and child.poll() is None:
                child.kill()
            return

    def _build(self, rec: JobRecord) -> Outcome:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        capture = self.log_dir / f"job-{rec.id}-{rec.attempts}.log"
        result_path = self.log_dir / f"job-{rec.id}-{rec.attempts}.result.json"
        result_path.unlink(missing_ok=True)
        spec = BuildChildSpec(self.config_path, rec.job.profile, rec.job.tag, dict(rec.job.overlays), rec.id)
        cmd = ["unshare", "--pid", "--fork", "--kill-child", "--",
               sys.executable, "-m", "snapshotter.service.worker", "--build-child", spec.to_json(), str(result_path)]
        with open(capture, "wb") as out:
            try:
                self._child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                               preexec_fn=die_with_parent())
            except OSError as e:
                return Outcome(False, str(capture), f"cannot start the build: {e.strerror}: {cmd[0]}")
            try:
                status = self._child.wait()
            finally:
                self._child = None
        try:
            result: BuildChildResult | None = BuildChildResult.from_json(result_path.read_text())
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
        waiting: set[int] = set()  # jobs handed back because their profile is being built elsewhere
        while not self.stopping.is_set():
            rec = self.run_one(waiting)
            if once:
                if rec is None:
                    log.info("no job in the queue")
                return EXIT_BUILD_FAILED if rec is not None and rec.state == JobState.FAILED else 0
            if rec is None:
                waiting.clear()
                self.stopping.wait(self.poll)
            elif rec.state == JobState.QUEUED:
                waiting.add(rec.id)  # try the other jobs first
        log.info("worker %s: stopped", self.ident)
        return 0


def _build_child(spec_json: str, result_path: str) -> int:
    """In the build's PID namespace: run the real build, write the result file."""
    setup_logging(0, False)
    try:
        spec = BuildChildSpec.from_json(spec_json)
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
    atomic_write(Path(result_path), result.to_json().encode(), durable=False)
    return status


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--build-child":
        sys.exit(_build_child(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m snapshotter.service.worker --build-child SPEC RESULT (internal)")
