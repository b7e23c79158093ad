"""`snapshotter build`: rebuild a profile's packages from a tag in a chroot (see docs/build.md)."""

from __future__ import annotations

from pathlib import Path

import click

from snapshotter.cli import State, pass_state
from snapshotter.errors import BuildFailed, ConfigError
from snapshotter.service.build import BuildRequest, run_build


@click.command("build")
@click.option("--profile", "profile", required=True, metavar="NAME", help="Build profile ([profiles.NAME]).")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The snapshot repository (bare git). Config: repo.")
@click.option("--tag", default=None, metavar="YYYY-MM-DD", help="Snapshot tag to build (default: the newest).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory; each build goes to OUTPUT/PROFILE/TAG.N/. Config: build.output.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where build roots are made. Config: build.work_dir.")
@click.option("--overlay-ref", "overlay_refs", multiple=True, metavar="NAME=REF",
              help="Pin an overlay of the profile to another tag/branch/commit for this build (repeatable).")
@click.option("--keep-root", is_flag=True, help="Keep the build root afterwards (for debugging).")
@click.option("--stage4/--no-stage4", "stage4", default=None,
              help="Pack the root of a successful build as its stage4 (default: the profile's stage4, on).")
@click.option("--incremental/--full", "incremental", default=None,
              help="Reuse the newest good build's packages and rebuild what changed, or build everything "
                   "(default: the profile's mode, full unless set).")
@click.option("--rebuild-reverse-deps", is_flag=True,
              help="Incremental build: also rebuild the packages that build-depend on one built from source "
                   "(emerge --rebuild-if-unbuilt).")
@pass_state
def build_cmd(state: State, profile: str, repo: Path | None, tag: str | None, output: Path | None,
              work_dir: Path | None, overlay_refs: tuple[str, ...], keep_root: bool, stage4: bool | None,
              incremental: bool | None, rebuild_reverse_deps: bool) -> None:
    """Run `emerge` (default `--emptytree @world`) for PROFILE in a fresh chroot at a pinned tag.

    \b
    The stage is verified (stage_sha256) and extracted, the tag's tree is put at /var/db/repos/gentoo and
    each overlay at its pinned ref, and emerge runs in private mount and PID namespaces, so no mount
    outlives the build, even on kill -9. With a signing key ([binhost] signing_key) every gpkg is signed;
    a key that cannot sign stops the build before it starts.
    Each build is new: id TAG.N, directory OUTPUT/PROFILE/TAG.N/{packages/,build.log,build.json}, never
    replaced (a failed build keeps its own, "ok": false). Prints "ID DIRECTORY". -v streams emerge live.
    A successful build packs its root as OUTPUT/PROFILE/TAG.N/stage4.tar.zst (same root, same bytes);
    stage = "latest-build" in the profile seeds each build from the newest good build's stage4.
    --incremental (or mode = "incremental" in the profile) starts packages/ from the newest good build's
    packages (hard links) and builds only what changed since; a full build is made instead, and the log
    says why, when its settings differ or the last full build is full_every_days old (docs/build.md).
    Exit status: 0 built, 1 setup error, 4 emerge failed (log tail shown), 75 profile locked.

    \b
    Examples:
      snapshotter build --profile basic                              # at the newest tag
      2026-11-20.1 /var/cache/snapshotter/packages/basic/2026-11-20.1
      snapshotter build --profile desktop --tag 2026-11-20 --overlay-ref myov=v1.2 --keep-root
      snapshotter build --profile basic --no-stage4                  # packages only
      snapshotter build --profile basic --incremental                # reuse what did not change
    """
    cfg = state.config
    cfg.repo = state.repo(repo)
    if work_dir is not None:
        cfg.build.work_dir = work_dir.resolve()
    refs: dict[str, str] = {}
    for item in overlay_refs:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise ConfigError(f"--overlay-ref: expected NAME=REF, got {item!r}")
        refs[name] = ref
    if rebuild_reverse_deps and incremental is False:
        raise ConfigError("--rebuild-reverse-deps: only for an incremental build, not with --full")
    req = BuildRequest(profile=profile, tag=tag, overlay_refs=refs,
                       output=output.resolve() if output is not None else None, keep_root=keep_root,
                       stage4=stage4, incremental=incremental, reverse_deps=rebuild_reverse_deps)
    result = run_build(cfg, req, console=state.verbose > 0)
    if not result.ok:
        tail = result.log_tail()
        click.echo(f"---- last {len(tail)} lines of {result.log} ----", err=True)
        for line in tail:
            click.echo(line, err=True)
        click.echo("----", err=True)
        raise BuildFailed(f"build {result.build_id} of profile {profile} failed (emerge exit status "
                          f"{result.exit_status}); log: {result.log}")
    click.echo(f"{result.build_id} {result.output_dir}")


COMMANDS: list[click.Command] = [build_cmd]
