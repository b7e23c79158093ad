"""Builds with ids: `OUTPUT/<profile>/<TAG>.<N>/`, allocated once, immutable once build.json exists.

An id is `TAG.N` (`2026-11-20.1`, `2026-11-20.2` for a rebuild of the same tag): `N` is taken with an
atomic `mkdir`, so two builders writing into the same OUTPUT never get the same id. An id is never
handed out twice, even after `snapshotter purge` removed its build: purge leaves an empty tombstone
`OUTPUT/<profile>/.purged/<id>` that allocation counts too (a client that recorded a build id must never
meet a different build under it).

build.json is written by the chroot library (chroot/manifest.py); this package may not import chroot, so
it reads the few keys it needs into a `Build`. A build directory without build.json is `incomplete` (the
build is running, or it crashed); with `"ok": false` it is `failed`; unreadable, it is `invalid`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.config import NAME_RE, Config, validate_name
from snapshotter.errors import SnapshotterError
from snapshotter.git.repository import tag_date

OK = "ok"
FAILED = "failed"
INCOMPLETE = "incomplete"
INVALID = "invalid"

BUILD_JSON = "build.json"
PACKAGES = "packages"
INDEX_FILES = {"Packages", "Packages.gz"}  # the package index (and its compressed copy), not packages
TOMBSTONES = ".purged"
ID_RE = re.compile(r"^(?P<tag>[0-9]{4}-[0-9]{2}-[0-9]{2})\.(?P<n>[1-9][0-9]{0,8})$")


@dataclass(frozen=True)
class Build:
    """One build directory, as read from its build.json."""

    id: str
    profile: str
    tag: str
    n: int
    path: Path  # OUTPUT/<profile>/<id>
    state: str  # ok | failed | incomplete | invalid
    commit: str | None = None
    overlays: tuple[tuple[str, str], ...] = ()  # (name, commit)
    packages: int = 0  # gpkg files (the Packages index and Packages.gz not counted)
    size: int = 0  # bytes of the packages and the index, per build.json
    finished: str = ""
    signing_key: str | None = None  # the fingerprint that signed the packages, when known
    unsigned: bool = False  # build.json says the packages are not signed (format 2, signing_key null)
    detail: str = ""  # why a build is invalid
    base: str = ""  # an incremental build: the build whose packages it reused ("" for a full build)
    reused: int = 0  # an incremental build: how many of its package files are the base's
    package_files: dict[str, str] = field(default_factory=dict, compare=False, repr=False)  # path -> sha256

    @property
    def key(self) -> tuple[str, int]:
        """Build order: by tag, then by N (a rebuild of a tag comes after the first build)."""
        return (self.tag, self.n)

    @property
    def ok(self) -> bool:
        return self.state == OK

    @property
    def packages_dir(self) -> Path:
        return self.path / PACKAGES

    def describe_overlays(self) -> str:
        return ", ".join(f"{name}@{commit[:12]}" for name, commit in self.overlays) or "-"


def parse_id(build_id: str) -> tuple[str, int]:
    """(tag, N) of an id `YYYY-MM-DD.N`; SnapshotterError otherwise."""
    m = ID_RE.match(build_id)
    if not m or tag_date(m["tag"]) is None:
        raise SnapshotterError(f"not a build id (YYYY-MM-DD.N): {build_id!r}")
    return m["tag"], int(m["n"])


def is_id(name: str) -> bool:
    try:
        parse_id(name)
    except SnapshotterError:
        return False
    return True


def _check_tag(tag: str) -> str:
    if not NAME_RE.match(tag) or tag_date(tag) is None:
        raise SnapshotterError(f"not a snapshot tag (YYYY-MM-DD): {tag!r}")
    return tag


def _used_numbers(profile_dir: Path, tag: str) -> list[int]:
    names: list[str] = []
    for d in (profile_dir, profile_dir / TOMBSTONES):
        try:
            names += os.listdir(d)
        except FileNotFoundError:
            pass
    out = []
    for name in names:
        m = ID_RE.match(name)
        if m and m["tag"] == tag:
            out.append(int(m["n"]))
    return out


def allocate(output_dir: Path, profile: str, tag: str) -> tuple[str, Path]:
    """A new, empty build directory `output_dir/<profile>/<tag>.<N>`: (build id, its path).

    `N` is one more than any number this tag had (also of purged builds); the directory is made with
    `mkdir`, which fails if it exists, so concurrent allocations (other processes, other hosts on shared
    storage) never share an id: the loser takes the next number.
    """
    validate_name(profile)
    _check_tag(tag)
    profile_dir = output_dir / profile
    profile_dir.mkdir(parents=True, exist_ok=True)
    n = max(_used_numbers(profile_dir, tag), default=0) + 1
    while True:
        build_id = f"{tag}.{n}"
        path = profile_dir / build_id
        try:
            path.mkdir()
        except FileExistsError:
            n += 1
            continue
        return build_id, path


def tombstone(output_dir: Path, profile: str, build_id: str) -> None:
    """Remember that `build_id` was used (purge calls this before removing the build)."""
    d = output_dir / profile / TOMBSTONES
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / build_id, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.close(fd)


def _overlays(value: Any) -> tuple[tuple[str, str], ...]:
    out = []
    for ov in value or []:
        if isinstance(ov, dict) and isinstance(ov.get("name"), str):
            out.append((ov["name"], str(ov.get("commit") or "")))
    return tuple(out)


def read_build(path: Path) -> Build:
    """The build in directory `path` (`OUTPUT/<profile>/<id>`); never raises for a bad build.json."""
    profile, build_id = path.parent.name, path.name
    tag, n = parse_id(build_id)
    base = Build(id=build_id, profile=profile, tag=tag, n=n, path=path, state=INCOMPLETE)
    try:
        text = (path / BUILD_JSON).read_text()
    except FileNotFoundError:
        return base
    except (OSError, UnicodeDecodeError) as e:
        return _invalid(base, f"cannot read build.json: {e}")
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("profile") != profile or data.get("tag") != tag:
            raise ValueError(f"it is a build of {data.get('profile')!r} at {data.get('tag')!r}")
        if data.get("id") not in (None, "", build_id):  # format 1 had no id
            raise ValueError(f"it names build {data.get('id')!r}")
        commit = data.get("commit")
        if not isinstance(commit, str) or not re.match(r"^[0-9a-f]{40,64}$", commit):
            raise ValueError("no commit")
        files: dict[str, str] = {}
        size = 0
        for pkg in data.get("packages") or []:
            files[str(pkg["path"])] = str(pkg["sha256"])
            size += int(pkg.get("size") or 0)
        index = data.get("packages_index")
        if isinstance(index, dict):
            files["Packages"] = str(index["sha256"])
            size += int(index.get("size") or 0)
        inc = data.get("incremental")
        base_id, reused = (str(inc.get("base") or ""), len(inc.get("reused") or [])) if isinstance(inc, dict) \
            else ("", 0)
        ok = data.get("ok") is True
        signing = data.get("signing_key") or _make_conf_signing_key(data.get("make_conf"))
        fmt = data.get("format")
        unsigned = isinstance(fmt, int) and fmt >= 2 and not signing
        return Build(id=build_id, profile=profile, tag=tag, n=n, path=path, state=OK if ok else FAILED,
                     commit=commit, overlays=_overlays(data.get("overlays")),
                     packages=len(files.keys() - INDEX_FILES), size=size, base=base_id, reused=reused,
                     finished=str(data.get("finished") or ""),
                     signing_key=signing if isinstance(signing, str) and signing else None, unsigned=unsigned,
                     package_files=files)
    except (ValueError, KeyError, TypeError) as e:
        return _invalid(base, f"build.json: {e}")


def _make_conf_signing_key(make_conf: Any) -> str | None:
    """BINPKG_GPG_SIGNING_KEY as the build's make.conf set it last (how the packages were signed)."""
    content = make_conf.get("content") if isinstance(make_conf, dict) else None
    if not isinstance(content, str):
        return None
    found = None
    for m in re.finditer(r"^\s*(?:export\s+)?BINPKG_GPG_SIGNING_KEY=[\"']?([0-9A-Fa-f]{40})[\"']?\s*$", content, re.M):
        found = m[1].upper()
    return found


def _invalid(base: Build, detail: str) -> Build:
    return Build(id=base.id, profile=base.profile, tag=base.tag, n=base.n, path=base.path, state=INVALID,
                 detail=detail)


def list_builds(output_dir: Path, profile: str | None = None) -> list[Build]:
    """The builds under `output_dir` (of `profile`, or of every profile), sorted by profile, tag and N.

    Directories whose names are not build ids (`.partial-*` of the builder, `.purged`, the tag-named
    directories of builders before build ids) are not builds.
    """
    if profile is not None:
        validate_name(profile)
        profiles = [profile]
    else:
        try:
            profiles = sorted(p for p in os.listdir(output_dir)
                              if NAME_RE.match(p) and (output_dir / p).is_dir())
        except FileNotFoundError:
            return []
    out: list[Build] = []
    for prof in profiles:
        d = output_dir / prof
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if is_id(name) and (d / name).is_dir() and not (d / name).is_symlink():
                out.append(read_build(d / name))
    out.sort(key=lambda b: (b.profile, b.key))
    return out


def find_build(output_dir: Path, profile: str, build_id: str) -> Build:
    """The build `build_id` of `profile`; SnapshotterError (one line) if there is none."""
    validate_name(profile)
    parse_id(build_id)
    path = output_dir / profile / build_id
    if not path.is_dir() or path.is_symlink():
        raise SnapshotterError(f"profile {profile} has no build {build_id} (see `snapshotter builds --profile "
                               f"{profile}`)")
    return read_build(path)


def build_lock_path(cfg: Config, profile: str) -> Path:
    """The lock a build of `profile` holds on this host (service/build.py); purge leaves the incomplete
    builds of a profile alone while it is held."""
    return cfg.build.work_dir / f"{profile}.lock"


def manifest(build: Build) -> dict[str, Any]:
    """build.json of `build` as a dict (for the keys `Build` does not carry: make.conf, portage_confdir)."""
    try:
        data = json.loads((build.path / BUILD_JSON).read_text())
    except (OSError, ValueError) as e:
        raise SnapshotterError(f"build {build.profile} {build.id}: cannot read build.json: {e}") from None
    if not isinstance(data, dict):
        raise SnapshotterError(f"build {build.profile} {build.id}: build.json is not a JSON object")
    return data
