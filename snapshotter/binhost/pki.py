"""The certificates of the binhost endpoints (docs/tls.md): one server CA, one client CA per edition.

Layout of the PKI directory (`[tls] pki_dir`, root only, 0700):

    server-ca/ca.key ca.crt               signs the endpoints' server certificates
    servers/NAME/key.pem cert.pem chain.pem
                                          a server certificate; chain.pem = cert + server CA (ssl.pemfile)
    clients/EDITION/ca.key ca.crt crl.pem the client CA of one edition and its revocation list
    clients/EDITION/issued/SERIAL.pem     every client certificate it issued (the source of `pki list`)
    clients/EDITION/revoked.json          {"SERIAL": "revocation time"}, the source of crl.pem

Keys are 0600, created with O_CREAT|O_EXCL|O_NOFOLLOW (never through a planted symlink); CA keys are
only ever read from here. A client's key is written into the output directory of `issue_client` only.
Mutating operations hold `.lock` in the directory. Everything is built with `cryptography`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from snapshotter.errors import SnapshotterError
from snapshotter.fsutil import atomic_write, fsync_dir
from snapshotter.lock import flocked

CA_DAYS = 3650
SERVER_DAYS = 825
CLIENT_DAYS = 365
# A host name as it appears in a certificate's CN (and in the access log): at most 64 characters.
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SERIAL_RE = re.compile(r"^[0-9a-f]{1,40}$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_RE = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*$")

SERVER_CA_DIR = "server-ca"
SERVERS_DIR = "servers"
CLIENTS_DIR = "clients"
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CRL = "crl.pem"
ISSUED_DIR = "issued"
REVOKED = "revoked.json"

# What `issue_client` writes into its output directory (what a client host needs).
CLIENT_KEY = "client.key"
CLIENT_CERT = "client.crt"
CLIENT_SERVER_CA = "server-ca.crt"

PrivateKey = ec.EllipticCurvePrivateKey


class PkiError(SnapshotterError):
    """A PKI operation is impossible (missing CA, unknown edition, unsafe directory, ...)."""


@dataclass
class InitReport:
    created: list[str] = field(default_factory=list)  # "server CA", "client CA testing", ...
    existing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ServerCert:
    name: str
    serial: str
    not_after: dt.datetime
    key: Path
    cert: Path
    chain: Path  # cert + server CA: lighttpd's ssl.pemfile


@dataclass(frozen=True)
class ClientCert:
    host: str
    edition: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    key: Path
    cert: Path
    server_ca: Path
    notes: tuple[str, ...] = ()  # e.g. the host also holds a valid certificate of another edition


@dataclass(frozen=True)
class CertInfo:
    """One line of `pki list`."""

    serial: str
    host: str
    edition: str  # "" for a server certificate
    kind: str  # "client" | "server"
    not_after: dt.datetime
    revoked: dt.datetime | None

    def expired(self, now: dt.datetime) -> bool:
        return self.not_after < now


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def serial_hex(serial: int) -> str:
    return f"{serial:x}"


def check_host(host: str) -> str:
    if not HOST_RE.match(host) or ".." in host:
        raise PkiError(f"not a valid host name for a certificate: {host!r} (letters, digits, '.', '_', '-'; "
                       "at most 64 characters)")
    return host


# ---- files: never through a symlink, keys 0600 ----

def _check_private_dir(path: Path, what: str) -> None:
    """`path` is a real directory (not a symlink), owned by us, with no group or other permissions."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise PkiError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PkiError(f"{what} {path}: not a directory (a symlink or a file)")
    if st.st_uid != os.geteuid():
        raise PkiError(f"{what} {path}: owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        raise PkiError(f"{what} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others in; "
                       f"it must be 0700 (chmod 0700 {path})")


def _mkdir_private(path: Path, what: str) -> None:
    """Create `path` 0700 if missing (parents with the usual mode); check it either way."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    _check_private_dir(path, what)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` exclusively (O_EXCL|O_NOFOLLOW) with exactly `mode`, write and fsync it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise PkiError(f"{path} already exists") from None
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _read(path: Path) -> bytes:
    """Read a file of the PKI without following a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise PkiError(f"{path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


# ---- keys, names, certificates ----

def _new_key() -> PrivateKey:
    # EC P-256: accepted by lighttpd/OpenSSL, curl, wget (GnuTLS and OpenSSL builds) and Python's ssl.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "portage-snapshotter"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _window(not_before: dt.datetime | None, days: int) -> tuple[dt.datetime, dt.datetime]:
    start = not_before if not_before is not None else utcnow()
    return start, start + dt.timedelta(days=days)


def _make_ca(cn: str, days: int, now: dt.datetime | None = None) -> tuple[PrivateKey, x509.Certificate]:
    key = _new_key()
    start, end = _window(now, days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: PrivateKey, ca_cert: x509.Certificate, cn: str, *, server: bool,
          ips: Sequence[str] = (), dns: Sequence[str] = (), days: int,
          not_before: dt.datetime | None = None) -> tuple[PrivateKey, x509.Certificate]:
    key = _new_key()
    start, end = _window(not_before, days)
    # Never beyond the CA: a verifier would refuse the chain once the CA has expired anyway.
    end = min(end, ca_cert.not_valid_after_utc)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server:
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        names += [x509.DNSName(d) for d in dns]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode()


# ---- the PKI directory ----

class Pki:
    """The PKI directory `root` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # paths
    def server_ca_dir(self) -> Path:
        return self.root / SERVER_CA_DIR

    def server_ca_cert(self) -> Path:
        return self.server_ca_dir() / CA_CERT

    def server_dir(self, name: str) -> Path:
        return self.root / SERVERS_DIR / check_host(name)

    def client_ca_dir(self, edition: str) -> Path:
        return self.root / CLIENTS_DIR / edition

    def client_ca_cert(self, edition: str) -> Path:
        return self.client_ca_dir(edition) / CA_CERT

    def crl(self, edition: str) -> Path:
        return self.client_ca_dir(edition) / CRL

    def server_chain(self, name: str) -> Path:
        return self.server_dir(name) / "chain.pem"

    def server_key(self, name: str) -> Path:
        return self.server_dir(name) / "key.pem"

    # state checks
    def _require_root(self) -> None:
        if not os.path.lexists(self.root):
            raise PkiError(f"no PKI at {self.root}: run `snapshotter pki init` first")
        _check_private_dir(self.root, "pki_dir")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with flocked(self.root / ".lock", f"the PKI {self.root}", wait=30.0):
            yield

    def _load_ca(self, directory: Path, what: str) -> tuple[PrivateKey, x509.Certificate]:
        try:
            key_pem = _read(directory / CA_KEY)
            cert_pem = _read(directory / CA_CERT)
        except FileNotFoundError:
            raise PkiError(f"no {what} in {self.root}: run `snapshotter pki init`") from None
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, PrivateKey):
            raise PkiError(f"{directory / CA_KEY}: not an EC private key")
        return key, x509.load_pem_x509_certificate(cert_pem)

    def _require_edition(self, edition: str) -> None:
        if not os.path.lexists(self.client_ca_dir(edition)):
            known = self.editions()
            raise PkiError(f"no client CA for edition {edition!r} in {self.root} "
                           f"(have: {', '.join(known) or 'none'}); run `snapshotter pki init` after adding it "
                           "to binhost.editions")

    def editions(self) -> list[str]:
        """The editions that have a client CA."""
        d = self.root / CLIENTS_DIR
        try:
            return sorted(e.name for e in d.iterdir() if (e / CA_CERT).is_file())
        except FileNotFoundError:
            return []

    # operations
    def init(self, editions: Sequence[str], *, now: dt.datetime | None = None) -> InitReport:
        """Create the server CA and a client CA (with an empty CRL) for each edition that has none.

        An existing CA is never replaced: it is reported in `existing`.
        """
        _mkdir_private(self.root, "pki_dir")
        report = InitReport()
        with self._locked():
            for sub in (SERVERS_DIR, CLIENTS_DIR):
                _mkdir_private(self.root / sub, "pki_dir")
            if self._new_ca_dir(self.server_ca_dir(), "snapshotter server CA", now):
                report.created.append("server CA")
            else:
                report.existing.append("server CA")
            for edition in editions:
                what = f"client CA {edition}"
                if self._new_ca_dir(self.client_ca_dir(edition), f"snapshotter client CA {edition}", now):
                    report.created.append(what)
                else:
                    report.existing.append(what)
        return report

    def _new_ca_dir(self, final: Path, cn: str, now: dt.datetime | None) -> bool:
        """Make a CA in a fresh temporary directory and rename it to `final`; False if `final` exists."""
        if os.path.lexists(final):
            _check_private_dir(final, "CA directory")
            return False
        tmp = final.with_name(f".{final.name}.new")
        if os.path.lexists(tmp):  # left by an interrupted init: never used, so safe to remove
            shutil.rmtree(tmp)
        os.mkdir(tmp, 0o700)
        key, cert = _make_ca(cn, CA_DAYS, now)
        _write_new(tmp / CA_KEY, _key_pem(key), 0o600)
        _write_new(tmp / CA_CERT, _cert_pem(cert), 0o644)
        if final.parent.name == CLIENTS_DIR:
            os.mkdir(tmp / ISSUED_DIR, 0o700)
            _write_new(tmp / REVOKED, b"{}\n", 0o600)
            _write_new(tmp / CRL, self._crl_pem(key, cert, {}, 1, now), 0o644)
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return True

    def issue_server(self, name: str, *, ips: Sequence[str], dns: Sequence[str], days: int = SERVER_DAYS,
                     not_before: dt.datetime | None = None) -> ServerCert:
        """Issue (or renew) the server certificate NAME for these IP addresses and DNS names."""
        check_host(name)
        if not ips and not dns:
            raise PkiError("a server certificate needs at least one --ip or --dns")
        for i in ips:
            try:
                ipaddress.ip_address(i)
            except ValueError:
                raise PkiError(f"--ip: not an IP address: {i!r}") from None
        for dns_name in dns:
            if not DNS_RE.match(dns_name):
                raise PkiError(f"--dns: not a DNS name: {dns_name!r}")
        if days < 1:
            raise PkiError(f"--days: must be at least 1, got {days}")
        self._require_root()
        with self._locked():
            ca_key, ca_cert = self._load_ca(self.server_ca_dir(), "server CA")
            key, cert = _leaf(ca_key, ca_cert, name, server=True, ips=ips, dns=dns, days=days,
                              not_before=not_before)
            d = self.server_dir(name)
            _mkdir_private(d, "server certificate directory")
            # The key goes last: newer lighttpd versions re-read the pair when the key file changes.
            atomic_write(d / "cert.pem", _cert_pem(cert), mode=0o644, durable=True)
            atomic_write(d / "chain.pem", _cert_pem(cert) + _cert_pem(ca_cert), mode=0o644, durable=True)
            atomic_write(d / "key.pem", _key_pem(key), mode=0o600, durable=True)
        return ServerCert(name=name, serial=serial_hex(cert.serial_number), not_after=cert.not_valid_after_utc,
                          key=d / "key.pem", cert=d / "cert.pem", chain=d / "chain.pem")

    def issue_client(self, host: str, edition: str, out: Path, *, days: int = CLIENT_DAYS,
                     not_before: dt.datetime | None = None) -> ClientCert:
        """Issue a client certificate (CN = host) of `edition`'s client CA.

        Writes `client.key` (0600), `client.crt` and `server-ca.crt` (what the host needs to check the
        server) into `out` (created 0700 if missing; the three files must not exist). `not_before` moves
        the validity window (tests make expired certificates with it); the default is now.
        """
        check_host(host)
        if days < 1:
            raise PkiError(f"--days: must be at least 1, got {days}")
        self._require_root()
        self._require_edition(edition)
        files = [out / CLIENT_KEY, out / CLIENT_CERT, out / CLIENT_SERVER_CA]
        with self._locked():
            ca_key, ca_cert = self._load_ca(self.client_ca_dir(edition), f"client CA {edition}")
            try:
                server_ca = _read(self.server_ca_cert())
            except FileNotFoundError:
                raise PkiError(f"no server CA in {self.root}: run `snapshotter pki init`") from None
            if os.path.lexists(out) and not (os.path.isdir(out) and not os.path.islink(out)):
                raise PkiError(f"--out {out}: not a directory (or a symlink to one)")
            for f in files:
                if os.path.lexists(f):
                    raise PkiError(f"{f} already exists: give an empty or new --out directory")
            notes = self._other_editions_note(host, edition)
            key, cert = _leaf(ca_key, ca_cert, host, server=False, days=days, not_before=not_before)
            if not os.path.lexists(out):
                out.mkdir(mode=0o700, parents=True)
            written: list[Path] = []
            try:
                for path, data, mode in ((files[0], _key_pem(key), 0o600), (files[1], _cert_pem(cert), 0o644),
                                         (files[2], server_ca, 0o644)):
                    _write_new(path, data, mode)
                    written.append(path)
                serial = serial_hex(cert.serial_number)
                _write_new(self.client_ca_dir(edition) / ISSUED_DIR / f"{serial}.pem", _cert_pem(cert), 0o644)
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise
        return ClientCert(host=host, edition=edition, serial=serial, not_before=cert.not_valid_before_utc,
                          not_after=cert.not_valid_after_utc, key=files[0], cert=files[1], server_ca=files[2],
                          notes=notes)

    def _other_editions_note(self, host: str, edition: str) -> tuple[str, ...]:
        now = utcnow()
        notes = []
        for info in self.list():
            if (info.kind == "client" and info.edition != edition and info.host.lower() == host.lower()
                    and info.revoked is None and not info.expired(now)):
                notes.append(f"{host} also holds a valid {info.edition} certificate (serial {info.serial}); "
                             f"if it moves to {edition}, run: snapshotter pki revoke {host} --edition {info.edition}")
        return tuple(notes)

    def revoke(self, host: str, edition: str, *, serial: str | None = None,
               now: dt.datetime | None = None) -> list[str]:
        """Revoke every not yet revoked certificate of `host` in `edition` (only `serial`, when given, e.g.
        the old one after a renewal); regenerate the CRL.

        Returns the revoked serials; a host without such a certificate is an error.
        """
        check_host(host)
        self._require_root()
        self._require_edition(edition)
        when = now or utcnow()
        d = self.client_ca_dir(edition)
        with self._locked():
            ca_key, ca_cert = self._load_ca(d, f"client CA {edition}")
            revoked = self._revoked(edition)
            wanted = serial.lower().lstrip("0") if serial is not None else None
            serials = [s for s, cert in self._issued(edition)
                       if _cn(cert).lower() == host.lower() and s not in revoked and wanted in (None, s)]
            if not serials:
                what = f"certificate {serial} of {host}" if serial is not None else f"certificate of {host}"
                raise PkiError(f"no {what} in edition {edition} that is not revoked already "
                               "(see `snapshotter pki list`)")
            for s in serials:
                revoked[s] = when.isoformat()
            number = self._crl_number(edition) + 1
            data = json.dumps(dict(sorted(revoked.items())), indent=1).encode() + b"\n"
            atomic_write(d / REVOKED, data, mode=0o600, durable=True)
            atomic_write(d / CRL, self._crl_pem(ca_key, ca_cert, revoked, number, when), mode=0o644,
                         durable=True)
        return sorted(serials)

    def _issued(self, edition: str) -> list[tuple[str, x509.Certificate]]:
        d = self.client_ca_dir(edition) / ISSUED_DIR
        out = []
        for entry in sorted(d.iterdir()):
            serial = entry.name.removesuffix(".pem")
            if entry.name.endswith(".pem") and SERIAL_RE.match(serial) and not entry.is_symlink():
                out.append((serial, x509.load_pem_x509_certificate(_read(entry))))
        return out

    def _revoked(self, edition: str) -> dict[str, str]:
        path = self.client_ca_dir(edition) / REVOKED
        try:
            data = json.loads(_read(path))
        except (ValueError, FileNotFoundError) as e:
            raise PkiError(f"{path}: unreadable ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in data.items()):
            raise PkiError(f"{path}: expected an object of serial -> time")
        return data

    def _crl_number(self, edition: str) -> int:
        try:
            crl = x509.load_pem_x509_crl(_read(self.crl(edition)))
            ext = crl.extensions.get_extension_for_class(x509.CRLNumber)
            return ext.value.crl_number
        except (FileNotFoundError, x509.ExtensionNotFound):
            return 0

    @staticmethod
    def _crl_pem(ca_key: PrivateKey, ca_cert: x509.Certificate, revoked: dict[str, str], number: int,
                 now: dt.datetime | None) -> bytes:
        """The CRL of a client CA. Its next update is the CA's own expiry: OpenSSL refuses every client
        once a CRL is past its next update, and this CRL only changes when someone is revoked."""
        when = now or utcnow()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(ca_cert.subject)
                   .last_update(when)
                   .next_update(max(ca_cert.not_valid_after_utc, when + dt.timedelta(days=1)))
                   .add_extension(x509.CRLNumber(number), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        for serial, date in sorted(revoked.items()):
            entry = (x509.RevokedCertificateBuilder()
                     .serial_number(int(serial, 16))
                     .revocation_date(dt.datetime.fromisoformat(date))
                     .build())
            builder = builder.add_revoked_certificate(entry)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def list(self) -> list[CertInfo]:
        """Every client certificate issued (and every current server certificate), sorted."""
        self._require_root()
        out: list[CertInfo] = []
        for edition in self.editions():
            revoked = self._revoked(edition)
            for serial, cert in self._issued(edition):
                when = revoked.get(serial)
                out.append(CertInfo(serial=serial, host=_cn(cert), edition=edition, kind="client",
                                    not_after=cert.not_valid_after_utc,
                                    revoked=dt.datetime.fromisoformat(when) if when else None))
        servers = self.root / SERVERS_DIR
        if servers.is_dir():
            for d in sorted(servers.iterdir()):
                try:
                    cert = x509.load_pem_x509_certificate(_read(d / "cert.pem"))
                except FileNotFoundError:
                    continue
                out.append(CertInfo(serial=serial_hex(cert.serial_number), host=d.name, edition="",
                                    kind="server", not_after=cert.not_valid_after_utc, revoked=None))
        out.sort(key=lambda c: (c.kind, c.edition, c.host.lower(), c.not_after, c.serial))
        return out
