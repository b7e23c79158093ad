"""Verifying snapshots, fail closed: the md5 from `.md5sum`, then the detached OpenPGP signature.

Signatures are checked with python-gnupg in a private, temporary GNUPGHOME that holds only the configured
key files, so nothing in root's keyring (or its trust database) can vouch for a snapshot. A signature
counts only if GnuPG reports it good and valid, it was made by a pinned fingerprint (primary key or
subkey), and nothing about it is expired, revoked or bad.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
from pathlib import Path

import gnupg

from snapshotter.config import normalize_fingerprint
from snapshotter.errors import ConfigError, SignatureError, VerificationError

log = logging.getLogger(__name__)

_MD5_RE = re.compile(rb"^([0-9a-fA-F]{32})(?:\s+\*?(\S+))?\s*$")
# Any of these in GnuPG's status output rejects the signature, whatever else it says.
_REJECT = {"BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "NO_PUBKEY", "FAILURE"}


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's content ("md5", "sha256", ...), read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def parse_md5sum(text: bytes, name: str) -> str:
    """The md5 a `.md5sum` file gives for `name` (its first field; the file name, if given, must match)."""
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _MD5_RE.match(line.strip())
        if not m:
            raise VerificationError(f"{name}.md5sum is not an md5sum file")
        listed = m[2].decode(errors="replace") if m[2] else None
        if listed is None or listed.rsplit("/", 1)[-1] == name:
            return m[1].decode().lower()
    raise VerificationError(f"{name}.md5sum does not list {name}")


def check_md5(tarball: Path, md5sum: bytes) -> None:
    want = parse_md5sum(md5sum, tarball.name)
    got = file_digest(tarball, "md5")
    if got != want:
        raise VerificationError(f"{tarball.name}: md5 mismatch (file {got}, .md5sum says {want})")


class SignatureVerifier:
    """Checks detached signatures against pinned fingerprints with a throwaway keyring."""

    def __init__(self, key_files: list[Path], fingerprints: list[str]) -> None:
        self.fingerprints = {normalize_fingerprint(f, f"sync.fingerprints[{i}]") for i, f in enumerate(fingerprints)}
        self._home = Path(tempfile.mkdtemp(prefix="snapshotter-gpg-"))
        self._home.chmod(0o700)
        try:
            # Public keys and signatures need no gpg-agent; one started here would outlive the run.
            self._gpg = gnupg.GPG(gnupghome=str(self._home), options=["--no-autostart"])
            for i, path in enumerate(key_files):
                self._import(path, i)
        except BaseException:
            self.close()
            raise

    def _import(self, path: Path, index: int) -> None:
        if not path.is_file():
            raise ConfigError(f"sync.keyring[{index}]: key file {path} not found (on Gentoo: emerge "
                              "sec-keys/openpgp-keys-gentoo-release; elsewhere fetch the key and set sync.keyring)")
        result = self._gpg.import_keys(path.read_bytes())
        if not result.fingerprints:
            raise ConfigError(f"sync.keyring[{index}]: no OpenPGP public key in {path}")
        log.debug("keyring %s: %s", path, ", ".join(result.fingerprints))

    def verify(self, data: Path, signature: Path) -> str:
        """Return the fingerprint that made a good signature over `data`; raise SignatureError otherwise."""
        with open(signature, "rb") as sig:
            result = self._gpg.verify_file(sig, str(data))
        statuses = [line.split()[1:] for line in (result.stderr or "").splitlines()
                    if line.startswith("[GNUPG:] ") and len(line.split()) > 1]
        keys = {s[0] for s in statuses}
        bad = sorted(keys & _REJECT)
        if bad or "GOODSIG" not in keys or "VALIDSIG" not in keys:
            reason = {
                "EXPKEYSIG": "made by an expired key", "REVKEYSIG": "made by a revoked key",
                "EXPSIG": "the signature has expired", "BADSIG": "BAD signature (data or signature altered)",
                "NO_PUBKEY": "made by a key not in the configured keyring", "ERRSIG": "cannot be checked",
            }
            why = "; ".join(reason.get(b, b) for b in bad) or "no valid signature found"
            raise SignatureError(f"{data.name}: signature verification failed: {why}")
        for s in statuses:
            if s[0] == "VALIDSIG":
                signer = s[1].upper()
                primary = s[10].upper() if len(s) > 10 else signer
                if signer in self.fingerprints or primary in self.fingerprints:
                    return primary
                raise SignatureError(f"{data.name}: signature verification failed: signed by {primary}, "
                                     "which is not a pinned fingerprint")
        raise SignatureError(f"{data.name}: signature verification failed: no valid signature found")

    def close(self) -> None:
        shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> SignatureVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
