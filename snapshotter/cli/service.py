"""`snapshotter run`, `status`, `worker`, `workers`, `queue ...` and `hooks ...`: the service side.

Library modules are imported inside the commands so that the git hook (`hooks enqueue`) starts fast.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from snapshotter.cli import State, pass_state


def _stop_on_signals(stop: Any) -> None:
    """SIGTERM and SIGINT call `stop()` (finish the current step, then exit 0)."""

    def handler(signum: int, frame: object) -> None:
        click.echo(f"snapshotter: {signal.Signals(signum).name} received; stopping after the current step",
                   err=True)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


# ---- hooks -------------------------------------------------------------------------------------
@click.group("hooks")
def hooks_group() -> None:
    """Git hooks that queue builds when tags or overlay commits are pushed, and refuse future date tags.

    \b
    Example:
      snapshotter --config /etc/snapshotter/snapshotter.toml hooks install /var/lib/snapshotter/gentoo.git
    """


@hooks_group.command("install")
@click.argument("repo", type=click.Path(file_okay=False, path_type=Path))
@click.option("--executable", default=None, help="Absolute path of snapshotter to run (default: this one).")
@click.option("--force", is_flag=True, help="Replace a post-receive hook that snapshotter did not install.")
@pass_state
def hooks_install(state: State, repo: Path, executable: str | None, force: bool) -> None:
    """Install the pre-receive and post-receive hooks into the bare repository REPO (the snapshot
    repository or an overlay).

    post-receive runs `snapshotter [--config FILE] hooks enqueue`, pre-receive `... hooks check`, with
    this executable and the configuration given with the global --config (or $SNAPSHOTTER_CONFIG)
    baked in.

    \b
    Examples:
      snapshotter --config /etc/snapshotter/snapshotter.toml hooks install /var/lib/snapshotter/gentoo.git
      snapshotter hooks install /srv/git/myov.git --executable /opt/snapshotter/bin/snapshotter
    """
    from snapshotter.service import hooks

    config = state.config_path
    if config is None and os.environ.get("SNAPSHOTTER_CONFIG"):
        config = Path(os.environ["SNAPSHOTTER_CONFIG"])
    state.config  # noqa: B018  -- refuse to install a hook pointing at a broken configuration
    exe = executable or hooks.find_executable()
    given = f" --config {config.absolute()}" if config else ""
    for target in hooks.install(repo, exe, config, force=force):
        command = "check" if target.name == "pre-receive" else "enqueue"
        click.echo(f"installed {target} (runs {exe}{given} hooks {command})")


@hooks_group.command("check")
@click.option("--repo", "repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The repository pushed to (default: $GIT_DIR, else the current directory).")
@pass_state
def hooks_check(state: State, repo: Path | None) -> None:
    """Read pre-receive lines ("<old> <new> <ref>") on stdin; exit 1 with one line if the push would
    create or move a date tag of the snapshot repository in the future (it would stop every import).

    \b
    Example (what the installed pre-receive hook runs, with git's lines on stdin):
      echo "$OLD $NEW refs/tags/2099-01-01" | snapshotter hooks check --repo /var/lib/snapshotter/gentoo.git
    """
    from snapshotter.service import hooks

    if repo is None:
        repo = Path(os.environ.get("GIT_DIR") or ".")
    hooks.check_push(state.config, repo.absolute(), sys.stdin.read())


@hooks_group.command("enqueue")
@click.option("--repo", "repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The repository pushed to (default: $GIT_DIR, else the current directory).")
@pass_state
def hooks_enqueue(state: State, repo: Path | None) -> None:
    """Read post-receive lines ("<old> <new> <ref>") on stdin and queue the builds they ask for.

    \b
    Example (what the installed hook runs, with git's lines on stdin):
      echo "$OLD $NEW refs/tags/2026-11-20" | snapshotter hooks enqueue --repo /var/lib/snapshotter/gentoo.git
    """
    from snapshotter.service import triggers

    if repo is None:
        repo = Path(os.environ.get("GIT_DIR") or ".")
    text = sys.stdin.read()
    triggers.queue_push(state.config, repo.absolute(), text)


# ---- queue -------------------------------------------------------------------------------------
@click.group("queue", invoke_without_command=True)
@click.option("--state", "states", multiple=True,
              type=click.Choice(["queued", "running", "done", "failed"]),  # JobState's values (imported lazily)
              help="Only jobs in this state.")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=None, help="Only the newest N jobs.")
@click.pass_context
def queue_group(ctx: click.Context, states: tuple[str, ...], limit: int | None) -> None:
    """List the build jobs (oldest first); subcommands act on one job.

    \b
    Examples:
      snapshotter queue                        # every job
      snapshotter queue --state failed -n 5    # the five newest failed jobs
    """
    if ctx.invoked_subcommand is not None:
        return
    from snapshotter.service.jobqueue import JobState, open_queue

    state = ctx.find_object(State)
    assert state is not None
    for rec in open_queue(state.config).list(states or None, limit):
        who = f" worker={rec.worker}" if rec.state == JobState.RUNNING else ""
        extra = f" log={rec.log_path}" if rec.log_path else ""
        detail = f" ({rec.detail})" if rec.detail and rec.state == JobState.FAILED else ""
        click.echo(f"{rec.id:>5} {rec.state:<7} {rec.job.describe()} queued={_when(rec.created)}"
                   f" attempts={rec.attempts}{who}{extra}{detail}")


@queue_group.command("retry")
@click.argument("job_id", type=int)
@pass_state
def queue_retry(state: State, job_id: int) -> None:
    """Queue the failed job JOB_ID again.

    \b
    Example:
      snapshotter queue retry 12
    """
    from snapshotter.service.jobqueue import open_queue

    rec = open_queue(state.config).retry(job_id)
    click.echo(f"job {rec.id} queued again: {rec.job.describe()}")


@queue_group.command("show")
@click.argument("job_id", type=int)
@pass_state
def queue_show(state: State, job_id: int) -> None:
    """Everything about job JOB_ID.

    \b
    Example:
      snapshotter queue show 12
    """
    from snapshotter.service.jobqueue import open_queue

    rec = open_queue(state.config).get(job_id)
    pins = " ".join(f"{n}={c}" for n, c in rec.job.overlays) or "-"
    for key, value in [("id", rec.id), ("state", rec.state), ("profile", rec.job.profile), ("tag", rec.job.tag),
                       ("overlays", pins), ("source", rec.source or "-"), ("queued", _when(rec.created)),
                       ("started", _when(rec.started)), ("finished", _when(rec.finished)),
                       ("attempts", rec.attempts), ("worker", rec.worker or "-"), ("log", rec.log_path or "-"),
                       ("detail", rec.detail or "-")]:
        click.echo(f"{key}: {value}")


@queue_group.command("init")
@pass_state
def queue_init(state: State) -> None:
    """Create the build queue, or migrate its database schema to this version of snapshotter.

    With service.queue a PostgreSQL database: creates the schema `snapshotter` (jobs, workers) or
    migrates it; safe to repeat and to run on several hosts at once. Run it once after installing
    or upgrading, before the workers. With "sqlite": creates state_dir/queue.sqlite.

    \b
    Example:
      snapshotter --config /etc/snapshotter/snapshotter.toml queue init
    """
    from snapshotter.service.jobqueue import SQLITE, SqliteQueue, queue_path

    cfg = state.config
    if cfg.service.queue == SQLITE:
        SqliteQueue(queue_path(cfg.state_dir))
        click.echo(f"build queue {queue_path(cfg.state_dir)}: ready (SQLite)")
        return
    from snapshotter.service.pgqueue import init_schema

    click.echo(init_schema(cfg.service.queue).describe())


@queue_group.command("migrate")
@click.option("--to", "target", required=True, metavar="URL",
              help="The PostgreSQL database: a postgresql:// URL or a libpq string such as service=NAME "
                   "(no password in it: ~/.pgpass, a service file or PGPASSWORD).")
@pass_state
def queue_migrate(state: State, target: str) -> None:
    """Move the SQLite queue of state_dir, history included, into a PostgreSQL database.

    Creates the schema if needed; the database must hold no job yet, and no worker may be running
    (a job under a live lease refuses the move). Job ids, states, attempts, times and logs move as they
    are. The SQLite file stays as a backup but refuses all further use, so nothing is queued where no
    worker looks. Then set [service] queue = URL on every host (hooks included) and start the workers.

    \b
    Example:
      snapshotter queue migrate --to postgresql://snapshotter@db.example.org/snapshotter
    """
    from snapshotter.config import check_queue_location
    from snapshotter.errors import SnapshotterError
    from snapshotter.service.jobqueue import SQLITE, SqliteQueue, queue_path
    from snapshotter.service.pgqueue import migrate_from_sqlite

    cfg = state.config
    check_queue_location(target, "--to")
    if target == SQLITE:
        raise SnapshotterError("--to: name the PostgreSQL database to move the queue to")
    if cfg.service.queue != SQLITE:
        raise SnapshotterError("service.queue already names a database; `queue migrate` moves the SQLite queue "
                               "of state_dir (run it with the configuration that still says \"sqlite\")")
    path = queue_path(cfg.state_dir)
    if not path.exists():
        raise SnapshotterError(f"no SQLite queue at {path}: nothing to move")
    report = migrate_from_sqlite(SqliteQueue(path), target)
    counts = ", ".join(f"{n} {s}" for s, n in report.by_state.items())
    click.echo(f"moved {report.jobs} job(s) ({counts}) from {path} to {report.label}")
    click.echo(f"next: set [service] queue = \"{report.label}\" in the configuration of every host "
               "(the hooks' too) and start the workers")


@queue_group.command("add")
@click.option("--profile", "profiles", multiple=True, required=True, help="Profile to build (repeatable).")
@click.option("--tag", default=None, help="Snapshot tag YYYY-MM-DD (default: the newest).")
@click.option("--overlay", "overlays", multiple=True, metavar="NAME=COMMIT", help="Pin an overlay (repeatable).")
@pass_state
def queue_add(state: State, profiles: tuple[str, ...], tag: str | None, overlays: tuple[str, ...]) -> None:
    """Queue builds by hand: each PROFILE at a tag, overlays optionally pinned to commits.

    \b
    Examples:
      snapshotter queue add --profile basic                      # at the newest tag
      snapshotter queue add --profile basic --profile desktop --tag 2026-11-20
      snapshotter queue add --profile desktop --overlay myov=<full commit id>
    Prints "queued: job ID" (or "already queued: job ID") per profile.
    """
    from snapshotter.errors import SnapshotterError
    from snapshotter.service.triggers import add_jobs

    pins = []
    for item in overlays:
        name, sep, commit = item.partition("=")
        if not sep:
            raise SnapshotterError(f"--overlay {item!r}: expected NAME=COMMIT")
        pins.append((name, commit))
    report = add_jobs(state.config, profiles, tag, pins)
    for _, jid, created in report.added:
        click.echo(f"{'queued' if created else 'already queued'}: job {jid}")
    sys.exit(report.exit_status)


# ---- worker ------------------------------------------------------------------------------------
@click.command("worker")
@click.option("--once", is_flag=True, help="Take at most one job, build it and exit (4 if it failed).")
@click.option("--lease", "lease", type=click.FloatRange(min=0.5), default=None,
              help="Job lease in seconds, renewed while building. Config: service.lease_seconds.")
@click.option("--poll", "poll", type=click.FloatRange(min=0.05), default=None,
              help="Seconds between looks at an empty queue. Config: service.poll_interval.")
@pass_state
def worker_cmd(state: State, once: bool, lease: float | None, poll: float | None) -> None:
    """Build queued jobs one at a time. Several workers may run (here or on other hosts).

    \b
    Examples:
      snapshotter worker             # until SIGTERM (systemd/snapshotter-worker.service)
      snapshotter worker --once      # one job, then exit (4 if its build failed)
    """
    from snapshotter.service.worker import Worker

    worker = Worker(state.config, state.config_path, lease_seconds=lease, poll_interval=poll)
    _stop_on_signals(worker.stop)
    sys.exit(worker.run(once=once))


@click.command("workers")
@click.option("--all", "show_all", is_flag=True, help="Also workers that stopped reporting (seen within a week).")
@pass_state
def workers_cmd(state: State, show_all: bool) -> None:
    """Live workers on every host sharing the queue: host, pid, the job each builds, last heartbeat.

    A worker reports when it looks at the queue and while it builds (every lease/4 seconds); it is live
    while its report is recent enough. Times are the queue's clock (the database server's).

    \b
    Examples:
      snapshotter workers
      snapshotter workers --all      # with those that stopped reporting (marked stale)
    """
    from snapshotter.service.jobqueue import open_queue, queue_exists

    cfg = state.config
    found = open_queue(cfg).workers(include_stale=show_all) if queue_exists(cfg) else []
    if not found:
        click.echo("no live worker" if not show_all else "no worker seen")
        return
    click.echo(f"{'HOST':<24} {'PID':>7} {'JOB':>6}  LAST HEARTBEAT")
    for w in found:
        pid = str(w.pid) if w.pid is not None else w.ident
        job = str(w.job) if w.job is not None else "-"
        click.echo(f"{w.host:<24} {pid:>7} {job:>6}  {_when(w.heartbeat)} UTC ({w.age:.0f} s ago)"
                   f"{'' if w.live else ' stale'}")


# ---- run / status ------------------------------------------------------------------------------
@click.command("run")
@click.option("--once", is_flag=True, help="Run one cycle (sync, push, publish, queue builds) and exit.")
@pass_state
def run_cmd(state: State, once: bool) -> None:
    """The daily loop: sync at service.sync_time UTC, retry until the deadline, push, publish, queue builds.

    \b
    Without --once: runs a catch-up cycle at start, then daily; SIGTERM/SIGINT finish the current
    step and exit 0. With --once (cron, a systemd timer): one cycle, no retries.
    Exit status with --once: 0 ok (also when the day's snapshot is not out yet), 1 sync or publish
    failed, 3 a push failed (the import is kept).

    \b
    Examples:
      snapshotter run             # the loop (systemd/snapshotter.service)
      snapshotter run --once      # one cycle (cron, systemd/snapshotter-sync.timer)
    """
    from snapshotter.service.loop import Service, run_cycle

    cfg = state.config
    if cfg.service.publish and cfg.publish.out is None:
        from snapshotter.errors import ConfigError

        raise ConfigError("service.publish is on but publish.out is not set")
    service = Service(cfg)
    _stop_on_signals(service.stop)
    if once:
        sys.exit(run_cycle(cfg, service.stop_event).exit_status)
    sys.exit(service.run_forever())


@click.command("status")
@pass_state
def status_cmd(state: State) -> None:
    """Newest tag, last sync success and failure, pending pushes, queued/running/failed builds.

    \b
    Example:
      snapshotter --config /etc/snapshotter/snapshotter.toml status
    """
    from snapshotter.service import status

    for line in status.render(status.collect(state.config)):
        click.echo(line)


COMMANDS: list[click.Command] = [run_cmd, status_cmd, hooks_group, queue_group, worker_cmd, workers_cmd]
