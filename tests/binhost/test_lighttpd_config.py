"""`snapshotter web-config lighttpd`: the file it writes passes `lighttpd -tt`, is the same for the same
configuration, and a configuration it cannot serve is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import lighttpd, testlib

from snapshotter.binhost.pki import Pki

ENDPOINTS = """
[[tls.endpoints]]
profile = "basic"
edition = "testing"
listen = "127.0.0.2:18443"
[[tls.endpoints]]
profile = "basic"
edition = "production"
listen = "127.0.0.3:18443"
[[tls.endpoints]]
profile = "basic"
edition = "lts"
listen = "[::1]:18443"
server_cert = "v6"
"""


def write_config(tmp_path: Path, endpoints: str = ENDPOINTS, web_root: str | None = "www") -> Path:
    path = tmp_path / "snapshotter.toml"
    binhost = '[binhost]\neditions = ["testing", "production", "lts"]\n'
    if web_root is not None:
        binhost += f'web_root = "{web_root}"\n'
    path.write_text(f'{binhost}\n[tls]\npki_dir = "pki"\naccess_log_dir = "logs"\n{endpoints}')
    return path


def web_config(conf: Path, *args: str):
    return testlib.run_cli("--config", str(conf), "web-config", "lighttpd", *args)


@pytest.fixture
def ready(tmp_path: Path) -> Path:
    """A configuration whose PKI has the CAs and both server certificates."""
    conf = write_config(tmp_path)
    pki = Pki(tmp_path / "pki")
    pki.init(["testing", "production", "lts"])
    pki.issue_server("binhost", ips=["127.0.0.2", "127.0.0.3"], dns=[])
    pki.issue_server("v6", ips=["::1"], dns=[])
    (tmp_path / "logs").mkdir()
    return conf


def test_the_written_file_passes_lighttpd_tt_and_is_reproducible(tmp_path: Path, ready: Path) -> None:
    lighttpd.require_lighttpd()
    out = tmp_path / "lighttpd.conf"
    r = web_config(ready, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # the server certificates name every endpoint's address: no warning
    assert r.stdout.splitlines() == ["endpoint basic/testing on 127.0.0.2:18443",
                                     "endpoint basic/production on 127.0.0.3:18443",
                                     "endpoint basic/lts on [::1]:18443", f"wrote {out}"]
    check = lighttpd.check_config(out)
    assert check.returncode == 0, check.stderr
    text = out.read_text()
    assert 'server.username = "www-data"' in text
    assert f'server.document-root = "{tmp_path}/www/lts/basic"' in text
    assert f'ssl.verifyclient.ca-file = "{tmp_path}/pki/clients/production/ca.crt"' in text
    assert f'ssl.pemfile = "{tmp_path}/pki/servers/v6/chain.pem"' in text
    assert f'accesslog.filename = "{tmp_path}/logs/snapshotter-basic-testing.access.log"' in text
    # the same configuration gives the same bytes, on standard output too
    stdout = web_config(ready)
    assert stdout.returncode == 0 and stdout.stdout == text
    assert web_config(ready, "--out", str(out)).returncode == 0 and out.read_text() == text
    no_user = web_config(ready, "--user", "", "--group", "").stdout
    assert "server.username" not in no_user and "server.groupname" not in no_user


def test_a_certificate_without_the_endpoints_address_is_a_warning(tmp_path: Path, ready: Path) -> None:
    Pki(tmp_path / "pki").issue_server("binhost", ips=["127.0.0.2"], dns=["binhost.example.org"])
    r = web_config(ready)
    assert r.returncode == 0
    assert r.stderr == ("snapshotter: warning: server certificate 'binhost' does not name 127.0.0.3 (endpoint "
                        "basic/production): clients must connect by one of its DNS names, or reissue it with "
                        "--ip 127.0.0.3\n")


@pytest.mark.parametrize("case, message", [
    ("no endpoints", "tls.endpoints: no endpoints configured"),
    ("no web_root", "binhost.web_root: not set"),
    ("no pki", "no server certificate 'binhost' in"),
    ("quote in a path", "has a character lighttpd's configuration cannot hold"),
])
def test_what_cannot_be_served_is_one_line(tmp_path: Path, case: str, message: str) -> None:
    conf = write_config(tmp_path, endpoints="" if case == "no endpoints" else ENDPOINTS,
                        web_root={"no web_root": None, "quote in a path": 'w\\"w'}.get(case, "www"))
    if case == "quote in a path":
        pki = Pki(tmp_path / "pki")
        pki.init(["testing", "production", "lts"])
        pki.issue_server("binhost", ips=["127.0.0.2", "127.0.0.3"], dns=[])
        pki.issue_server("v6", ips=["::1"], dns=[])
    out = tmp_path / "lighttpd.conf"
    r = web_config(conf, "--out", str(out))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("snapshotter: error: ") and message in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()
