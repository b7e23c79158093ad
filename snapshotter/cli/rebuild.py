"""`snapshotter rebuild`: is a build reproducible? (docs/build.md, "Reproducibility check")."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from snapshotter.cli import State, pass_state
from snapshotter.errors import SnapshotterError
from snapshotter.service.rebuild import rebuild


@click.command("rebuild")
@click.argument("build", metavar="BUILD")
@click.option("--profile", default=None, metavar="NAME", help="The profile of BUILD (needed with a build id).")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The snapshot repository (bare git). Config: repo.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where build roots are made. Config: build.work_dir.")
@click.option("--report", "report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the JSON report here (default: rebuild-of-ID.json in the new build's directory).")
@pass_state
def rebuild_cmd(state: State, build: str, profile: str | None, repo: Path | None, work_dir: Path | None,
                report: Path | None) -> None:
    """Rebuild BUILD from the inputs its build.json pinned and compare the packages by content.

    \b
    BUILD is a build id (with --profile) or the path of a build.json or a build's directory. The
    rebuild is a new build (id TAG.N+1; it never moves an edition) from the recorded stage (sha256),
    the tag's commit (refused if the tag points elsewhere now), the overlays' commits, the Portage
    profile, world and emerge command; a changed portage_confdir is refused. Each package is then
    identical, differs (the files named), missing or extra, comparing the files of its image and its
    metadata; what Portage changes on every build (BUILD_TIME, BUILD_ID, mtimes, signatures, the
    Manifest, the Packages index) is ignored by the rule printed in the report. With diffoscope
    installed, a differing package's detail is written next to the report.
    Exit status: 0 every package identical, 1 something differs (the last line says what) or a setup
    error, 4 the rebuild's emerge failed, 75 profile locked.

    \b
    Examples:
      snapshotter rebuild 2026-11-20.1 --profile basic
      ...
      rebuild 2026-11-20.2 of basic 2026-11-20.1: 12 packages: 12 identical, 0 differs, 0 missing, 0 extra: reproducible
      snapshotter rebuild /var/cache/snapshotter/packages/basic/2026-11-20.1/build.json --report /tmp/r.json
    """
    cfg = state.config
    cfg.repo = state.repo(repo)
    if work_dir is not None:
        cfg.build.work_dir = work_dir.resolve()
    rep = rebuild(cfg, build, profile, report=report.resolve() if report is not None else None,
                  console=state.verbose > 0)
    lines = rep.text()
    for line in lines[:-1]:
        click.echo(line)
    if rep.exit_status != 0:
        raise SnapshotterError(lines[-1], rep.exit_status)
    click.echo(lines[-1])
    sys.exit(0)


COMMANDS: list[click.Command] = [rebuild_cmd]
