"""The client settings of a build: what a client's /etc/portage needs to match it, as a signed tarball.

`portage/portage_settings-YYYYMMDD.tar.xz` (+ `.asc`) in a build's publishable directory holds, with paths
relative to /etc/portage:

    make.conf                         the build's make.conf without builder-only settings, ending with
                                      `source /etc/portage/make.conf.local` (the host's own settings)
    package.*/snapshotter             each package.* file (or directory, concatenated) of portage_confdir
    env/...                           portage_confdir's env/ files (what package.env refers to)
    repos.conf/snapshotter.conf       the gentoo tree by emerge-webrsync, signature checked, no auto-sync
    binrepos.conf/snapshotter.conf    the build's packages: sync-uri @SNAPSHOTTER_URL@/b/<id>/packages

`@SNAPSHOTTER_URL@` stands for the URL of the edition's document root as the client reaches it (the same
tarball serves every edition and client); the update script substitutes it when installing.

The tarball is deterministic: members sorted, directories before their contents, every mtime the build
commit's time, owner root:root (0/0), modes 0755/0644, ustar format, xz (crc64, preset 6) through
liblzma; the same build gives the same bytes.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.binhost.builds import Build, manifest
from snapshotter.errors import SnapshotterError
from snapshotter.fsutil import tree_hash

URL_PLACEHOLDER = "@SNAPSHOTTER_URL@"
# Where clients keep the signing key (repos.conf sync-openpgp-key-path; publish.clientconfig's default too).
CLIENT_KEY_PATH = "/etc/portage/snapshotter-signing-key.asc"
BINREPO_NAME = "snapshotter"
LOCAL_MAKE_CONF = "/etc/portage/make.conf.local"  # sourced at the end of the client's make.conf

# make.conf variables that describe the build host, not the client: dropped from the client's make.conf.
BUILDER_ONLY = re.compile(r"^(FEATURES|PKGDIR|DISTDIR|PORTDIR|BINPKG_[A-Z0-9_]*|PORTAGE_[A-Z0-9_]*DIR)$")
_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")


def settings_name(tag: str) -> str:
    return f"portage_settings-{tag.replace('-', '')}.tar.xz"


def _assignment_end(lines: list[str], start: int, value_from: int) -> int:
    """Index of the last line of the assignment starting at lines[start] (quotes and `\\` continue it)."""
    quote: str | None = None
    i, pos = start, value_from
    while i < len(lines):
        line = lines[i]
        escaped = False
        while pos < len(line):
            c = line[pos]
            if escaped:
                escaped = False
            elif c == "\\" and quote != "'":
                escaped = True
            elif quote is None and c in "\"'":
                quote = c
            elif c == quote:
                quote = None
            elif quote is None and c == "#":
                break
            pos += 1
        continued = escaped and line.endswith("\\\n")
        if quote is None and not continued:
            return i
        i, pos = i + 1, 0
    return len(lines) - 1


def client_make_conf(text: str) -> str:
    """`text` (a build's make.conf) without the assignments of builder-only variables (BUILDER_ONLY)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _ASSIGN.match(lines[i])
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        end = _assignment_end(lines, i, m.end())
        if not BUILDER_ONLY.match(m[1]):
            out.extend(lines[i:end + 1])
        i = end + 1
    result = "".join(out)
    return result if not result or result.endswith("\n") else result + "\n"


def _regular_files(top: Path) -> list[Path]:
    """Regular files below `top` (a file or directory), sorted by relative path; symlinks not followed."""
    if top.is_symlink():
        return []
    if top.is_file():
        return [top]
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(top).as_posix() if p != top else "")


def _confdir_members(confdir: Path) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for entry in sorted(os.listdir(confdir)):
        src = confdir / entry
        if entry.startswith("package.") and re.match(r"^package\.[a-z._]+$", entry):
            parts = []
            for f in _regular_files(src):
                rel = entry if f == src else f"{entry}/{f.relative_to(src).as_posix()}"
                body = f.read_bytes()
                parts.append(f"# ---- {rel} (portage_confdir) ----\n".encode() + body
                             + (b"" if not body or body.endswith(b"\n") else b"\n"))
            if parts:
                members[f"{entry}/snapshotter"] = b"".join(parts)
        elif entry == "env" and src.is_dir() and not src.is_symlink():
            for f in _regular_files(src):
                members[f"env/{f.relative_to(src).as_posix()}"] = f.read_bytes()
    return members


def repos_conf(build: Build) -> str:
    day = build.tag.replace("-", "")
    return (f"# snapshotter: the gentoo tree of build {build.profile} {build.id} is the snapshot of tag {build.tag}:\n"
            f"# the update script installs it with emerge-webrsync --revert={day}. No auto-sync: `emerge --sync`\n"
            "# would move the tree away from the one the packages were built against.\n"
            "[DEFAULT]\nmain-repo = gentoo\n\n[gentoo]\nlocation = /var/db/repos/gentoo\n"
            "sync-type = webrsync\nsync-webrsync-verify-signature = yes\n"
            f"sync-openpgp-key-path = {CLIENT_KEY_PATH}\nauto-sync = no\n")


def binrepos_conf(build: Build) -> str:
    return (f"# snapshotter: the signed binary packages of build {build.profile} {build.id} (tag {build.tag});\n"
            f"# {URL_PLACEHOLDER} is the edition's URL, filled in by the update script.\n"
            f"[{BINREPO_NAME}]\npriority = 10\nsync-uri = {URL_PLACEHOLDER}/b/{build.id}/packages\n"
            "verify-signature = true\n")


def settings_members(build: Build, data: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The files of the client settings of `build` ({path relative to /etc/portage: content}).

    SnapshotterError if build.json has no make.conf, or portage_confdir changed since the build (its
    digest no longer matches build.json's: the settings would not be those the packages were built with).
    """
    data = manifest(build) if data is None else data
    mc = data.get("make_conf")
    if not isinstance(mc, dict) or not isinstance(mc.get("content"), str):
        raise SnapshotterError(f"build {build.profile} {build.id}: build.json has no make.conf")
    header = (f"# ---- snapshotter: client settings of build {build.profile} {build.id} (tag {build.tag}); "
              "builder-only settings removed ----\n")
    footer = ("# ---- this host's own settings (kept across updates; the update script creates the file empty when\n"
              f"# it is missing: Portage refuses a missing sourced file) ----\nsource {LOCAL_MAKE_CONF}\n")
    members = {"make.conf": (header + client_make_conf(mc["content"]) + footer).encode()}
    pc = data.get("portage_confdir")
    if isinstance(pc, dict) and pc.get("path"):
        confdir = Path(str(pc["path"]))
        if not confdir.is_dir():
            raise SnapshotterError(f"build {build.profile} {build.id}: portage_confdir {confdir} no longer exists; "
                                   "its client settings cannot be made")
        if tree_hash(confdir) != pc.get("sha256"):
            raise SnapshotterError(f"build {build.profile} {build.id}: portage_confdir {confdir} changed since the "
                                   "build; its client settings cannot be made (rebuild the tag)")
        members.update(_confdir_members(confdir))
    members["repos.conf/snapshotter.conf"] = repos_conf(build).encode()
    members["binrepos.conf/snapshotter.conf"] = binrepos_conf(build).encode()
    return members


@dataclass(frozen=True)
class Settings:
    name: str
    data: bytes  # the .tar.xz


def make_profile_link(data: dict[str, Any]) -> dict[str, str]:
    """`make.profile` as the builder set it (the build's portage_profile), so a client uses the profile the
    packages were built for; none when the build kept the stage's own."""
    pp = data.get("portage_profile")
    if not isinstance(pp, str) or not pp:
        return {}
    return {"make.profile": f"../../var/db/repos/gentoo/profiles/{pp}"}


def tar_bytes(members: dict[str, bytes], mtime: int, links: dict[str, str] | None = None) -> bytes:
    """A ustar archive of `members` (and symlinks `links`, name -> target) with their parent directories:
    sorted, root-owned, fixed mtime."""
    links = links or {}
    dirs = set()
    for name in [*members, *links]:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    entries: list[tuple[str, bytes | str | None]] = [(d, None) for d in dirs]
    entries += [*members.items(), *links.items()]
    entries.sort(key=lambda e: e[0])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            elif isinstance(content, str):
                info.type = tarfile.SYMTYPE
                info.mode = 0o777
                info.linkname = content
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def settings_tarball(build: Build, mtime: int, data: dict[str, Any] | None = None) -> Settings:
    """The client settings of `build` as a deterministic .tar.xz (`mtime`: the build commit's time)."""
    data = manifest(build) if data is None else data
    raw = tar_bytes(settings_members(build, data), mtime, make_profile_link(data))
    xz = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)
    return Settings(settings_name(build.tag), xz)
