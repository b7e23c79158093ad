"""`snapshotter publish`, `snapshotter export` and `snapshotter client-config`."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from snapshotter.cli import State, pass_state
from snapshotter.git.export import export_tree
from snapshotter.git.repository import Repository
from snapshotter.publish.clientconfig import DEFAULT_KEY_PATH, DEFAULT_LOCATION, client_config
from snapshotter.publish.snapshots import options_from_config, publish

log = logging.getLogger("snapshotter")


@click.command("publish")
@click.argument("tags", nargs=-1, metavar="[TAG]...")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path),
              help="The snapshot repository (bare git). Config: repo.")
@click.option("--all", "all_tags", is_flag=True, help="Publish every tag not yet published.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Web root: snapshots go to OUT/snapshots/. Config: publish.out.")
@click.option("--signing-key", metavar="FPR", help="Fingerprint of the signing key. Config: publish.signing_key.")
@click.option("--gnupghome", type=click.Path(file_okay=False, path_type=Path),
              help="GnuPG home holding the secret signing key. Config: publish.gnupghome.")
@click.option("--keep", type=click.IntRange(min=0),
              help="Keep only the newest N published days (0: all). Config: publish.keep.")
@click.option("--xz-level", type=click.IntRange(0, 9), help="xz preset 0..9. Config: publish.xz_level.")
@click.option("--xz-threads", type=click.IntRange(min=0),
              help="xz threads (0: one per core; output does not depend on it). Config: publish.xz_threads.")
@click.option("--force", is_flag=True, help="Publish again tags that are already published.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds to wait when another publish holds OUT's lock (then exit 75).")
@pass_state
def publish_cmd(state: State, tags: tuple[str, ...], repo: Path | None, all_tags: bool, out: Path | None,
                signing_key: str | None, gnupghome: Path | None, keep: int | None, xz_level: int | None,
                xz_threads: int | None, force: bool, wait: float) -> None:
    """Publish date tags as signed emerge-webrsync snapshots.

    For each TAG (YYYY-MM-DD; default: the newest) write OUT/snapshots/gentoo-YYYYMMDD.tar.xz with
    its .md5sum and .gpgsig, and point gentoo-latest.tar.xz at the newest published day. Tags that are
    already published are skipped unless --force. The same tag always gives the same bytes.

    \b
    Examples:
      snapshotter publish --out /srv/www --signing-key FPR     # the newest tag
      snapshotter publish --all --keep 30                      # every tag not yet published; keep 30 days
      snapshotter publish 2026-11-20 --force                   # that day again
    Prints one line per event: "published TAG PATH SIZE bytes md5 MD5", "already published TAG ...",
    "pruned NAME", and "latest TAG" (where gentoo-latest.tar.xz points).
    """
    cfg = state.config
    opts = options_from_config(cfg, out=out, signing_key=signing_key, gnupghome=gnupghome, keep=keep,
                               xz_level=xz_level, xz_threads=xz_threads)
    report = publish(state.repo(repo), opts, list(tags), all_tags=all_tags, force=force,
                     lock_wait=wait)
    for p in report.published:
        click.echo(f"published {p.tag} {p.path} {p.size} bytes md5 {p.md5}")
    for t in report.skipped:
        click.echo(f"already published {t} (use --force to publish again)")
    for name in report.pruned:
        click.echo(f"pruned {name}")
    if report.latest:
        click.echo(f"latest {report.latest}")


@click.command("export")
@click.argument("tag")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path),
              help="The snapshot repository (bare git). Config: repo.")
@pass_state
def export_cmd(state: State, tag: str, dest: Path, repo: Path | None) -> None:
    """Write the tree of TAG (YYYY-MM-DD) into DEST (created if missing; must be empty).

    \b
    Example:
      snapshotter export 2026-11-20 /var/tmp/gentoo-2026-11-20
    """
    repository = Repository(state.repo(repo)).require()
    t = repository.find_tag(tag)
    export_tree(repository.path, t.commit, dest)
    click.echo(f"exported {t.name} ({t.commit}) to {dest}")


@click.command("client-config")
@click.option("--mirror-url", required=True, metavar="URL",
              help="Where clients fetch snapshots: the URL serving publish's OUT directory.")
@click.option("--key-path", default=DEFAULT_KEY_PATH, show_default=True, metavar="PATH",
              help="Where the client keeps our armored public signing key.")
@click.option("--location", default=DEFAULT_LOCATION, show_default=True, metavar="PATH",
              help="The client's gentoo repository directory.")
@click.option("--keyserver", metavar="URL", help="A keyserver carrying our key (for clients using gemato).")
def client_config_cmd(mirror_url: str, key_path: str, location: str, keyserver: str | None) -> None:
    """Print the repos.conf stanza and GENTOO_MIRRORS line a client needs.

    The URL is the root that serves publish's OUT directory, not its snapshots/ (emerge-webrsync adds
    /snapshots/ itself); a URL ending in /snapshots is refused.

    \b
    Example:
      snapshotter client-config --mirror-url https://mirror.example.org --key-path /etc/portage/our-key.asc
    """
    click.echo(client_config(mirror_url, key_path, location, keyserver), nl=False)


COMMANDS: list[click.Command] = [publish_cmd, export_cmd, client_config_cmd]
