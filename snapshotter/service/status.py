"""`snapshotter status`: what the snapshot repository and the build queue look like, as plain lines."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from snapshotter.binhost.retention import DiskUse, disk_use, human
from snapshotter.git.repository import Repository
from snapshotter.service.jobqueue import JobRecord, JobState, open_queue, queue_exists
from snapshotter.sync import state as syncstate
from snapshotter.sync.run import future_tags, now_from_env, pending_builds

if TYPE_CHECKING:
    from snapshotter.config import Config


@dataclass
class Status:
    repo: str
    newest_tag: str | None
    newest_commit: str | None
    tag_count: int
    last_success: str | None
    last_failure: str | None
    last_failure_reason: str | None
    pending_pushes: list[str]
    counts: dict[JobState, int]
    running: list[JobRecord] = field(default_factory=list)
    queued: list[JobRecord] = field(default_factory=list)
    failed: list[JobRecord] = field(default_factory=list)
    disk: DiskUse | None = None  # build output and web root
    future_tags: list[str] = field(default_factory=list)  # date tags no sync made: they stop the imports
    unqueued: list[str] = field(default_factory=list)  # tags whose builds the next sync still has to queue
    state_problem: str | None = None  # state.json could not be used (the next sync rebuilds it)


def collect(cfg: Config, show: int = 10) -> Status:
    repo = Repository(cfg.repo, cfg.git.branch)
    tags = repo.tags()
    state = syncstate.load(repo) if repo.exists() else syncstate.SyncState()
    pending = syncstate.pending_pushes(cfg.git.push, repo, state) if repo.exists() else []
    now = now_from_env()
    future = future_tags(repo, now)
    unqueued = pending_builds(repo, state, now) if cfg.service.queue_builds else []
    if not queue_exists(cfg):  # a read-only look creates nothing
        return Status(repo=str(cfg.repo), newest_tag=tags[-1].name if tags else None,
                      newest_commit=tags[-1].commit if tags else None, tag_count=len(tags),
                      last_success=state.last_success, last_failure=state.last_failure,
                      last_failure_reason=state.last_failure_reason, pending_pushes=pending,
                      counts=dict.fromkeys(JobState, 0), disk=disk_use(cfg), future_tags=future,
                  unqueued=unqueued, state_problem=state.rebuilt)
    queue = open_queue(cfg)
    return Status(repo=str(cfg.repo), newest_tag=tags[-1].name if tags else None,
                  newest_commit=tags[-1].commit if tags else None, tag_count=len(tags),
                  last_success=state.last_success, last_failure=state.last_failure,
                  last_failure_reason=state.last_failure_reason, pending_pushes=pending, counts=queue.counts(),
                  running=queue.list((JobState.RUNNING,)), queued=queue.list((JobState.QUEUED,), show),
                  failed=queue.list((JobState.FAILED,), show), disk=disk_use(cfg), future_tags=future,
                  unqueued=unqueued, state_problem=state.rebuilt)


def _lease(rec: JobRecord) -> str:
    if rec.lease_until is None:
        return ""
    left = rec.lease_until - datetime.now(UTC).timestamp()
    return f", lease {'expired' if left < 0 else f'{left:.0f} s left'}"


def render(st: Status) -> list[str]:
    lines = [f"repository: {st.repo}"]
    if st.newest_tag:
        lines.append(f"newest tag: {st.newest_tag} {st.newest_commit} ({st.tag_count} tag{'' if st.tag_count == 1 else 's'})")
    else:
        lines.append("newest tag: none (no snapshot imported yet)")
    lines.append(f"last success: {st.last_success or 'never'}")
    if st.last_failure:
        lines.append(f"last failure: {st.last_failure}: {st.last_failure_reason or 'unknown reason'}")
    else:
        lines.append("last failure: never")
    lines.append(f"pending pushes: {', '.join(st.pending_pushes) if st.pending_pushes else 'none'}")
    if st.state_problem:
        lines.append(f"state: state.json is unreadable ({st.state_problem}); the next sync rebuilds it from the "
                     "repository")
    if st.future_tags:
        lines.append(f"future tags: {', '.join(st.future_tags)}: not made by a sync; no snapshot after them is "
                     "imported until they are deleted (git tag -d)")
    if st.unqueued:
        lines.append(f"builds not yet queued for: {', '.join(st.unqueued)} (the next sync queues them)")
    lines.append("builds: " + ", ".join(f"{st.counts[s]} {s}" for s in JobState))
    for rec in st.running:
        lines.append(f"  running job {rec.id}: {rec.job.describe()} on {rec.worker}{_lease(rec)}")
    for rec in st.queued:
        lines.append(f"  queued  job {rec.id}: {rec.job.describe()}")
    for rec in st.failed:
        lines.append(f"  failed  job {rec.id}: {rec.job.describe()}: {rec.detail or '?'} (log {rec.log_path or '-'});"
                     f" retry: snapshotter queue retry {rec.id}")
    if st.disk is not None:
        d = st.disk
        web = "" if d.web_root_bytes is None else f"; web root {d.web_root} adds {human(d.web_root_bytes)}"
        lines.append(f"disk: build output {human(d.output_bytes)} ({d.output_builds} builds){web}")
    return lines
