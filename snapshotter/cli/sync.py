"""`snapshotter sync` and `snapshotter tags`."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from datetime import date, datetime
from pathlib import Path
from typing import TextIO

import click

from snapshotter.cli import State, pass_state
from snapshotter.config import validate
from snapshotter.errors import SnapshotterError
from snapshotter.git.repository import Repository
from snapshotter.logs import set_status_line

log = logging.getLogger("snapshotter")


def parse_day(ctx: click.Context, param: click.Parameter, value: str | None) -> date | None:
    """The --date option's YYYYMMDD as a date (click names the option in the error)."""
    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        raise click.BadParameter(f"expected YYYYMMDD, got {value!r}", ctx=ctx, param=param) from None


class TerminalProgress:
    """A progress line on stderr when it is a terminal; nothing otherwise (cron, systemd, pipes).

    One line per step (`fetch NAME`, `import NAME`), redrawn in place with \\r, at most ten times a second,
    cut to the terminal's width so that it never wraps. While it is shown, log records erase it and draw it
    again (logs.set_status_line), so a log line never lands in the middle of it.
    """

    BAR = 30

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self._label: str | None = None
        self._line = ""
        self._drawn = 0.0

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if label != self._label:
            self.close()
            self._label = label
            self._drawn = 0.0  # a new step is shown at once
            set_status_line(self)
        self._line = self._format(label, done, total)
        now = time.monotonic()
        if now - self._drawn >= 0.1:
            self._drawn = now
            self.redraw()

    def _format(self, label: str, done: int, total: int | None) -> str:
        if total:
            part = min(done / total, 1.0)
            filled = int(part * self.BAR)
            line = f"{label}  [{'#' * filled}{'-' * (self.BAR - filled)}]  {part:4.0%}"
        else:
            line = f"{label}  {done / 1e6:.1f} MB"
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            width = 80
        return line[:max(width - 1, 1)]

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()

    def redraw(self) -> None:
        self.stream.write(f"\r\x1b[K{self._line}")
        self.stream.flush()

    def close(self) -> None:
        """End the current line (left on the screen as it was last)."""
        if self._label is not None:
            set_status_line(None)
            self.redraw()
            self.stream.write("\n")
            self.stream.flush()
            self._label = None


@click.command()
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path),
              help="The snapshot repository (bare git; created if missing). Config: repo.")
@click.option("--mirror", "mirrors", multiple=True, metavar="URL",
              help="A Gentoo mirror: its root, the directory holding snapshots/ (not .../snapshots); repeat "
                   "to try several in order. "
                   "Config: sync.mirrors.")
@click.option("--keyring", "keyrings", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="An armored public key file trusted for snapshot signatures; repeatable. Config: sync.keyring.")
@click.option("--fingerprint", "fingerprints", multiple=True, metavar="FPR",
              help="Only accept signatures by this key (40 hex digits); repeatable. Config: sync.fingerprints.")
@click.option("--date", "day", metavar="YYYYMMDD", callback=parse_day, help="Import exactly the snapshot of this day.")
@click.option("--no-push", is_flag=True, help="Import and tag locally only; do not push (config: git.push).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where downloads (and resumable partial downloads) go. Config: sync.cache_dir.")
@click.option("--max-catchup-days", type=click.IntRange(min=1),
              help="Import at most this many missed days. Config: sync.max_catchup_days.")
@pass_state
def sync(state: State, repo: Path | None, mirrors: tuple[str, ...], keyrings: tuple[Path, ...],
         fingerprints: tuple[str, ...], day: date | None, no_push: bool, cache_dir: Path | None,
         max_catchup_days: int | None) -> None:
    """Fetch, verify and import new daily portage snapshots; commit, tag and push them.

    \b
    Each snapshot becomes one commit "Update portage tree to YYYY-MM-DD" on the
    snapshot repository's branch and an annotated tag YYYY-MM-DD (the day of metadata/timestamp.x
    minus 86400 s). The md5 and the OpenPGP signature (by a pinned fingerprint) are
    checked before anything is imported.

    \b
    Without --date: every day newer than the newest tag, oldest first (at most
    max_catchup_days), up to yesterday UTC; an empty repository gets the newest
    snapshot the mirrors have. A day not on the mirrors yet is not an error.

    \b
    Examples:
      snapshotter sync --repo /srv/git/gentoo.git --keyring gentoo-release.asc
      snapshotter sync --date 20261101 --no-push
    Prints one line per imported day: "YYYY-MM-DD <commit> <files changed>".
    Exit status: 0 ok (or up to date), 1 error, 3 push failed (the import is kept
    and pushed by the next run), 75 another sync holds the repository lock.
    """
    cfg = dataclasses.replace(state.config, repo=state.repo(repo))
    sync_cfg = cfg.sync
    if mirrors:
        sync_cfg = dataclasses.replace(sync_cfg, mirrors=list(mirrors))
    if keyrings:
        sync_cfg = dataclasses.replace(sync_cfg, keyring=[k.resolve() for k in keyrings])
    if fingerprints:
        sync_cfg = dataclasses.replace(sync_cfg, fingerprints=list(fingerprints))
    if cache_dir:
        sync_cfg = dataclasses.replace(sync_cfg, cache_dir=cache_dir.resolve())
    if max_catchup_days:
        sync_cfg = dataclasses.replace(sync_cfg, max_catchup_days=max_catchup_days)
    cfg = dataclasses.replace(cfg, sync=sync_cfg)
    try:
        validate(cfg)
    except SnapshotterError as e:
        raise click.UsageError(str(e)) from None

    from snapshotter.service.loop import sync_and_queue  # new tags queue builds, as a push of them would

    progress = TerminalProgress()
    try:
        outcome = sync_and_queue(cfg, day=day, push=not no_push, progress=progress)
    finally:
        progress.close()
    if outcome.error is not None:
        raise outcome.error
    for result in outcome.report.imported:
        click.echo(f"{result.tag} {result.commit} {result.changed}")
    if outcome.report.up_to_date and outcome.newest is not None:
        click.echo(f"already up to date (newest tag {outcome.newest.name})")
    for remote in outcome.report.pushed:
        log.info("pushed to %s", remote)
    for remote, reason in outcome.report.push_failed:
        click.echo(f"snapshotter: error: push to {remote} failed: {reason} (import kept; the next run retries)",
                   err=True)
    if outcome.queue_error is not None:
        raise outcome.queue_error
    sys.exit(outcome.exit_status)


@click.command()
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), help="The snapshot repository (bare git). Config: repo.")
@pass_state
def tags(state: State, repo: Path | None) -> None:
    """List imported snapshots as "YYYY-MM-DD <commit>" lines, newest last.

    \b
    Example:
      snapshotter tags --repo /var/lib/snapshotter/gentoo.git | tail -n 1    # the newest
    """
    repository = Repository(state.repo(repo), state.config.git.branch).require()
    for tag in repository.tags():
        click.echo(f"{tag.name} {tag.commit}")


COMMANDS: list[click.Command] = [sync, tags]
