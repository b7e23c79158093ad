"""The `.md5sum` file that comes with each snapshot: parsed, and checked before the signature."""

from __future__ import annotations

import re
from pathlib import Path

from snapshotter.errors import VerificationError
from snapshotter.fsutil import file_digest

_MD5_RE = re.compile(rb"^([0-9a-fA-F]{32})(?:\s+\*?(\S+))?\s*$")


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
