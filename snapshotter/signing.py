"""Detached OpenPGP signatures for published snapshots (python-gnupg over the real gpg)."""

from __future__ import annotations

import logging
from pathlib import Path

import gnupg

from snapshotter import config
from snapshotter.errors import SnapshotterError

log = logging.getLogger(__name__)

class SigningError(SnapshotterError):
    """The signing key is missing, unusable, or gpg failed to sign."""


def normalize_fingerprint(key: str, what: str = "signing key") -> str:
    """`key` as 40 upper-case hex digits (spaces allowed in the input); SigningError otherwise."""
    return config.normalize_fingerprint(key, what, SigningError)


def _gpg(gnupghome: Path | None) -> gnupg.GPG:
    if gnupghome is not None and not Path(gnupghome).is_dir():
        raise SigningError(f"gnupghome {gnupghome} does not exist or is not a directory")
    try:
        return gnupg.GPG(gnupghome=str(gnupghome) if gnupghome is not None else None)
    except (OSError, ValueError, RuntimeError) as e:
        raise SigningError(f"cannot run gpg: {e}") from None


def _secret_key(gpg: gnupg.GPG, fpr: str, gnupghome: Path | None) -> dict:
    where = f" in {gnupghome}" if gnupghome else ""
    for k in gpg.list_keys(secret=True):
        if k["fingerprint"] == fpr or any(len(sub) > 2 and sub[2] == fpr for sub in k.get("subkeys", [])):
            return k
    raise SigningError(f"no secret key {fpr}{where}")


def detach_sign(path: Path, key: str, gnupghome: Path | None, *, name: str | None = None) -> bytes:
    """An armored detached signature of the file `path` by `key` (a fingerprint) from `gnupghome`.

    Raises SigningError (one clear line) when the key is missing, expired, revoked, needs a passphrase
    that is not available, or gpg fails. `name` is how the file is called in messages.
    """
    fpr = normalize_fingerprint(key)
    gpg = _gpg(gnupghome)
    _secret_key(gpg, fpr, gnupghome)
    try:
        with open(path, "rb") as f:
            result = gpg.sign_file(f, keyid=fpr, detach=True, binary=False,
                                   extra_args=["--pinentry-mode", "error", "--digest-algo", "SHA512"])
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
    fpr = normalize_fingerprint(key)
    gpg = _gpg(gnupghome)
    armored = gpg.export_keys(fpr)
    if not armored:
        raise SigningError(f"no public key {fpr}" + (f" in {gnupghome}" if gnupghome else ""))
    return armored.encode() if isinstance(armored, str) else armored
