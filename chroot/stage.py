"""Stage tarballs: verify the sha256, extract preserving owners and xattrs (the caller fetches them)."""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path

from chroot.errors import ChrootError, StageMismatch
from chroot.procs import die_with_parent

log = logging.getLogger(__name__)

_DECOMPRESS = {".tar.xz": "--xz", ".txz": "--xz", ".tar.bz2": "--bzip2", ".tbz2": "--bzip2",
               ".tar.zst": "--zstd", ".tzst": "--zstd"}


def compression_flag(name: str) -> str:
    for suffix, flag in _DECOMPRESS.items():
        if name.endswith(suffix):
            return flag
    raise ChrootError(f"{name}: unknown stage compression (expected .tar.xz, .tar.bz2 or .tar.zst)")


def verify_stage(path: Path, expected_sha256: str | None) -> str:
    """sha256 of the stage; raises StageMismatch (before anything is extracted) on a mismatch."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise StageMismatch(f"stage {path}: sha256 is {digest}, expected {expected_sha256} (stage_sha256); "
                           "refusing to use it")
    return digest


def extract_stage(path: Path, root: Path) -> None:
    """Extract into the (new, empty) `root` keeping numeric owners, permissions and xattrs."""
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise ChrootError(f"build root {root} is not empty")
    cmd = ["tar", compression_flag(path.name), "--extract", "--file", str(path), "--directory", str(root),
           "--numeric-owner", "--preserve-permissions", "--same-owner", "--xattrs", "--xattrs-include=*",
           # overlayfs' own attributes mean something to the overlay a cached stage becomes the lower layer
           # of (opaque directories, redirects): never taken from a tarball
           "--xattrs-exclude=trusted.overlay.*", "--acls"]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=die_with_parent())
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise ChrootError(f"extracting stage {path} failed: {lines[-1] if lines else proc.returncode}")
    if not (root / "usr").is_dir() or not (root / "etc").is_dir():
        raise ChrootError(f"stage {path} does not look like a root file system (no /usr or /etc)")
