"""`snapshotter run`: the daily cycle and the loop that schedules it.

One cycle, step by step (one log line per action):
  1. sync: fetch, verify and import new snapshots, push them (and earlier pending pushes); then queue
     the builds of every new tag (part of the same step, so a stop never loses them);
  2. publish, when `service.publish` is on (all tags not yet published, and gentoo-latest).

The loop (`Service.run_forever`) runs a cycle at start (catching up whatever was missed), then every
day at `service.sync_time` UTC (with the `schedule` library). When the day's snapshot is not on the
mirrors yet, or the sync failed, it tries again after `retry_interval` seconds, doubling the wait each
time, until `retry_deadline` seconds after that day's `sync_time`. SIGTERM/SIGINT set a flag: the current
step finishes, the rest of the cycle is skipped, and the loop exits 0. Two syncs never run at once: the
sync holds the repository's flock (another holder makes the step fail with "locked" and be retried).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

import schedule

from snapshotter.errors import (
    EXIT_ERROR,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_PUSH_FAILED,
    LockedError,
    SnapshotterError,
)
from snapshotter.git.repository import Repository, Tag
from snapshotter.sync.run import Progress, SyncReport, newest_possible_day, now_from_env, run_sync

if TYPE_CHECKING:
    from snapshotter.config import Config

log = logging.getLogger(__name__)


@dataclass
class SyncOutcome:
    """What `sync_and_queue` did; `exit_status` is what `snapshotter sync` exits with.

    `error` is the SnapshotterError that stopped the sync (`report` is then empty, but the days imported
    before it are kept, are in `new_tags` and had their builds queued); `queue_error` is the one that
    stopped the queueing of builds.
    """

    report: SyncReport = field(default_factory=SyncReport)
    new_tags: list[str] = field(default_factory=list)  # every date tag that appeared, oldest first
    newest: Tag | None = None  # the newest tag afterwards
    queued: list[int] = field(default_factory=list)  # ids of the builds queued for `queued_tags`
    queued_tags: list[str] = field(default_factory=list)  # new tags, and older ones a failed run left pending
    error: SnapshotterError | None = None
    queue_error: SnapshotterError | None = None

    @property
    def exit_status(self) -> int:
        if self.error is not None:
            return self.error.exit_code
        if self.queue_error is not None:
            return self.queue_error.exit_code
        if self.report.push_failed:
            return EXIT_PUSH_FAILED
        return EXIT_OK


def sync_and_queue(cfg: Config, *, day: date | None = None, push: bool = True, now: datetime | None = None,
                   progress: Progress | None = None) -> SyncOutcome:
    """Sync (import, tag, push; see sync/run.py), then queue the builds of every tag that appeared.

    The policy of `snapshotter sync` and of each cycle of `snapshotter run`: a new tag queues the builds a
    push of it would (triggers.queue_builds_for_tags), also when the sync failed after importing some
    days. Which tags still need their builds queued is kept in the repository's state (run_sync's
    `queue`, under the repository lock), so a queue that fails after the refs moved loses nothing: the
    next sync or cycle queues them. Never raises SnapshotterError: the outcome carries it.
    """
    from snapshotter.service.triggers import queue_builds_for_tags

    repo = Repository(cfg.repo, cfg.git.branch)
    before = {t.name for t in repo.tags()}
    outcome = SyncOutcome()

    def queue(tags: list[str]) -> list[int]:
        try:
            ids = queue_builds_for_tags(cfg, tags)
        except Exception as e:
            why = str(e) if isinstance(e, SnapshotterError) else f"internal error: {type(e).__name__}: {e}"
            outcome.queue_error = SnapshotterError(f"queueing the builds of {', '.join(tags)} failed: {why} "
                                                   "(they stay pending: the next sync queues them)")
            raise
        outcome.queued, outcome.queued_tags = ids, tags
        return ids

    try:
        outcome.report = run_sync(cfg, day=day, push=push, now=now, progress=progress, queue=queue)
    except SnapshotterError as e:
        outcome.error = e
    tags = repo.tags()
    outcome.new_tags = [t.name for t in tags if t.name not in before]
    outcome.newest = tags[-1] if tags else None
    return outcome


@dataclass
class CycleResult:
    imported: list[str] = field(default_factory=list)  # new tags
    newest: str | None = None
    missing: bool = False  # the newest snapshot that should exist by now is not imported
    error: str | None = None  # the sync failed
    locked: bool = False  # another sync held the repository lock
    push_failed: list[str] = field(default_factory=list)
    published: bool = False
    publish_error: str | None = None
    queued: list[int] = field(default_factory=list)
    stopped: bool = False  # a stop request skipped the remaining steps

    @property
    def needs_retry(self) -> bool:
        return self.missing or self.error is not None or bool(self.push_failed)

    @property
    def exit_status(self) -> int:
        if self.locked and self.publish_error is None:
            return EXIT_LOCKED
        if self.error is not None or self.publish_error is not None:
            return EXIT_ERROR
        if self.push_failed:
            return EXIT_PUSH_FAILED
        return EXIT_OK


def now_utc() -> datetime:
    """The current time (SNAPSHOTTER_NOW=<unix time> fixes it, as for sync)."""
    return now_from_env()


def window_start(sync_time: str, now: datetime) -> datetime:
    """The latest daily `sync_time` (HH:MM UTC) at or before `now`."""
    hh, mm = (int(x) for x in sync_time.split(":"))
    start = now.astimezone(UTC).replace(hour=hh, minute=mm, second=0, microsecond=0)
    return start if start <= now else start - timedelta(days=1)


def retry_delay(cfg: Config, attempt: int, now: datetime) -> float | None:
    """Seconds until retry number `attempt` (1, 2, ...), or None when the day's deadline has passed."""
    deadline = window_start(cfg.service.sync_time, now) + timedelta(seconds=cfg.service.retry_deadline)
    left = (deadline - now).total_seconds()
    if left <= 0:
        return None
    return float(min(cfg.service.retry_interval * 2 ** (attempt - 1), left))


def step_sync(cfg: Config, result: CycleResult) -> None:
    """Sync (with push), then queue builds for every tag that appeared (even if the sync failed later)."""
    now = now_utc()
    outcome = sync_and_queue(cfg, push=True, now=now)
    result.push_failed = [remote for remote, _ in outcome.report.push_failed]
    for remote, reason in outcome.report.push_failed:
        log.error("push to %s failed: %s (import kept; retried later)", remote, reason)
    for remote in outcome.report.pushed:
        log.info("pushed to %s", remote)
    if isinstance(outcome.error, LockedError):
        result.error, result.locked = str(outcome.error), True
        log.warning("sync skipped: %s", outcome.error)
    elif outcome.error is not None:
        result.error = str(outcome.error)
        log.error("sync failed: %s", outcome.error)
    result.imported = outcome.new_tags
    newest = outcome.newest
    result.newest = newest.name if newest else None
    expected = newest_possible_day(now)
    result.missing = newest is None or newest.day < expected
    if result.imported:
        log.info("sync: imported %s", ", ".join(result.imported))
    elif result.error is None:
        log.info("sync: up to date (newest tag %s)%s", result.newest or "none",
                 f"; the snapshot of {expected:%Y-%m-%d} is not on the mirrors yet" if result.missing else "")
    if outcome.queue_error is not None:
        log.error("%s", outcome.queue_error)
        result.error = result.error or str(outcome.queue_error)
    elif outcome.queued_tags:
        result.queued = outcome.queued
        log.info("queued %d build(s) for %s", len(result.queued), ", ".join(outcome.queued_tags))


def step_publish(cfg: Config, result: CycleResult) -> None:
    from snapshotter.publish.snapshots import run_publish

    try:
        report = run_publish(cfg, all_tags=True)  # every tag not yet published (within publish.keep)
        result.published = True
        done = [p.tag for p in report.published]
        log.info("publish: %s (latest %s)%s", f"published {', '.join(done)}" if done else "nothing new",
                 report.latest, f"; pruned {', '.join(report.pruned)}" if report.pruned else "")
    except SnapshotterError as e:
        result.publish_error = str(e)
        log.error("publish failed: %s", e)


def run_cycle(cfg: Config, stop: threading.Event | None = None) -> CycleResult:
    """One cycle (see the module doc). Never raises SnapshotterError: the result says what failed."""
    result = CycleResult()
    stop = stop or threading.Event()
    try:
        step_sync(cfg, result)
    except Exception as e:  # a bug must not end the loop: recorded (run_sync puts it in the state), retried
        result.error = f"internal error: {type(e).__name__}: {e}"
        log.error("sync failed: %s", result.error)
        log.debug("the internal error", exc_info=True)
    if cfg.service.publish and result.newest is not None:
        if stop.is_set():
            result.stopped = True
            log.info("stop requested: skipping publish")
            return result
        try:
            step_publish(cfg, result)
        except Exception as e:
            result.publish_error = f"internal error: {type(e).__name__}: {e}"
            log.error("publish failed: %s", result.publish_error)
            log.debug("the internal error", exc_info=True)
    return result


class Service:
    """The loop behind `snapshotter run`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.scheduler = schedule.Scheduler()
        self.attempt = 0
        self._retry_job: schedule.Job | None = None

    def stop(self) -> None:
        self.stop_event.set()

    def cycle(self) -> CycleResult:
        result = run_cycle(self.cfg, self.stop_event)
        if result.needs_retry and not self.stop_event.is_set():
            self._schedule_retry()
        else:
            self.attempt = 0
        return result

    def _daily(self) -> None:
        self.attempt = 0
        self._cancel_retry()
        self.cycle()

    def _retry(self) -> type[schedule.CancelJob]:
        self._retry_job = None
        self.cycle()
        return schedule.CancelJob

    def _cancel_retry(self) -> None:
        if self._retry_job is not None:
            self.scheduler.cancel_job(self._retry_job)
            self._retry_job = None

    def _schedule_retry(self) -> None:
        self.attempt += 1
        delay = retry_delay(self.cfg, self.attempt, now_utc())
        if delay is None:
            log.warning("giving up for today (past the retry deadline); next sync at %s UTC",
                        self.cfg.service.sync_time)
            self.attempt = 0
            return
        self._cancel_retry()
        self._retry_job = self.scheduler.every(max(1, int(delay))).seconds.do(self._retry)
        log.info("retry %d in %d s", self.attempt, int(delay))

    def run_forever(self) -> int:
        # schedule works in local time: the service runs in UTC, as sync_time is given in UTC.
        os.environ["TZ"] = "UTC"
        time.tzset()
        self.scheduler.every().day.at(self.cfg.service.sync_time).do(self._daily)
        log.info("snapshotter run: daily sync at %s UTC; starting with a catch-up cycle", self.cfg.service.sync_time)
        self.cycle()
        while not self.stop_event.is_set():
            self.scheduler.run_pending()
            idle = self.scheduler.idle_seconds
            wait = 60.0 if idle is None else min(max(idle, 0.0), 60.0)
            if wait > 0:
                self.stop_event.wait(wait)
        log.info("snapshotter run: stopped")
        return EXIT_OK
