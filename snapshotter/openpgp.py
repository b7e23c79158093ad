"""OpenPGP with python-gnupg over the real gpg: verifying detached signatures (fail closed) and making them.

Verifying: signatures are checked with python-gnupg in a private, temporary GNUPGHOME that holds only the configured
key files, so nothing in root's keyring (or its trust database) can vouch for a snapshot. A signature
counts only if GnuPG reports it good and valid, it was made by a pinned fingerprint (primary key or
subkey), nothing about it is expired, revoked or bad, and it is not dated more than MAX_FUTURE_SIGNATURE
seconds after now (the machine's real clock): GnuPG accepts signatures from the future, and a forged
or mis-dated one must not pass as a fresh snapshot.

Signing: detached armored signatures by a fingerprint from a given GNUPGHOME, with no pinentry (a key
that needs a passphrase fails with one line instead of waiting for a terminal).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import gnupg

from snapshotter.config import normalize_fingerprint
from snapshotter.errors import ConfigError, SignatureError, SnapshotterError

log = logging.getLogger(__name__)

# Any of these in GnuPG's status output rejects the signature, whatever else it says.
_REJECT = {"BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "NO_PUBKEY", "FAILURE"}

MAX_FUTURE_SIGNATURE = 86400  # seconds: a signature dated later than now + this is refused (clock skew allowed)


def _sig_time(field: str) -> int | None:
    """VALIDSIG's signature time: seconds since the epoch, or ISO 8601 `YYYYMMDDTHHMMSS` (UTC)."""
    if field.isdigit():
        return int(field)
    try:
        return int(datetime.strptime(field, "%Y%m%dT%H%M%S").replace(tzinfo=UTC).timestamp())
    except ValueError:
        return None


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
            self._require_a_pinned_key()
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

    def _require_a_pinned_key(self) -> None:
        """ConfigError unless a pinned fingerprint is a key (or subkey) in the keyring: otherwise every
        signature would be refused, after downloading the snapshot."""
        primaries: set[str] = set()
        held: set[str] = set()
        for key in self._gpg.list_keys():
            primaries.add(key["fingerprint"].upper())
            held.update(sub[2].upper() for sub in key.get("subkeys", []) if len(sub) > 2 and sub[2])
        if not (primaries | held) & self.fingerprints:
            raise ConfigError(f"sync.fingerprints: no key in sync.keyring has a pinned fingerprint "
                              f"({', '.join(sorted(self.fingerprints))}); the key files hold "
                              f"{', '.join(sorted(primaries)) or 'no key'}")

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
                    made = _sig_time(s[3]) if len(s) > 3 else None
                    if made is None:
                        raise SignatureError(f"{data.name}: signature verification failed: no signature time")
                    if made > time.time() + MAX_FUTURE_SIGNATURE:
                        raise SignatureError(
                            f"{data.name}: signature verification failed: the signature is dated "
                            f"{datetime.fromtimestamp(min(made, 253402214400), UTC):%Y-%m-%d %H:%M} UTC, more than "
                            "a day after this machine's clock (a wrong clock here or at the signer, or a "
                            "forged date)")
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


class SigningError(SnapshotterError):
    """The signing key is missing, unusable, or gpg failed to sign."""


def signing_fingerprint(key: str, what: str = "signing key") -> str:
    """`key` as 40 upper-case hex digits (spaces allowed in the input); SigningError otherwise."""
    return normalize_fingerprint(key, what, SigningError)


def _gpg(gnupghome: Path | None) -> gnupg.GPG:
    if gnupghome is not None and not Path(gnupghome).is_dir():
        raise SigningError(f"gnupghome {gnupghome} does not exist or is not a directory")
    try:
        return gnupg.GPG(gnupghome=str(gnupghome) if gnupghome is not None else None)
    except (OSError, ValueError, RuntimeError) as e:
        raise SigningError(f"cannot run gpg: {e}") from None


def _require_secret_key(gpg: gnupg.GPG, fpr: str, gnupghome: Path | None) -> None:
    """SigningError unless `gnupghome` holds the secret key (or subkey) `fpr`."""
    where = f" in {gnupghome}" if gnupghome else ""
    for k in gpg.list_keys(secret=True):
        if k["fingerprint"] == fpr or any(len(sub) > 2 and sub[2] == fpr for sub in k.get("subkeys", [])):
            return
    raise SigningError(f"no secret key {fpr}{where}")


def detach_sign(path: Path, key: str, gnupghome: Path | None, *, name: str | None = None,
                passphrase_file: Path | None = None) -> bytes:
    """An armored detached signature of the file `path` by `key` (a fingerprint) from `gnupghome`.

    A key with a passphrase needs `passphrase_file` (given to gpg with the loopback pinentry: no terminal,
    no pinentry program). Raises SigningError (one clear line) when the key is missing, expired, revoked,
    needs a passphrase that is not available, or gpg fails. `name` is how the file is called in messages.
    """
    fpr = signing_fingerprint(key)
    gpg = _gpg(gnupghome)
    _require_secret_key(gpg, fpr, gnupghome)
    pinentry = ["--pinentry-mode", "error"]
    if passphrase_file is not None:
        if not os.access(passphrase_file, os.R_OK) or not Path(passphrase_file).is_file():
            raise SigningError(f"passphrase file {passphrase_file} is missing or not readable")
        pinentry = ["--pinentry-mode", "loopback", "--passphrase-file", str(passphrase_file)]
    try:
        with open(path, "rb") as f:
            result = gpg.sign_file(f, keyid=fpr, detach=True, binary=False,
                                   extra_args=[*pinentry, "--digest-algo", "SHA512"])
    except OSError as e:
        raise SigningError(f"cannot sign {path}: {e.strerror}") from None
    data: bytes = result.data or b""
    if getattr(result, "status", None) != "signature created" or not data.startswith(b"-----BEGIN PGP SIGNATURE"):
        reason = getattr(result, "status", None) or ""
        detail = [line for line in (result.stderr or "").splitlines()
                  if line.startswith("gpg:")]
        msg = reason or (detail[-1].removeprefix("gpg: ") if detail else "gpg failed")
        if msg.startswith("invalid signer"):
            msg = "the key is expired, revoked or cannot sign"
        raise SigningError(f"signing {name or path.name} with {fpr} failed: {msg}")
    log.debug("signed %s with %s (signing subkey %s)", path, fpr, getattr(result, "fingerprint", "?"))
    return data


def export_public_key(key: str, gnupghome: Path | None) -> bytes:
    """The armored public key `key` from `gnupghome` (for clients' sync-openpgp-key-path)."""
    fpr = signing_fingerprint(key)
    gpg = _gpg(gnupghome)
    armored = gpg.export_keys(fpr)
    if not armored:
        raise SigningError(f"no public key {fpr}" + (f" in {gnupghome}" if gnupghome else ""))
    return armored.encode() if isinstance(armored, str) else armored
