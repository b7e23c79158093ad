"""The `snapshotter` command line. Only this package imports click; the library stays free of it.

Each file here holds the subcommands of one job (sync.py: sync/tags, publish.py, build.py, service.py)
and registers them on `main` at the bottom of this file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from snapshotter import __version__
from snapshotter import config as configmod
from snapshotter.errors import SnapshotterError
from snapshotter.logs import setup_logging

log = logging.getLogger("snapshotter")


class State:
    """What every subcommand gets: the config (loaded on first use) and the verbosity."""

    def __init__(self, config_path: Path | None, verbose: int) -> None:
        self.config_path = config_path
        self.verbose = verbose
        self._config: configmod.Config | None = None

    def repo(self, override: Path | None) -> Path:
        """The snapshot repository: the --repo flag if given, else `repo` of the configuration."""
        return (override or self.config.repo).resolve()

    @property
    def config(self) -> configmod.Config:
        if self._config is None:
            self._config = configmod.load(self.config_path)
        return self._config


pass_state = click.make_pass_decorator(State)


class _Group(click.Group):
    """Turns SnapshotterError into one line on stderr and its exit status; no traceback for users."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SnapshotterError as e:
            log.debug("error", exc_info=True)
            click.echo(f"snapshotter: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("snapshotter: interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:  # a bug: one line unless -v asks for the traceback
            state = ctx.find_object(State)
            if state is not None and state.verbose:
                raise
            click.echo(f"snapshotter: internal error: {type(e).__name__}: {e} (run with -v for details)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Configuration file (TOML). Default: ${configmod.CONFIG_ENV}, else {configmod.DEFAULT_CONFIG} "
                   "if it exists, else built-in defaults.")
@click.option("-v", "--verbose", count=True, help="More detail: -v for debug logs, -vv for HTTP and gpg too.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(__version__, prog_name="snapshotter")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, verbose: int, quiet: bool) -> None:
    """Git-driven Gentoo portage snapshots and reproducible chroot builds.

    \b
    Typical mirror server:
      snapshotter sync            fetch, verify and import new daily snapshots, tag and push them
      snapshotter tags            list the imported snapshots
      snapshotter publish --out /srv/www    serve tags as signed emerge-webrsync snapshots
      snapshotter build --profile basic     rebuild all binary packages from a tag in a chroot
      snapshotter run             the daily loop (sync, push, publish, queue builds)

    \b
    Delivering builds to the fleet (docs/binhost.md):
      snapshotter builds --profile basic            builds and the editions pointing at them
      snapshotter promote basic --to production     production := what testing has now
      snapshotter rollback basic --edition production
      snapshotter client-config --profile basic --edition testing --url https://10.0.0.5:8443 --out DIR

    Flags override the configuration file, but only some of its keys have one: an option's help
    names the key it overrides ("Config: sync.mirrors"); every other key is set in the file
    (examples/snapshotter.toml has them all, commented).

    Exit status: 0 ok, 1 error, 2 usage, 3 push failed (import kept), 4 build failed, 75 locked.
    """
    setup_logging(verbose, quiet)
    ctx.obj = State(config_path, verbose)


def _register() -> None:
    from snapshotter.cli import binhost, build, pki, publish, rebuild, service, sync

    for module in (sync, publish, build, rebuild, service, pki, binhost):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
