"""`snapshotter pki ...` (client and server certificates) and `snapshotter web-config lighttpd` (docs/tls.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from snapshotter.binhost.lighttpd import DEFAULT_USER, LighttpdOptions, render
from snapshotter.binhost.pki import CLIENT_DAYS, SERVER_DAYS, Pki, utcnow
from snapshotter.cli import State, pass_state
from snapshotter.errors import ConfigError
from snapshotter.fsutil import atomic_write


def _pki(state: State, pki_dir: Path | None) -> Pki:
    return Pki((pki_dir or state.config.tls.pki_dir).absolute())


def _edition(state: State, edition: str) -> str:
    editions = state.config.binhost.editions
    if edition not in editions:
        raise ConfigError(f"--edition: {edition!r} is not one of binhost.editions ({', '.join(editions)})")
    return edition


_PKI_DIR = click.option("--pki-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="The PKI directory (root only). Config: tls.pki_dir.")


@click.group("pki")
def pki_group() -> None:
    """Certificates of the binhost endpoints: a server CA and one client CA per edition (docs/tls.md).

    \b
    Examples:
      snapshotter pki init
      snapshotter pki issue-server binhost --ip 10.0.0.5 --ip 10.0.0.6 --dns binhost.example.org
      snapshotter pki issue-client web01 --edition production --out ./web01
      snapshotter pki revoke web01 --edition production   # then: systemctl restart snapshotter-lighttpd
      snapshotter pki list
    """


@pki_group.command("init")
@_PKI_DIR
@pass_state
def init_cmd(state: State, pki_dir: Path | None) -> None:
    """Create the server CA and a client CA for each edition (binhost.editions) that has none.

    An existing CA is never replaced. Run it again after adding an edition.

    \b
    Example:
      snapshotter pki init
    """
    report = _pki(state, pki_dir).init(state.config.binhost.editions)
    for what in report.created:
        click.echo(f"created {what}")
    for what in report.existing:
        click.echo(f"kept existing {what} (a CA is never replaced)")


@pki_group.command("issue-server")
@click.argument("name")
@click.option("--ip", "ips", multiple=True, metavar="ADDRESS", help="An IP address clients connect to (repeatable).")
@click.option("--dns", "dns", multiple=True, metavar="NAME", help="A DNS name clients connect to (repeatable).")
@click.option("--days", type=click.IntRange(min=1), default=SERVER_DAYS, show_default=True,
              help="Validity in days.")
@_PKI_DIR
@pass_state
def issue_server_cmd(state: State, name: str, ips: tuple[str, ...], dns: tuple[str, ...], days: int,
                     pki_dir: Path | None) -> None:
    """Issue (or renew) the server certificate NAME for the endpoints' addresses.

    Writes PKI_DIR/servers/NAME/{key.pem,cert.pem,chain.pem}; chain.pem (certificate + server CA) is
    lighttpd's ssl.pemfile. Endpoints use tls.server_cert (default "binhost") unless they name another.

    \b
    Example:
      snapshotter pki issue-server binhost --ip 10.0.0.5 --ip 10.0.0.6 --dns binhost.example.org
    """
    cert = _pki(state, pki_dir).issue_server(name, ips=list(ips), dns=list(dns), days=days)
    click.echo(f"issued server certificate {cert.name} serial {cert.serial} valid until "
               f"{cert.not_after:%Y-%m-%d}: {cert.chain} (key {cert.key})")
    click.echo("restart lighttpd to use it (systemctl restart snapshotter-lighttpd)")


@pki_group.command("issue-client")
@click.argument("host")
@click.option("--edition", required=True, metavar="EDITION", help="The edition the host may download.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for client.key, client.crt and server-ca.crt. Default: ./HOST.EDITION")
@click.option("--days", type=click.IntRange(min=1), default=CLIENT_DAYS, show_default=True,
              help="Validity in days.")
@_PKI_DIR
@pass_state
def issue_client_cmd(state: State, host: str, edition: str, out: Path | None, days: int,
                     pki_dir: Path | None) -> None:
    """Issue a client certificate for HOST (its CN) from EDITION's client CA.

    Writes client.key (0600), client.crt and server-ca.crt (to check the server) into OUT, ready to
    copy to the host (e.g. to /etc/portage/binhost-tls/). The key exists only there.

    \b
    Example:
      snapshotter pki issue-client web01 --edition production --out ./web01
      scp -r ./web01 root@web01:/etc/portage/binhost-tls && rm -r ./web01
    """
    _edition(state, edition)
    target = out if out is not None else Path(f"{host}.{edition}")
    cert = _pki(state, pki_dir).issue_client(host, edition, target.absolute(), days=days)
    click.echo(f"issued {edition} client certificate for {cert.host} serial {cert.serial} valid until "
               f"{cert.not_after:%Y-%m-%d}")
    click.echo(f"wrote {cert.key} {cert.cert} {cert.server_ca}")
    for note in cert.notes:
        click.echo(f"note: {note}")


@pki_group.command("revoke")
@click.argument("host")
@click.option("--edition", required=True, metavar="EDITION", help="The edition whose certificates to revoke.")
@click.option("--serial", default=None, metavar="SERIAL",
              help="Revoke only this certificate (e.g. the old one after a renewal; see `pki list`).")
@_PKI_DIR
@pass_state
def revoke_cmd(state: State, host: str, edition: str, serial: str | None, pki_dir: Path | None) -> None:
    """Revoke every certificate of HOST in EDITION (or only --serial) and regenerate that edition's CRL.

    lighttpd reads the CRL at start: restart it afterwards (systemctl restart snapshotter-lighttpd).

    \b
    Example:
      snapshotter pki revoke web01 --edition production && systemctl restart snapshotter-lighttpd
    """
    _edition(state, edition)
    pki = _pki(state, pki_dir)
    for serial_hex in pki.revoke(host, edition, serial=serial):
        click.echo(f"revoked {edition} certificate of {host} serial {serial_hex}")
    click.echo(f"CRL updated: {pki.crl(edition)}; restart lighttpd to apply it "
               "(systemctl restart snapshotter-lighttpd)")


@pki_group.command("list")
@_PKI_DIR
@pass_state
def list_cmd(state: State, pki_dir: Path | None) -> None:
    """List issued certificates: serial, host, edition, expiry, state.

    \b
    Example:
      snapshotter pki list
    """
    now = utcnow()
    rows = _pki(state, pki_dir).list()
    click.echo(f"{'SERIAL':<40}  {'HOST':<24} {'EDITION':<12} {'EXPIRES':<10}  STATE")
    for c in rows:
        if c.revoked is not None:
            st = f"revoked {c.revoked:%Y-%m-%d}"
        elif c.expired(now):
            st = "expired"
        else:
            st = "valid"
        edition = c.edition if c.kind == "client" else "(server)"
        click.echo(f"{c.serial:<40}  {c.host:<24} {edition:<12} {c.not_after:%Y-%m-%d}  {st}")


@click.group("web-config")
def web_config_group() -> None:
    """Web server configuration for the binhost endpoints ([[tls.endpoints]], docs/tls.md).

    \b
    Example:
      snapshotter web-config lighttpd --out /etc/lighttpd/snapshotter.conf
    """


@web_config_group.command("lighttpd")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the configuration here (replaced atomically). Default: standard output.")
@click.option("--user", default=DEFAULT_USER, show_default=True,
              help="server.username lighttpd drops to after reading the certificates; '' keeps root.")
@click.option("--group", default=DEFAULT_USER, show_default=True, help="server.groupname; '' for none.")
@click.option("--pid-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="server.pid-file (not needed under systemd with lighttpd -D).")
@pass_state
def lighttpd_cmd(state: State, out: Path | None, user: str, group: str, pid_file: Path | None) -> None:
    """Write the lighttpd configuration: one TLS endpoint per [[tls.endpoints]].

    Each endpoint listens on its IP:port, requires a client certificate of its edition's client CA (and
    checks that CA's CRL), serves WEB_ROOT/EDITION/PROFILE and logs each request with the certificate's
    CN as the user. Check it with `lighttpd -tt -f FILE`.

    \b
    Example:
      snapshotter web-config lighttpd --out /etc/lighttpd/snapshotter.conf
      lighttpd -tt -f /etc/lighttpd/snapshotter.conf && systemctl restart snapshotter-lighttpd
    """
    opts = LighttpdOptions(user=user or None, group=group or None, pid_file=pid_file)
    result = render(state.config, opts)
    for w in result.warnings:
        click.echo(f"snapshotter: warning: {w}", err=True)
    if out is None:
        sys.stdout.write(result.text)
        return
    atomic_write(out, result.text.encode(), mode=0o644, durable=True)
    for ep in result.endpoints:
        click.echo(f"endpoint {ep.profile}/{ep.edition} on {ep.listen}")
    click.echo(f"wrote {out}")


COMMANDS = [pki_group, web_config_group]
