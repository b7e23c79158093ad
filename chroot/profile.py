"""Build profiles: the `[profiles.NAME]` tables of the configuration, validated on load.

Every error names the key (`profiles.basic.stage_sha256: ...`). Values that end up in paths, shell
files or command lines (profile and overlay names, refs, make.conf variable names, atoms) are checked
against strict patterns here, so the builder never has to quote its way out of hostile input.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Portage repository names: letters, digits, '_' and '-', not starting with '-'.
REPO_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
REF_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")
VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ATOM_RE = re.compile(r"^[A-Za-z0-9@<>=~!*][A-Za-z0-9@<>=~!*/:._+\[\],-]*$")
PROFILE_PATH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+/-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
STAGE_SUFFIXES = (".tar.xz", ".tar.bz2", ".tar.zst", ".txz", ".tbz2", ".tzst")

DEFAULT_FEATURES = ["buildpkg", "cgroup", "ipc-sandbox", "network-sandbox", "parallel-fetch"]
DEFAULT_EMERGE_ARGS = ["--emptytree", "@world"]
# Variables the builder owns: both directories are bind-mounted from the host.
RESERVED_VARS = {"PKGDIR", "DISTDIR"}


@dataclass(frozen=True)
class Overlay:
    """An extra ebuild repository: a git repository pinned at a tag or commit."""

    name: str
    url: str
    ref: str


@dataclass
class Profile:
    """One build profile (`[profiles.NAME]`)."""

    name: str
    stage: str  # absolute path, or an http(s):// URL
    stage_sha256: str | None = None
    portage_profile: str | None = None  # relative to the gentoo tree's profiles/; None keeps the stage's
    portage_confdir: Path | None = None
    make_conf: dict[str, str] = field(default_factory=dict)
    world: list[str] | None = None  # None keeps the stage's /var/lib/portage/world
    emerge_args: list[str] = field(default_factory=lambda: list(DEFAULT_EMERGE_ARGS))
    overlays: list[Overlay] = field(default_factory=list)

    @property
    def stage_is_url(self) -> bool:
        return is_url(self.stage)

    def features(self) -> list[str]:
        """FEATURES for make.conf: the configured (or default) ones, always with buildpkg."""
        given = self.make_conf.get("FEATURES")
        feats = given.split() if given is not None else list(DEFAULT_FEATURES)
        if "buildpkg" not in feats:
            feats.insert(0, "buildpkg")
        return feats


KNOWN_KEYS = ("stage", "stage_sha256", "portage_profile", "portage_confdir", "make_conf", "world",
              "emerge_args", "overlays")


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if "\n" in value or "\0" in value:
        raise ConfigError(f"{key}: must be one line")
    return value


def _str_list(key: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    return [_str(f"{key}[{i}]", v) for i, v in enumerate(value)]


def _path(key: str, value: Any, base: Path) -> Path:
    s = _str(key, value)
    if not s:
        raise ConfigError(f"{key}: expected a path, got ''")
    p = Path(s).expanduser()
    return p if p.is_absolute() else base / p


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"profiles.{name}: not a valid profile name (letters, digits, '.', '_', '-'; "
                          "not starting with '.' or '-')")
    return name


def _stage(key: str, value: Any, base: Path) -> str:
    s = _str(key, value)
    if is_url(s):
        path_part = s.split("?", 1)[0]
    else:
        p = _path(key, s, base)
        if not p.is_file():
            raise ConfigError(f"{key}: stage file {p} does not exist")
        s = str(p)
        path_part = s
    if not path_part.endswith(STAGE_SUFFIXES):
        raise ConfigError(f"{key}: expected a .tar.xz, .tar.bz2 or .tar.zst stage tarball, got {s!r}")
    return s


def _make_conf(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table of variables, got {value!r}")
    out: dict[str, str] = {}
    for var, v in value.items():
        k = f"{key}.{var}"
        if not VAR_RE.match(var):
            raise ConfigError(f"{k}: not a valid variable name")
        if var in RESERVED_VARS:
            raise ConfigError(f"{k}: set by the builder (the output packages / shared distfiles directory); "
                              "remove it")
        if isinstance(v, list):
            v = " ".join(_str_list(k, v))
        out[var] = _str(k, v)
    feats = out.get("FEATURES")
    if feats is not None and "-buildpkg" in feats.split():
        raise ConfigError(f"{key}.FEATURES: buildpkg is required (the build exists to make packages)")
    return out


def _overlays(key: str, value: Any, base: Path) -> list[Overlay]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of tables {{name, url, ref}}, got {value!r}")
    seen: set[str] = set()
    out = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{k}: expected a table {{name, url, ref}}, got {item!r}")
        for sub in item:
            if sub not in ("name", "url", "ref"):
                raise ConfigError(f"{k}.{sub}: unknown key (known: name, ref, url)")
        for sub in ("name", "url", "ref"):
            if sub not in item:
                raise ConfigError(f"{k}.{sub}: missing")
        name = _str(f"{k}.name", item["name"])
        if not REPO_NAME_RE.match(name) or name == "gentoo":
            raise ConfigError(f"{k}.name: not a valid repository name (or 'gentoo'): {name!r}")
        if name in seen:
            raise ConfigError(f"{k}.name: overlay {name!r} is listed twice")
        seen.add(name)
        url = _str(f"{k}.url", item["url"])
        if not url or url.startswith("-"):
            raise ConfigError(f"{k}.url: not a git URL or path: {url!r}")
        if "://" not in url and ":" not in url.split("/", 1)[0]:  # a local path (not scp-like host:path)
            p = _path(f"{k}.url", url, base)
            if not p.exists():
                raise ConfigError(f"{k}.url: {p} does not exist")
            url = str(p)
        ref = _str(f"{k}.ref", item["ref"])
        if not REF_RE.match(ref) or ".." in ref or ref.endswith((".lock", "/")):
            raise ConfigError(f"{k}.ref: not a valid tag, branch or commit: {ref!r}")
        out.append(Overlay(name, url, ref))
    return out


def parse_profile(name: str, table: Any, base: Path) -> Profile:
    """Validate one `[profiles.NAME]` table; errors name the key (`profiles.NAME.key`)."""
    validate_name(name)
    pre = f"profiles.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{pre}: expected a table")
    for key in table:
        if key not in KNOWN_KEYS:
            raise ConfigError(f"{pre}.{key}: unknown key (known: {', '.join(sorted(KNOWN_KEYS))})")
    if "stage" not in table:
        raise ConfigError(f"{pre}.stage: missing (path or URL of a stage3/stage4 tarball)")
    prof = Profile(name=name, stage=_stage(f"{pre}.stage", table["stage"], base))
    if "stage_sha256" in table:
        sha = _str(f"{pre}.stage_sha256", table["stage_sha256"]).strip().lower()
        if not SHA256_RE.match(sha):
            raise ConfigError(f"{pre}.stage_sha256: expected 64 hex digits, got {table['stage_sha256']!r}")
        prof.stage_sha256 = sha
    if "portage_profile" in table:
        pp = _str(f"{pre}.portage_profile", table["portage_profile"]).strip("/")
        if not PROFILE_PATH_RE.match(pp) or ".." in pp.split("/"):
            raise ConfigError(f"{pre}.portage_profile: expected a path below the tree's profiles/, got {pp!r}")
        prof.portage_profile = pp
    if "portage_confdir" in table:
        d = _path(f"{pre}.portage_confdir", table["portage_confdir"], base)
        if not d.is_dir():
            raise ConfigError(f"{pre}.portage_confdir: directory {d} does not exist")
        prof.portage_confdir = d
    if "make_conf" in table:
        prof.make_conf = _make_conf(f"{pre}.make_conf", table["make_conf"])
    if "world" in table:
        atoms = _str_list(f"{pre}.world", table["world"])
        for i, atom in enumerate(atoms):
            if not ATOM_RE.match(atom):
                raise ConfigError(f"{pre}.world[{i}]: not a package atom or set: {atom!r}")
        prof.world = atoms
    if "emerge_args" in table:
        raw = table["emerge_args"]
        if isinstance(raw, str):
            try:
                args = shlex.split(raw)
            except ValueError as e:
                raise ConfigError(f"{pre}.emerge_args: {e}") from None
        else:
            args = _str_list(f"{pre}.emerge_args", raw)
        if not args:
            raise ConfigError(f"{pre}.emerge_args: must not be empty")
        for i, a in enumerate(args):
            _str(f"{pre}.emerge_args[{i}]", a)
        prof.emerge_args = args
    if "overlays" in table:
        prof.overlays = _overlays(f"{pre}.overlays", table["overlays"], base)
    return prof
