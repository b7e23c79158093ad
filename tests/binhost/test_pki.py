"""snapshotter.binhost.pki and `snapshotter pki ...`: CAs, server and client certificates, revocation,
the list, file modes, no writes through symlinks, and one-line errors."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import testlib

from snapshotter.binhost.pki import Pki, PkiError


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    p = Pki(tmp_path / "etc" / "pki")
    p.init(["testing", "production"])
    return p


def test_init_creates_root_only_cas_and_never_replaces_them(tmp_path: Path, pki: Pki) -> None:
    assert mode(pki.root) == 0o700
    keys = [pki.root / "server-ca" / "ca.key", *(pki.client_ca_dir(e) / "ca.key" for e in ("testing", "production"))]
    for key in keys:
        assert mode(key) == 0o600 and mode(key.parent) == 0o700
    server_ca = load_cert(pki.server_ca_cert())
    assert server_ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for edition in ("testing", "production"):
        ca = load_cert(pki.client_ca_cert(edition))
        assert edition in ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        crl = x509.load_pem_x509_crl(pki.crl(edition).read_bytes())
        assert crl.is_signature_valid(ca.public_key()) and len(crl) == 0
    before = {k: k.read_bytes() for k in keys}
    report = pki.init(["testing", "production", "lts"])
    assert report.created == ["client CA lts"]
    assert report.existing == ["server CA", "client CA testing", "client CA production"]
    assert {k: k.read_bytes() for k in keys} == before
    assert pki.editions() == ["lts", "production", "testing"]


def test_a_pki_dir_others_can_enter_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    with pytest.raises(PkiError, match=r"mode 0755 lets others in; it must be 0700"):
        Pki(root).init(["testing"])
    assert list(root.iterdir()) == []


def test_client_certificate_files_and_contents(tmp_path: Path, pki: Pki) -> None:
    out = tmp_path / "web01"
    c = pki.issue_client("web01", "production", out, days=30)
    assert sorted(p.name for p in out.iterdir()) == ["client.crt", "client.key", "server-ca.crt"]
    assert mode(out) == 0o700 and mode(c.key) == 0o600 and mode(c.cert) == 0o644
    assert c.server_ca.read_bytes() == pki.server_ca_cert().read_bytes()
    cert = load_cert(c.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web01"
    cert.verify_directly_issued_by(load_cert(pki.client_ca_cert("production")))
    with pytest.raises(ValueError):  # not the testing CA's
        cert.verify_directly_issued_by(load_cert(pki.client_ca_cert("testing")))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30)
    assert f"{cert.serial_number:x}" == c.serial
    # the key is the certificate's, and it exists only in OUT
    key_pem = c.key.read_bytes()
    assert b"PRIVATE KEY" in key_pem
    for path in pki.root.rglob("*"):
        if path.is_file():
            assert path.read_bytes() != key_pem


def test_issue_client_refuses_existing_files_and_symlinks(tmp_path: Path, pki: Pki) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (out / "client.key").symlink_to(victim)
    with pytest.raises(PkiError, match="client.key already exists"):
        pki.issue_client("web01", "testing", out)
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["client.key"]
    assert pki.list() == []  # nothing issued
    with pytest.raises(PkiError, match="no client CA for edition 'beta'"):
        pki.issue_client("web01", "beta", tmp_path / "b")
    with pytest.raises(PkiError, match="not a valid host name"):
        pki.issue_client("../web01", "testing", tmp_path / "c")


def test_server_certificate_names_the_addresses_and_carries_the_chain(pki: Pki) -> None:
    s = pki.issue_server("binhost", ips=["10.0.0.5", "fd00::5"], dns=["binhost.example.org"])
    assert mode(s.key) == 0o600
    cert = load_cert(s.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "fd00::5"]
    assert san.get_values_for_type(x509.DNSName) == ["binhost.example.org"]
    chain = x509.load_pem_x509_certificates(s.chain.read_bytes())
    assert chain == [cert, load_cert(pki.server_ca_cert())]
    cert.verify_directly_issued_by(chain[1])
    renewed = pki.issue_server("binhost", ips=["10.0.0.5"], dns=[])
    assert renewed.serial != s.serial and load_cert(renewed.cert).serial_number != cert.serial_number
    for bad, message in ((dict(ips=[], dns=[]), "at least one --ip or --dns"),
                         (dict(ips=["10.0.0.300"], dns=[]), "--ip: not an IP address"),
                         (dict(ips=[], dns=["-x.org"]), "--dns: not a DNS name")):
        with pytest.raises(PkiError, match=message):
            pki.issue_server("binhost", **bad)  # type: ignore[arg-type]


def test_revoke_regenerates_the_crl_and_list_shows_it(tmp_path: Path, pki: Pki) -> None:
    a = pki.issue_client("web01", "testing", tmp_path / "a")
    b = pki.issue_client("web01", "testing", tmp_path / "b")  # a renewal: both are revoked
    keep = pki.issue_client("web02", "testing", tmp_path / "c")
    prod = pki.issue_client("web01", "production", tmp_path / "d")
    assert prod.notes and "also holds a valid testing certificate" in prod.notes[0]
    assert sorted(pki.revoke("web01", "testing")) == sorted([a.serial, b.serial])
    crl = x509.load_pem_x509_crl(pki.crl("testing").read_bytes())
    assert crl.is_signature_valid(load_cert(pki.client_ca_cert("testing")).public_key())
    assert sorted(f"{r.serial_number:x}" for r in crl) == sorted([a.serial, b.serial])
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert crl.next_update_utc is not None and crl.next_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=3000)
    assert len(x509.load_pem_x509_crl(pki.crl("production").read_bytes())) == 0
    with pytest.raises(PkiError, match="no certificate of web01 in edition testing that is not revoked already"):
        pki.revoke("web01", "testing")
    # --serial: only that one (the old certificate after a renewal)
    old = pki.issue_client("web02", "testing", tmp_path / "e")
    with pytest.raises(PkiError, match=f"no certificate {a.serial} of web02 in edition testing"):
        pki.revoke("web02", "testing", serial=a.serial)
    assert pki.revoke("web02", "testing", serial=old.serial) == [old.serial]
    crl = x509.load_pem_x509_crl(pki.crl("testing").read_bytes())
    assert sorted(f"{r.serial_number:x}" for r in crl) == sorted([a.serial, b.serial, old.serial])
    rows = {(c.host, c.edition, c.serial): c for c in pki.list()}
    assert rows["web01", "testing", a.serial].revoked is not None
    assert rows["web02", "testing", keep.serial].revoked is None
    assert rows["web01", "production", prod.serial].revoked is None


def test_backdated_certificates_are_listed_as_expired(tmp_path: Path, pki: Pki) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    c = pki.issue_client("old", "testing", tmp_path / "old", days=2, not_before=past)
    (info,) = [i for i in pki.list() if i.serial == c.serial]
    assert info.expired(dt.datetime.now(dt.UTC)) and info.not_after < dt.datetime.now(dt.UTC)


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "snapshotter.toml"
    path.write_text(f'[tls]\npki_dir = "{tmp_path / "pki"}"\n')
    return path


def test_cli(tmp_path: Path) -> None:
    conf = write_config(tmp_path)

    def cli(*args: str):
        return testlib.run_cli("--config", str(conf), "pki", *args, cwd=tmp_path)

    r = cli("issue-client", "web01", "--edition", "testing")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("snapshotter: error: no PKI at") and "snapshotter pki init" in r.stderr

    r = cli("init")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["created server CA", "created client CA testing", "created client CA production"]
    r = cli("init")
    assert r.returncode == 0 and "kept existing server CA (a CA is never replaced)" in r.stdout

    r = cli("issue-server", "binhost", "--ip", "127.0.0.2", "--dns", "localhost")
    assert r.returncode == 0 and "issued server certificate binhost" in r.stdout
    r = cli("issue-client", "web01", "--edition", "production")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "web01.production" / "client.crt").is_file()
    r = cli("issue-client", "web01", "--edition", "production")
    assert r.returncode == 1 and "already exists" in r.stderr and r.stderr.count("\n") == 1
    r = cli("issue-client", "web01", "--edition", "beta", "--out", "x")
    assert r.returncode == 1 and "--edition: 'beta' is not one of binhost.editions" in r.stderr

    r = cli("revoke", "web01", "--edition", "production")
    assert r.returncode == 0 and "revoked production certificate of web01" in r.stdout
    assert "restart lighttpd" in r.stdout
    r = cli("revoke", "web01", "--edition", "production")
    assert r.returncode == 1 and r.stderr.count("\n") == 1

    r = cli("list")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["SERIAL", "HOST", "EDITION", "EXPIRES", "STATE"]
    client = [line.split() for line in lines if " web01 " in line]
    assert len(client) == 1 and client[0][2] == "production" and client[0][4] == "revoked"
    assert any(line.split()[1:3] == ["binhost", "(server)"] for line in lines)
    for command in ("init", "issue-server", "issue-client", "revoke", "list"):
        help_text = cli(command, "--help").stdout
        assert "Example:" in help_text and f"snapshotter pki {command}" in help_text


def test_an_interrupted_init_is_completed(tmp_path: Path) -> None:
    """A CA is made in .NAME.new and renamed into place: what an interrupted init left is never used."""
    pki = Pki(tmp_path / "pki")
    pki.init(["testing"])
    left = pki.root / "clients" / ".production.new"
    (left / "issued").mkdir(parents=True)
    (left / "ca.key").write_text("half-written")
    assert pki.editions() == ["testing"]
    assert pki.init(["testing", "production"]).created == ["client CA production"]
    assert not left.exists()
    load_cert(pki.client_ca_cert("production")).verify_directly_issued_by(load_cert(pki.client_ca_cert("production")))
