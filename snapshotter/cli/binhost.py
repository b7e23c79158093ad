"""`snapshotter builds | promote | rollback | editions | purge`: builds and editions (docs/binhost.md)."""

from __future__ import annotations

import sys

import click

from snapshotter.binhost import editions as editionsmod
from snapshotter.binhost import retention
from snapshotter.cli import State, pass_state
from snapshotter.service import buildcache, delivery


@click.command("builds")
@click.option("--profile", default=None, metavar="NAME", help="Only the builds of this profile.")
@pass_state
def builds_cmd(state: State, profile: str | None) -> None:
    """List builds: id, state, tag, packages, size, overlays, and the editions pointing at each.

    \b
    Example:
      snapshotter builds --profile basic
      basic  2026-11-20.1  ok  tag 2026-11-20  12 packages  48.2 MB  overlays -  editions testing
    An incremental build says how many of its packages are its base's: "4 packages (3 reused from
    2026-11-19.1)". States: ok, failed (never published), incomplete (running, or crashed), invalid (bad
    build.json).
    Exit status: 0 ok, 1 error.
    """
    report = editionsmod.builds_report(state.config, profile)
    if not report.rows:
        click.echo("no builds" + (f" of profile {profile}" if profile else ""))
    for row in report.rows:
        b = row.build
        reuse = f" ({b.reused} reused from {b.base})" if b.base else ""
        line = (f"{b.profile}  {b.id}  {b.state}  tag {b.tag}  {b.packages} packages{reuse}  "
                f"{retention.human(b.size)}  overlays {b.describe_overlays()}  "
                f"editions {', '.join(row.editions) or '-'}")
        if b.detail:
            line += f"  ({b.detail})"
        click.echo(line)
    sys.exit(report.exit_status)


def _print_switch(report: editionsmod.SwitchReport) -> None:
    click.echo(report.message)
    sys.exit(report.exit_status)


@click.command("promote")
@click.argument("profile")
@click.option("--to", "to_edition", required=True, metavar="EDITION", help="The edition to switch.")
@click.option("--from", "from_edition", default=None, metavar="EDITION",
              help="Take the build this edition points at (default: [binhost] automatic_edition).")
@click.option("--build", "build_id", default=None, metavar="ID", help="Take this build (YYYY-MM-DD.N) instead.")
@pass_state
def promote_cmd(state: State, profile: str, to_edition: str, from_edition: str | None,
                build_id: str | None) -> None:
    """Point an edition of PROFILE at a build, atomically (clients see the old set or the new one).

    \b
    Examples:
      snapshotter promote basic --to production                   # production := what testing has
      snapshotter promote basic --to production --build 2026-11-20.1
    Failed, incomplete and removed builds are refused. The switch is recorded in the history that
    `snapshotter editions` shows.
    Exit status: 0 switched (or already there), 1 error, 75 another switch or purge is running.
    """
    _print_switch(delivery.promote(state.config, profile, to_edition, from_edition=from_edition,
                                   build_id=build_id))


@click.command("rollback")
@click.argument("profile")
@click.option("--edition", required=True, metavar="EDITION", help="The edition to switch back.")
@click.option("--to", "to_build", default=None, metavar="ID",
              help="The build to go back to (default: the one the edition pointed at before).")
@pass_state
def rollback_cmd(state: State, profile: str, edition: str, to_build: str | None) -> None:
    """Point an edition of PROFILE back at an earlier build, atomically.

    \b
    Examples:
      snapshotter rollback basic --edition production             # back to what production had before
      snapshotter rollback basic --edition production --to 2026-11-18.1
    Without --to, a second rollback returns to where the first started (it undoes the last switch).
    Exit status: 0 switched, 1 error (no earlier build, failed or removed build), 75 locked.
    """
    _print_switch(delivery.rollback(state.config, profile, edition, to=to_build))


@click.command("editions")
@click.option("--profile", default=None, metavar="NAME", help="Only this profile.")
@click.option("--history", "limit", default=20, show_default=True, metavar="N",
              type=click.IntRange(min=0), help="Show the last N switches (0: all).")
@pass_state
def editions_cmd(state: State, profile: str | None, limit: int) -> None:
    """Where each edition of each profile points, and the history of switches.

    \b
    Example:
      snapshotter editions --profile basic
      basic/testing     2026-11-21.1  tag 2026-11-21  (root testing.4, previous 2026-11-20.1)
      basic/production  2026-11-20.1  tag 2026-11-20  (root production.2, previous 2026-11-18.1)
      history:
      2026-11-21T09:12:03Z  alice  promote  basic/production  2026-11-18.1 -> 2026-11-20.1
    Exit status: 0 ok, 1 error.
    """
    report = editionsmod.editions_report(state.config, profile, limit)
    if not report.states:
        click.echo("no profiles")
    width = max((len(f"{s.profile}/{s.edition}") for s in report.states), default=0)
    for s in report.states:
        name = f"{s.profile}/{s.edition}".ljust(width)
        if s.problem:
            click.echo(f"{name}  BROKEN: {s.problem}")
        elif s.build is None:
            click.echo(f"{name}  -")
        else:
            tag = s.record.get("tag") if s.record else "?"
            click.echo(f"{name}  {s.build}  tag {tag}  (root {s.root}, previous {s.previous or '-'})")
    click.echo("history:" if report.history else "history: none")
    for e in report.history:
        click.echo(f"{e.time}  {e.user}  {e.action}  {e.profile}/{e.edition}  {e.from_build or '-'} -> {e.to_build}")
    sys.exit(report.exit_status)


@click.command("purge")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@pass_state
def purge_cmd(state: State, dry_run: bool) -> None:
    """Remove builds no retention rule keeps, with their published copies, and trim the build caches.

    \b
    Kept: the newest [binhost] keep_builds builds of each profile, every build an edition points at (and
    the previous build of its current root), and every build an edition pointed at within
    [binhost] rollback_days days. Removed with a build: its OUTPUT directory and its copy under the web
    root; then roots and cached snapshots nothing uses any more. The build caches keep the
    [build] cached_stages unpacked stages and cached_trees exported trees used last (never one a
    running build holds).
    Example:
      snapshotter purge --dry-run
    Exit status: 0 ok, 1 error, 75 a switch is running.
    """
    report = retention.purge(state.config, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for b in report.removed:
        click.echo(f"{verb} build {b.profile} {b.id} ({b.state}, {retention.human(b.size)})")
    for root in report.roots_removed:
        click.echo(f"{verb} root {root}")
    for snap in report.snapshots_removed:
        click.echo(f"{verb} cached snapshot {snap}")
    caches = buildcache.purge_caches(state.config, dry_run=dry_run)
    for name in caches.stages:
        click.echo(f"{verb} unpacked stage {name}")
    for name in caches.trees:
        click.echo(f"{verb} cached tree {name}")
    for k in report.kept:
        click.echo(f"kept build {k.build.profile} {k.build.id}: {'; '.join(k.reasons)}")
    if not (report.removed or report.roots_removed or report.snapshots_removed or caches.stages or caches.trees):
        click.echo("nothing to remove")
    if caches.error:
        click.echo(f"snapshotter: error: purging the build caches: {caches.error}", err=True)
    sys.exit(report.exit_status or (1 if caches.error else 0))


COMMANDS: list[click.Command] = [builds_cmd, promote_cmd, rollback_cmd, editions_cmd, purge_cmd]
