"""The one TOML configuration file, validated on load.

Every section is a dataclass; its field annotations are the schema. Unknown keys and wrong types are
errors that name the key (`sync.max_catchup_days: expected an integer, got 'x'`). Relative paths
are taken relative to the configuration file. Command-line flags override the file (see cli/).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.errors import ConfigError, SnapshotterError

DEFAULT_CONFIG = Path("/etc/snapshotter/snapshotter.toml")
CONFIG_ENV = "SNAPSHOTTER_CONFIG"

GENTOO_MIRROR = "https://distfiles.gentoo.org"
GENTOO_KEYRING = "/usr/share/openpgp-keys/gentoo-release.asc"
# Gentoo ebuild repository signing key (signs the daily snapshots).
GENTOO_SNAPSHOT_FPR = "DCD05B71EAB94199527F44ACDB6B8C1F96D8BF6D"

_FPR_RE = re.compile(r"^[0-9A-F]{40}$")
_TIME_RE = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9._/-]+$")


@dataclass
class GitSettings:
    """[git]: the bare mirror repository's branch, identity, tag signing and push remotes."""

    branch: str = "main"
    author_name: str = "Portage Snapshotter"
    author_email: str = "snapshotter@localhost"
    sign_tags: bool = False
    signing_key: str = ""  # fingerprint of the tag signing key (with sign_tags)
    gnupghome: Path | None = None  # keyring holding signing_key's secret key
    push: list[str] = field(default_factory=list)  # remote names or URLs, pushed after each import


@dataclass
class SyncSettings:
    """[sync]: where snapshots come from and how they are verified."""

    mirrors: list[str] = field(default_factory=lambda: [GENTOO_MIRROR])
    keyring: list[Path] = field(default_factory=lambda: [Path(GENTOO_KEYRING)])
    fingerprints: list[str] = field(default_factory=lambda: [GENTOO_SNAPSHOT_FPR])
    max_catchup_days: int = 14
    cache_dir: Path = Path("/var/cache/snapshotter/downloads")
    timeout: float = 60.0  # seconds per connect/read
    retries: int = 4  # per request, with exponential backoff


@dataclass
class PublishSettings:
    """[publish]: signed webrsync snapshots for clients."""

    out: Path | None = None
    signing_key: str = ""
    gnupghome: Path | None = None
    keep: int = 0  # 0 keeps every published day
    xz_level: int = 9
    xz_threads: int = 0  # 0: one per core


@dataclass
class BuildSettings:
    """[build]: where chroot builds work and where their results go."""

    work_dir: Path = Path("/var/tmp/snapshotter/builds")  # one root per build, removed afterwards
    output: Path = Path("/var/cache/snapshotter/packages")  # OUTPUT/<profile>/<tag>/
    cache_dir: Path = Path("/var/cache/snapshotter/build")  # downloaded stages, overlay clones
    distfiles: Path | None = None  # DISTDIR shared by all builds (bind-mounted); default CACHE_DIR/distfiles


@dataclass
class ServiceSettings:
    """[service]: the `snapshotter run` loop and the build queue."""

    sync_time: str = "01:15"  # UTC, HH:MM
    retry_interval: int = 900  # seconds between tries while the day's snapshot is missing
    retry_deadline: int = 6 * 3600  # give up on the day this many seconds after sync_time
    publish: bool = False  # publish after each successful sync ([publish].out must be set)
    queue_builds: bool = True  # queue builds of every profile for each new tag
    lease_seconds: int = 3600  # a worker's job lease; renewed while it runs
    build_profiles: list[str] = field(default_factory=list)  # profiles built for a new tag; empty: all
    poll_interval: float = 10.0  # seconds an idle worker waits between looks at the queue


@dataclass
class Config:
    path: Path | None = None
    repo: Path = Path("/var/lib/snapshotter/gentoo.git")
    state_dir: Path = Path("/var/lib/snapshotter")
    git: GitSettings = field(default_factory=GitSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    build: BuildSettings = field(default_factory=BuildSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    profiles: dict[str, Any] = field(default_factory=dict)  # name -> chroot.profile.Profile


_SECTIONS: dict[str, type] = {
    "git": GitSettings,
    "sync": SyncSettings,
    "publish": PublishSettings,
    "build": BuildSettings,
    "service": ServiceSettings,
}
_TOP_LEVEL = {"repo": Path, "state_dir": Path}


def normalize_fingerprint(value: str, what: str, error: type[SnapshotterError] = ConfigError) -> str:
    """`value` as 40 upper-case hex digits (spaces allowed in the input); `error` naming `what` otherwise."""
    norm = value.replace(" ", "").upper()
    if not _FPR_RE.match(norm):
        raise error(f"{what}: expected a 40-hex-digit OpenPGP fingerprint, got {value!r}")
    return norm


def _type_name(t: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path"}
    origin = typing.get_origin(t)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(t)[0]).split(' ', 1)[1]}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t) if a is not type(None))
    return names.get(t, str(t))


def coerce(key: str, value: Any, t: Any, base: Path) -> Any:
    """Check `value` against the annotation `t`; return it converted (paths made absolute)."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return coerce(key, value, args[0], base)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(t)}, got {value!r}")
        (item,) = typing.get_args(t)
        return [coerce(f"{key}[{i}]", v, item, base) for i, v in enumerate(value)]
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if t is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p)
    raise AssertionError(f"no coercion for {t}")


def _section(name: str, cls: type, table: Any, base: Path) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: expected a table ([{name}]), got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(sorted(fields))})")
        values[key] = coerce(f"{name}.{key}", value, hints[key], base)
    return cls(**values)


def validate(cfg: Config) -> Config:
    """Checks that span values (formats, ranges); raises ConfigError naming the key."""
    if not _BRANCH_RE.match(cfg.git.branch) or ".." in cfg.git.branch or cfg.git.branch.startswith("-"):
        raise ConfigError(f"git.branch: not a valid branch name: {cfg.git.branch!r}")
    for i, remote in enumerate(cfg.git.push):
        if not remote or remote.startswith("-"):
            raise ConfigError(f"git.push[{i}]: not a remote name or URL: {remote!r}")
    cfg.sync.fingerprints = [normalize_fingerprint(f, f"sync.fingerprints[{i}]")
                             for i, f in enumerate(cfg.sync.fingerprints)]
    if not cfg.sync.fingerprints:
        raise ConfigError("sync.fingerprints: at least one pinned fingerprint is required")
    if not cfg.sync.mirrors:
        raise ConfigError("sync.mirrors: at least one mirror is required")
    for i, m in enumerate(cfg.sync.mirrors):
        if not re.match(r"^(https?|file)://", m):
            raise ConfigError(f"sync.mirrors[{i}]: expected an http(s):// or file:// URL, got {m!r}")
    if cfg.sync.max_catchup_days < 1:
        raise ConfigError(f"sync.max_catchup_days: must be at least 1, got {cfg.sync.max_catchup_days}")
    if cfg.sync.retries < 0:
        raise ConfigError(f"sync.retries: must not be negative, got {cfg.sync.retries}")
    if cfg.sync.timeout <= 0:
        raise ConfigError(f"sync.timeout: must be positive, got {cfg.sync.timeout}")
    if cfg.publish.keep < 0:
        raise ConfigError(f"publish.keep: must not be negative, got {cfg.publish.keep}")
    if not 0 <= cfg.publish.xz_level <= 9:
        raise ConfigError(f"publish.xz_level: must be 0..9, got {cfg.publish.xz_level}")
    if cfg.publish.xz_threads < 0:
        raise ConfigError(f"publish.xz_threads: must not be negative, got {cfg.publish.xz_threads}")
    if cfg.publish.signing_key:
        cfg.publish.signing_key = normalize_fingerprint(cfg.publish.signing_key, "publish.signing_key")
    if not _TIME_RE.match(cfg.service.sync_time):
        raise ConfigError(f"service.sync_time: expected HH:MM (UTC), got {cfg.service.sync_time!r}")
    for key in ("retry_interval", "retry_deadline", "lease_seconds", "poll_interval"):
        if getattr(cfg.service, key) <= 0:
            raise ConfigError(f"service.{key}: must be positive, got {getattr(cfg.service, key)}")
    for i, name in enumerate(cfg.service.build_profiles):
        if cfg.profiles and name not in cfg.profiles:
            raise ConfigError(f"service.build_profiles[{i}]: no profile {name!r} (known: {', '.join(sorted(cfg.profiles))})")
    return cfg


def load(path: Path | None = None, required: bool | None = None) -> Config:
    """Load and validate the configuration.

    `path` None means `$SNAPSHOTTER_CONFIG`, else /etc/snapshotter/snapshotter.toml. An explicitly named
    file must exist; the default file may be missing (built-in defaults are used).
    """
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        if env:
            path, required = Path(env), True if required is None else required
        else:
            path, required = DEFAULT_CONFIG, False if required is None else required
    elif required is None:
        required = True
    if not path.exists():
        if required:
            raise ConfigError(f"config file {path} does not exist")
        return validate(Config())
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    try:
        return validate(from_dict(data, path.parent.resolve(), path))
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def from_dict(data: dict[str, Any], base: Path, path: Path | None = None) -> Config:
    cfg = Config(path=path)
    for key, value in data.items():
        if key in _TOP_LEVEL:
            setattr(cfg, key, coerce(key, value, _TOP_LEVEL[key], base))
        elif key in _SECTIONS:
            setattr(cfg, key, _section(key, _SECTIONS[key], value, base))
        elif key == "profiles":
            if not isinstance(value, dict):
                raise ConfigError("profiles: expected tables [profiles.NAME]")
            from chroot.profile import parse_profile

            cfg.profiles = {name: parse_profile(name, table, base) for name, table in value.items()}
        else:
            known = sorted([*_TOP_LEVEL, *_SECTIONS, "profiles"])
            raise ConfigError(f"{key}: unknown key (known: {', '.join(known)})")
    return cfg
