"""Stage tarballs: fetch (path or http(s) URL), verify the sha256, extract preserving owners and xattrs."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import requests

from chroot.procs import die_with_parent
from snapshotter.errors import FetchError, SnapshotterError, VerificationError
from snapshotter.verify import file_digest

log = logging.getLogger(__name__)

_DECOMPRESS = {".tar.xz": "--xz", ".txz": "--xz", ".tar.bz2": "--bzip2", ".tbz2": "--bzip2",
               ".tar.zst": "--zstd", ".tzst": "--zstd"}


def compression_flag(name: str) -> str:
    for suffix, flag in _DECOMPRESS.items():
        if name.endswith(suffix):
            return flag
    raise SnapshotterError(f"{name}: unknown stage compression (expected .tar.xz, .tar.bz2 or .tar.zst)")


def fetch_stage(source: str, cache_dir: Path, expected_sha256: str | None, timeout: float = 60.0) -> Path:
    """The stage as a local file: `source` itself, or a download of the URL into `cache_dir`.

    A cached download whose sha256 matches `expected_sha256` is reused; without a pinned sha256 the URL
    is downloaded again every time.
    """
    if not source.startswith(("http://", "https://")):
        p = Path(source)
        if not p.is_file():
            raise SnapshotterError(f"stage {p} does not exist")
        return p
    name = source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    compression_flag(name)
    if not expected_sha256:
        log.warning("stage %s has no stage_sha256: it is downloaded every time and not verified", source)
    dest = cache_dir / (f"{expected_sha256[:16]}-{name}" if expected_sha256 else name)
    if expected_sha256 and dest.is_file() and file_digest(dest, "sha256") == expected_sha256:
        log.info("stage: using cached %s", dest)
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + f".part{os.getpid()}")
    log.info("stage: downloading %s", source)
    try:
        with requests.get(source, stream=True, timeout=timeout) as r:
            if r.status_code != 200:
                raise FetchError(f"stage download {source}: HTTP {r.status_code}")
            size = 0
            with open(part, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
                    size += len(chunk)
            want = r.headers.get("Content-Length")
            if want is not None and want.isdigit() and int(want) != size:
                raise FetchError(f"stage download {source}: short read ({size} of {want} bytes)")
        os.replace(part, dest)
    except requests.RequestException as e:
        raise FetchError(f"stage download {source}: {e}") from None
    finally:
        part.unlink(missing_ok=True)
    return dest


def verify_stage(path: Path, expected_sha256: str | None) -> str:
    """sha256 of the stage; raises VerificationError (before anything is extracted) on a mismatch."""
    digest = file_digest(path, "sha256")
    if expected_sha256 is not None and digest != expected_sha256:
        raise VerificationError(f"stage {path}: sha256 is {digest}, expected {expected_sha256} (stage_sha256); "
                                "refusing to use it")
    return digest


def extract_stage(path: Path, root: Path) -> None:
    """Extract into the (new, empty) `root` keeping numeric owners, permissions and xattrs."""
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise SnapshotterError(f"build root {root} is not empty")
    cmd = ["tar", compression_flag(path.name), "--extract", "--file", str(path), "--directory", str(root),
           "--numeric-owner", "--preserve-permissions", "--same-owner", "--xattrs", "--xattrs-include=*",
           "--acls"]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=die_with_parent())
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise SnapshotterError(f"extracting stage {path} failed: {lines[-1] if lines else proc.returncode}")
    if not (root / "usr").is_dir() or not (root / "etc").is_dir():
        raise SnapshotterError(f"stage {path} does not look like a root file system (no /usr or /etc)")
