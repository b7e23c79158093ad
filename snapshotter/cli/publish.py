"""`snapshotter publish`, `snapshotter export` and `snapshotter client-config`."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from snapshotter.binhost import client as binhost_client
from snapshotter.binhost.client import ClientTLS
from snapshotter.cli import State, pass_state
from snapshotter.errors import EXIT_USAGE, ConfigError
from snapshotter.git.export import export_tree
from snapshotter.git.repository import Repository
from snapshotter.publish.clientconfig import DEFAULT_KEY_PATH, DEFAULT_LOCATION, client_config
from snapshotter.publish.snapshots import PublishIncomplete, PublishReport, options_from_config, publish

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

    A tag whose tree cannot be published (a name that is not UTF-8, a symlink out of the tree: a tag
    pushed from elsewhere or imported by an older version) fails a publish of that tag; --all skips it
    with a warning, publishes the other days and exits 1 with "published N, skipped K: TAG (why)".
    """
    cfg = state.config
    opts = options_from_config(cfg, out=out, signing_key=signing_key, gnupghome=gnupghome, keep=keep,
                               xz_level=xz_level, xz_threads=xz_threads)
    try:
        report = publish(state.repo(repo), opts, list(tags), all_tags=all_tags, force=force, lock_wait=wait)
    except PublishIncomplete as e:  # --all skipped tags it cannot publish: what it did, then one error line
        _print_report(e.report)
        raise
    _print_report(report)


def _print_report(report: PublishReport) -> None:
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
@click.option("--mirror-url", metavar="URL",
              help="Snapshot-only mode: the URL serving publish's OUT directory (clients sync the newest tree).")
@click.option("--key-path", default=DEFAULT_KEY_PATH, show_default=True, metavar="PATH",
              help="Snapshot-only mode: where the client keeps our armored public signing key.")
@click.option("--location", default=DEFAULT_LOCATION, show_default=True, metavar="PATH",
              help="Snapshot-only mode: the client's gentoo repository directory.")
@click.option("--keyserver", metavar="URL",
              help="Snapshot-only mode: a keyserver carrying our key (for clients using gemato).")
@click.option("--profile", metavar="NAME", help="Binhost mode: the build profile the client follows.")
@click.option("--edition", metavar="EDITION", help="Binhost mode: the edition it follows (e.g. production).")
@click.option("--url", metavar="URL", help="Binhost mode: the edition's URL as the client reaches it (its "
              "document root, which holds edition.json).")
@click.option("--cert", metavar="PATH", help="Binhost mode: the client's certificate, a path on the client "
              "(with --key and --ca).")
@click.option("--key", "key_file", metavar="PATH", help="Binhost mode: the client's private key, a path on the client.")
@click.option("--ca", metavar="PATH", help="Binhost mode: the CA of the server's certificate, a path on the client.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Binhost mode: write the files into this directory (laid out as on the client) instead of "
                   "printing them.")
@pass_state
def client_config_cmd(state: State, mirror_url: str | None, key_path: str, location: str, keyserver: str | None,
                      profile: str | None, edition: str | None, url: str | None, cert: str | None,
                      key_file: str | None, ca: str | None, out: Path | None) -> None:
    """Print (or write) what a client needs: snapshots only, or the builds of an edition.

    Snapshot-only mode (--mirror-url): the repos.conf stanza and GENTOO_MIRRORS line for clients that
    sync the newest published tree. The URL is the root that serves publish's OUT directory, not its
    snapshots/ (emerge-webrsync adds /snapshots/ itself); a URL ending in /snapshots is refused.

    Binhost mode (--profile, --edition, --url): the update script snapshotter-autoupdate, its
    configuration /etc/snapshotter-client.conf, the profile's public signing key and a README with the
    exact commands (install, trust the key in /etc/portage/gnupg, first update, cron), what repos.conf,
    binrepos.conf and make.conf will say. With --cert/--key/--ca (paths on the client, from
    `snapshotter pki issue-client`) the script and Portage's binary repository present the client
    certificate.

    \b
    Examples:
      snapshotter client-config --mirror-url https://mirror.example.org --key-path /etc/portage/our-key.asc
      snapshotter client-config --profile basic --edition production --url https://10.0.0.6:8443 --out ./web01 \\
          --cert /etc/portage/binhost-tls/client.crt --key /etc/portage/binhost-tls/client.key \\
          --ca /etc/portage/binhost-tls/server-ca.crt
    """
    binhost_opts = {"--profile": profile, "--edition": edition, "--url": url, "--cert": cert, "--key": key_file,
                    "--ca": ca, "--out": out}
    if mirror_url is not None:
        given = [name for name, value in binhost_opts.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: binhost mode options; --mirror-url is the snapshot-only mode "
                              "(use one or the other)", EXIT_USAGE)
        click.echo(client_config(mirror_url, key_path, location, keyserver), nl=False)
        return
    if profile is None and edition is None and url is None:
        raise ConfigError("give --profile, --edition and --url (binhost mode) or --mirror-url (snapshot-only mode)", EXIT_USAGE)
    missing = [name for name in ("--profile", "--edition", "--url") if binhost_opts[name] is None]
    if missing:
        raise ConfigError(f"binhost mode needs {', '.join(missing)} too", EXIT_USAGE)
    tls_given = [cert, key_file, ca]
    if any(v is not None for v in tls_given) and not all(v is not None for v in tls_given):
        raise ConfigError("--cert, --key and --ca go together (all three or none)", EXIT_USAGE)
    tls = ClientTLS(cert, key_file, ca) if cert is not None and key_file is not None and ca is not None else None
    assert profile is not None and edition is not None and url is not None
    cc = binhost_client.client_config(state.config, profile, edition, url, tls)
    if out is None:
        click.echo(binhost_client.render(cc), nl=False)
        return
    for path in binhost_client.write(cc, out):
        click.echo(f"wrote {path}")
    click.echo(f"next: copy {out} to the client and follow {out / binhost_client.README}")


COMMANDS: list[click.Command] = [publish_cmd, export_cmd, client_config_cmd]
