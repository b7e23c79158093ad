"""The real lighttpd with the configuration `snapshotter web-config lighttpd` writes: two profiles x two
editions, each its own endpoint on 127.0.0.x. Only a certificate of the endpoint's edition gets in; the
other edition's, none, a revoked, an expired and a foreign CA's are refused at the TLS handshake; the
access log names the host; promotion (switching the document root symlink) needs no reload, revocation
needs a restart."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import lighttpd, testlib

from snapshotter import config
from snapshotter.binhost.lighttpd import LighttpdOptions, access_log, render
from snapshotter.binhost.pki import Pki

PROFILES = ("basic", "desktop")
EDITIONS = ("testing", "production")


@dataclass
class Site:
    cfg: config.Config
    conf: Path
    server: lighttpd.Lighttpd
    pki: Pki
    certs: Path  # certs/<name>/{client.key,client.crt,server-ca.crt}
    endpoints: dict[tuple[str, str], tuple[str, int]]  # (profile, edition) -> (ip, port)

    def client(self, name: str) -> dict[str, Path]:
        d = self.certs / name
        return {"ca": d / "server-ca.crt", "cert": d / "client.crt", "key": d / "client.key"}

    @property
    def server_ca(self) -> Path:
        return self.pki.server_ca_cert()


def _switch(link: Path, target: str) -> None:
    """Point the document root symlink `link` at `target` atomically (as a promotion does)."""
    tmp = link.with_name(f".{link.name}.new")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _config_text(root: Path, endpoints: dict[tuple[str, str], tuple[str, int]]) -> str:
    lines = [f'[binhost]\nweb_root = "{root / "www"}"\n',
             f'[tls]\npki_dir = "{root / "pki"}"\naccess_log_dir = "{root / "logs"}"\n']
    for (profile, edition), (ip, port) in endpoints.items():
        lines.append(f'[[tls.endpoints]]\nprofile = "{profile}"\nedition = "{edition}"\nlisten = "{ip}:{port}"\n')
    return "\n".join(lines)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    lighttpd.require_lighttpd()
    root = tmp_path_factory.mktemp("lighttpd")
    # Document roots as the delivery part makes them: WEB_ROOT/EDITION/PROFILE is a symlink.
    www = root / "www"
    endpoints: dict[tuple[str, str], tuple[str, int]] = {}
    n = 2
    for profile in PROFILES:
        for edition in EDITIONS:
            for build in ("build1", "build2"):
                testlib.write_tree(www / ".roots" / f"{profile}-{edition}-{build}",
                                   {"which.txt": f"{profile} {edition} {build}\n"})
            (www / edition).mkdir(exist_ok=True)
            _switch(www / edition / profile, f"../.roots/{profile}-{edition}-build1")
            ip = f"127.0.0.{n}"
            endpoints[profile, edition] = (ip, lighttpd.free_port(ip))
            n += 1
    (root / "logs").mkdir()
    cfg_path = root / "snapshotter.toml"
    cfg_path.write_text(_config_text(root, endpoints))
    cfg = config.load(cfg_path)

    pki = Pki(cfg.tls.pki_dir)
    pki.init(list(EDITIONS))
    pki.issue_server("binhost", ips=[ip for ip, _ in endpoints.values()], dns=["localhost"])
    certs = root / "certs"
    now = dt.datetime.now(dt.UTC)
    for edition in EDITIONS:
        pki.issue_client(f"host-{edition}", edition, certs / f"host-{edition}")
        pki.issue_client(f"revoked-{edition}", edition, certs / f"revoked-{edition}")
        pki.revoke(f"revoked-{edition}", edition)
        # valid for one day, ten days ago
        pki.issue_client(f"expired-{edition}", edition, certs / f"expired-{edition}",
                         days=1, not_before=now - dt.timedelta(days=10))
    foreign = Pki(root / "foreign-pki")
    foreign.init(list(EDITIONS))
    foreign.issue_client("host-testing", "testing", certs / "foreign")  # same CN, another CA

    conf = root / "lighttpd.conf"
    conf.write_text(render(cfg, LighttpdOptions(user=None, group=None)).text)
    server = lighttpd.Lighttpd(conf, list(endpoints.values()))
    server.start()
    try:
        yield Site(cfg=cfg, conf=conf, server=server, pki=pki, certs=certs, endpoints=endpoints)
    finally:
        server.stop()


def test_the_generated_configuration_passes_lighttpd_tt(site: Site) -> None:
    result = lighttpd.check_config(site.conf)
    assert result.returncode == 0, result.stderr
    text = site.conf.read_text()
    assert text.count('$SERVER["socket"] ==') == 4
    assert text == render(site.cfg, LighttpdOptions(user=None, group=None)).text  # same input, same bytes


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("edition", EDITIONS)
def test_the_editions_certificate_gets_its_document_root(site: Site, profile: str, edition: str) -> None:
    ip, port = site.endpoints[profile, edition]
    resp = lighttpd.https_get(ip, port, "/which.txt", **site.client(f"host-{edition}"))
    assert (resp.status, resp.body) == (200, f"{profile} {edition} build1\n".encode())
    assert lighttpd.https_get(ip, port, "/missing", **site.client(f"host-{edition}")).status == 404


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("edition", EDITIONS)
def test_every_other_client_is_refused_at_the_handshake(site: Site, profile: str, edition: str) -> None:
    ip, port = site.endpoints[profile, edition]
    other = "production" if edition == "testing" else "testing"
    refusal = lighttpd.refusal
    assert refusal(ip, port, "/which.txt", **site.client(f"host-{other}")) == "TLSV1_ALERT_UNKNOWN_CA"
    assert refusal(ip, port, "/which.txt", ca=site.server_ca) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert refusal(ip, port, "/which.txt", **site.client(f"revoked-{edition}")) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    assert refusal(ip, port, "/which.txt", **site.client(f"expired-{edition}")) == "SSLV3_ALERT_CERTIFICATE_EXPIRED"
    # a certificate of another CA with the right CN (its bundle would not trust our server: use ours)
    foreign = {**site.client("foreign"), "ca": site.server_ca}
    assert refusal(ip, port, "/which.txt", **foreign) == "TLSV1_ALERT_UNKNOWN_CA"


def test_wget_with_the_client_certificate(site: Site) -> None:
    """What clients use (binrepos.conf fetchcommand, FETCHCOMMAND): wget with an EC key (GnuTLS here)."""
    ip, port = site.endpoints["basic", "production"]
    c = site.client("host-production")
    args = ["wget", "-q", "-O", "-", "--tries=1", "--timeout=20", f"--ca-certificate={c['ca']}",
            f"--certificate={c['cert']}", f"--private-key={c['key']}", f"https://{ip}:{port}/which.txt"]
    ok = subprocess.run(args, capture_output=True, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, b"basic production build1\n"), ok.stderr
    c = site.client("host-testing")
    args[5:8] = [f"--ca-certificate={c['ca']}", f"--certificate={c['cert']}", f"--private-key={c['key']}"]
    refused = subprocess.run(args, capture_output=True, timeout=60)
    assert refused.returncode != 0 and refused.stdout == b""


def test_the_access_log_names_the_host(site: Site) -> None:
    for (profile, edition), (ip, port) in site.endpoints.items():
        assert lighttpd.https_get(ip, port, f"/which.txt?{profile}", **site.client(f"host-{edition}")).status == 200
    # A line is written when its request ends, which can be just after the client has the response:
    # once lighttpd has stopped, every line is there.
    site.server.restart()
    for (profile, edition) in site.endpoints:
        lines = access_log(site.cfg, site.cfg.tls.endpoints[0]).parent.joinpath(
            f"snapshotter-{profile}-{edition}.access.log").read_text().splitlines()
        mine = [line for line in lines if f"GET /which.txt?{profile} " in line]
        assert mine and all(line.split()[1] == f"host-{edition}" for line in mine), lines
        # refused clients never reach HTTP, so they are never logged as a user
        assert not any(line.split()[1].startswith(("revoked-", "expired-")) for line in lines), lines
        other = "production" if edition == "testing" else "testing"
        assert not any(line.split()[1] == f"host-{other}" for line in lines), lines


def test_promotion_needs_no_reload(site: Site) -> None:
    ip, port = site.endpoints["desktop", "production"]
    root = site.cfg.binhost.web_root
    assert root is not None
    link = root / "production" / "desktop"
    _switch(link, "../.roots/desktop-production-build2")
    try:
        resp = lighttpd.https_get(ip, port, "/which.txt", **site.client("host-production"))
        assert resp.body == b"desktop production build2\n"
    finally:
        _switch(link, "../.roots/desktop-production-build1")
    resp = lighttpd.https_get(ip, port, "/which.txt", **site.client("host-production"))
    assert resp.body == b"desktop production build1\n"


def test_a_revocation_applies_after_a_restart(site: Site) -> None:
    ip, port = site.endpoints["basic", "testing"]
    site.pki.issue_client("late-host", "testing", site.certs / "late-host")
    site.server.restart()
    assert lighttpd.https_get(ip, port, "/which.txt", **site.client("late-host")).status == 200
    site.pki.revoke("late-host", "testing")
    site.server.restart()
    assert lighttpd.refusal(ip, port, "/which.txt", **site.client("late-host")) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    # the other hosts of the edition are unaffected
    assert lighttpd.https_get(ip, port, "/which.txt", **site.client("host-testing")).status == 200
