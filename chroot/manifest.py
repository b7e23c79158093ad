"""build.json: everything needed to know what a build used and produced, and to redo it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from chroot.newfile import new_file, write_all

FORMAT = 3  # 3: `mode`, `incremental`, `root`; 2: build ids (`id`), `signing_key`, `error`; a build's own directory
READABLE_FORMATS = (1, 2, 3)  # format 1 (no id, unsigned) is still read


@dataclass
class Manifest:
    profile: str
    tag: str
    commit: str
    repo: str
    stage: dict[str, Any]  # {"source", "sha256"}, plus "build" (its id) when seeded from a build's stage4
    overlays: list[dict[str, str]]  # [{"name", "url", "ref", "commit"}]
    portage_profile: str | None
    make_conf: dict[str, Any] | None  # {"content", "sha256"}: the root's whole make.conf (None: not written)
    portage_confdir: dict[str, Any] | None  # {"path", "sha256"}
    repos_conf: str
    world: list[str] | None
    emerge_command: list[str]  # argv run inside the root
    started: str = ""
    finished: str = ""
    duration_seconds: float = 0.0
    exit_status: int | None = None
    ok: bool = False
    packages: list[dict[str, Any]] = field(default_factory=list)  # [{"path", "sha256", "size"}]
    packages_index: dict[str, Any] | None = None  # the `Packages` file: {"sha256", "size"}
    snapshotter_version: str = ""
    id: str = ""  # the build id (TAG.N), the name of the build's directory; "" in format 1
    signing_key: str | None = None  # fingerprint that signed the packages; None: unsigned
    error: str = ""  # why a build failed before or outside emerge (setup error, signal); "" otherwise
    stage4: dict[str, Any] | None = None  # {"file", "sha256", "size"}: the packed root (None: not packed)
    root: dict[str, Any] | None = None  # {"method": "overlay" or "extract", "seconds"}: how the root was made
    mode: str = "full"  # "full" (every package built) or "incremental" (packages of `incremental.base` reused)
    incremental: dict[str, Any] | None = None  # {"base", "reused", "rebuilt"} of an incremental build
    format: int = FORMAT

    def to_json(self) -> str:
        """build.json's text: every field, keys sorted, indented by 2, with a final newline."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """The manifest `to_json` wrote; ValueError if `text` is not one (bad JSON, unknown or missing
        keys, another format)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("build.json: not a JSON object")
        if data.get("format") not in READABLE_FORMATS:
            raise ValueError(f"build.json: format {data.get('format')!r}, not one of {READABLE_FORMATS}")
        known = fields(cls)
        unknown = sorted(data.keys() - {f.name for f in known})
        missing = [f.name for f in known if f.name not in data and f.default is MISSING
                   and f.default_factory is MISSING]
        if unknown or missing:
            raise ValueError(f"build.json: unknown keys {unknown}, missing keys {missing}")
        return cls(**data)


def list_packages(pkgdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every file below `pkgdir` except the `Packages` index, sorted by path, with sha256 and size."""
    pkgs: list[dict[str, Any]] = []
    index: dict[str, Any] | None = None
    for dirpath, dirnames, filenames in os.walk(pkgdir):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(pkgdir).as_posix()
            if full.is_symlink():
                continue
            entry: dict[str, Any] = {"path": rel, "sha256": _sha256(full), "size": full.stat().st_size}
            if rel == "Packages":
                index = {"sha256": entry["sha256"], "size": entry["size"]}
            else:
                pkgs.append(entry)
    pkgs.sort(key=lambda e: e["path"])
    return pkgs, index


def write(manifest: Manifest, path: Path) -> None:
    """Create build.json at `path`, in the build's own directory, as the build's last step.

    A build directory without build.json is a build that is running or crashed: readers take the
    file's existence as "finished", so it must never be seen half-written. It is written to a temporary
    name (O_CREAT|O_EXCL|O_NOFOLLOW: never through a planted symlink), fsynced and linked to `path`
    with link(2), which fails if `path` exists: a build.json is never replaced (chroot.newfile).
    """
    with new_file(path) as fd:
        write_all(fd, manifest.to_json().encode())
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load(path: Path) -> Manifest:
    return Manifest.from_json(path.read_text())


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
