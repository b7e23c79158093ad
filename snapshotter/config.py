"""The one TOML configuration file, validated on load.

Every section is a dataclass; its field annotations are the schema. Unknown keys and wrong types are
errors that name the key (`sync.max_catchup_days: expected an integer, got 'x'`). Relative paths
are taken relative to the configuration file. Command-line flags override the file (see cli/).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
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

# ---- build profiles: [profiles.NAME] ----
# Values that end up in paths, shell files or command lines (profile and overlay names, refs, make.conf
# variable names, atoms) are checked against strict patterns here, so the builder never has to quote its
# way out of hostile input.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Portage repository names: letters, digits, '_' and '-', not starting with '-'.
REPO_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
REF_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")
VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ATOM_RE = re.compile(r"^[A-Za-z0-9@<>=~!*][A-Za-z0-9@<>=~!*/:._+\[\],-]*$")
PROFILE_PATH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+/-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
STAGE_SUFFIXES = (".tar.xz", ".tar.bz2", ".tar.zst", ".txz", ".tbz2", ".tzst")
# `stage` may name a build of the profile instead of a file: its stage4 seeds the build.
LATEST_BUILD = "latest-build"
BUILD_STAGE_PREFIX = "build:"
BUILD_ID_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}\.[1-9][0-9]{0,8}$")

DEFAULT_EMERGE_ARGS = ("--emptytree", "@world")
# make.conf variables the builder owns: both directories are bind-mounted from the host.
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
    # Per-profile overrides of [binhost] signing_key / gnupghome / passphrase_file (see signing_for).
    signing_key: str | None = None
    gnupghome: Path | None = None
    passphrase_file: Path | None = None
    stage4: bool = True  # pack the root of each successful build as its stage4
    # With stage = "latest-build": the stage used while the profile has no good build with a stage4.
    seed_stage: str | None = None
    seed_stage_sha256: str | None = None
    # "full": every build is `emerge --emptytree` from scratch; "incremental": a build reuses the packages of
    # the profile's newest good build and rebuilds what changed (service/incremental.py).
    mode: str = "full"
    # With mode = "incremental": a full build when the newest full build's tag is this many days older than
    # the build's tag (weekly by default); 0: never automatically.
    full_every_days: int = 7
    # With mode = "incremental": also rebuild what build-depends on a package that is rebuilt (`build
    # --rebuild-reverse-deps` for one build).
    rebuild_reverse_deps: bool = False

    @property
    def stage_build(self) -> str | None:
        """The build id of `stage = "build:ID"`, LATEST_BUILD, or None when `stage` is a file or URL."""
        if self.stage == LATEST_BUILD:
            return LATEST_BUILD
        if self.stage.startswith(BUILD_STAGE_PREFIX):
            return self.stage[len(BUILD_STAGE_PREFIX):]
        return None


KNOWN_KEYS = ("stage", "stage_sha256", "portage_profile", "portage_confdir", "make_conf", "world",
              "emerge_args", "overlays", "signing_key", "gnupghome", "passphrase_file", "stage4", "seed_stage",
              "seed_stage_sha256", "mode", "full_every_days",
              "rebuild_reverse_deps")
BUILD_MODES = ("full", "incremental")


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


def parse_overlays(key: str, value: Any, base: Path) -> list[Overlay]:
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
    raw_stage = _str(f"{pre}.stage", table["stage"])
    if raw_stage == LATEST_BUILD or raw_stage.startswith(BUILD_STAGE_PREFIX):
        if raw_stage != LATEST_BUILD and not BUILD_ID_RE.match(raw_stage[len(BUILD_STAGE_PREFIX):]):
            raise ConfigError(f"{pre}.stage: expected \"build:YYYY-MM-DD.N\" (a build id), got {raw_stage!r}")
        prof = Profile(name=name, stage=raw_stage)
        if "stage_sha256" in table:
            raise ConfigError(f"{pre}.stage_sha256: the stage is a build's stage4, whose sha256 comes from that "
                              "build's build.json; pin the fallback with seed_stage_sha256")
    else:
        prof = Profile(name=name, stage=_stage(f"{pre}.stage", raw_stage, base))
    for key in ("seed_stage", "seed_stage_sha256"):
        if key in table and prof.stage != LATEST_BUILD:
            raise ConfigError(f"{pre}.{key}: only with stage = \"{LATEST_BUILD}\" (the stage used while the "
                              "profile has no good build with a stage4)")
    if "seed_stage" in table:
        prof.seed_stage = _stage(f"{pre}.seed_stage", table["seed_stage"], base)
    elif "seed_stage_sha256" in table:
        raise ConfigError(f"{pre}.seed_stage_sha256: set seed_stage too (the stage it pins)")
    for key in ("stage_sha256", "seed_stage_sha256"):
        if key in table:
            sha = _str(f"{pre}.{key}", table[key]).strip().lower()
            if not SHA256_RE.match(sha):
                raise ConfigError(f"{pre}.{key}: expected 64 hex digits, got {table[key]!r}")
            setattr(prof, key, sha)
    if "mode" in table:
        mode = _str(f"{pre}.mode", table["mode"])
        if mode not in BUILD_MODES:
            raise ConfigError(f"{pre}.mode: expected one of {', '.join(BUILD_MODES)}, got {mode!r}")
        prof.mode = mode
    if "full_every_days" in table:
        days = table["full_every_days"]
        if isinstance(days, bool) or not isinstance(days, int) or days < 0:
            raise ConfigError(f"{pre}.full_every_days: expected a whole number of days (0: never), got {days!r}")
        prof.full_every_days = days
    if "rebuild_reverse_deps" in table:
        if not isinstance(table["rebuild_reverse_deps"], bool):
            raise ConfigError(f"{pre}.rebuild_reverse_deps: expected true or false, got {table['rebuild_reverse_deps']!r}")
        prof.rebuild_reverse_deps = table["rebuild_reverse_deps"]
    if "stage4" in table:
        if not isinstance(table["stage4"], bool):
            raise ConfigError(f"{pre}.stage4: expected true or false, got {table['stage4']!r}")
        prof.stage4 = table["stage4"]
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
        prof.overlays = parse_overlays(f"{pre}.overlays", table["overlays"], base)
    if "signing_key" in table:
        prof.signing_key = normalize_fingerprint(_str(f"{pre}.signing_key", table["signing_key"]),
                                                 f"{pre}.signing_key")
    if "gnupghome" in table:
        prof.gnupghome = _path(f"{pre}.gnupghome", table["gnupghome"], base)
    if "passphrase_file" in table:
        prof.passphrase_file = _path(f"{pre}.passphrase_file", table["passphrase_file"], base)
    return prof


_FPR_RE = re.compile(r"^[0-9A-F]{40}$")
_TIME_RE = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9._/-]+$")
_PG_URL_RE = re.compile(r"^postgres(?:ql)?://", re.IGNORECASE)
_CONNINFO_RE = re.compile(r"^\s*[A-Za-z_]+\s*=")  # libpq "key=value ..." (service=NAME, host=... dbname=...)
_URL_PASSWORD_RE = re.compile(r"^(postgres(?:ql)?://[^:/@?#]*):[^/?#]*@", re.IGNORECASE)
_PARAM_PASSWORD_RE = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE)


def redact_conninfo(conninfo: str) -> str:
    """A PostgreSQL URL or libpq connection string with any password replaced by ***, for messages."""
    return _PARAM_PASSWORD_RE.sub(r"\1***", _URL_PASSWORD_RE.sub(r"\1:***@", conninfo))


def conninfo_has_password(conninfo: str) -> bool:
    return redact_conninfo(conninfo) != conninfo or bool(re.search(r"\bpassword\s*=", conninfo, re.IGNORECASE))


def check_queue_location(value: str, what: str) -> str:
    """`value` if it names a build queue ("sqlite", a postgresql:// URL, a libpq connection string such
    as "service=NAME") without a password in it; ConfigError naming `what` otherwise (redacted)."""
    if value == "sqlite":
        return value
    if not (_PG_URL_RE.match(value) or _CONNINFO_RE.match(value)):
        raise ConfigError(f"{what}: expected \"sqlite\", a postgresql:// URL or a libpq connection string such as "
                          f"\"service=NAME\", got {redact_conninfo(value)!r}")
    if conninfo_has_password(value):
        raise ConfigError(f"{what}: {redact_conninfo(value)!r} holds a password; give credentials the libpq way "
                          "instead: ~/.pgpass (or PGPASSFILE), a service file (PGSERVICEFILE) or PGPASSWORD")
    return value


@dataclass
class GitSettings:
    """[git]: the snapshot repository's branch, identity, tag signing and push remotes."""

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
    # Limits and deadlines (docs/security.md): every network step and every input is bounded.
    deadline: float = 1800.0  # seconds for one download (retries included), an overlay fetch, a push
    max_side_file_size: int = 64 << 10  # bytes: .md5sum, .gpgsig
    max_tarball_size: int = 1 << 30  # bytes: the compressed snapshot as downloaded
    max_unpacked_size: int = 8 << 30  # bytes: the uncompressed tar stream of a snapshot
    max_member_size: int = 512 << 20  # bytes: any one file of a snapshot


@dataclass
class PublishSettings:
    """[publish]: signed webrsync snapshots for clients."""

    out: Path | None = None
    signing_key: str = ""
    gnupghome: Path | None = None
    keep: int = 0  # 0 keeps every published day
    xz_level: int = 9
    xz_threads: int = 0  # 0: one per core


BUILD_ROOTS = ("overlay", "extract")


@dataclass
class BuildSettings:
    """[build]: where chroot builds work and where their results go."""

    work_dir: Path = Path("/var/tmp/snapshotter/builds")  # one root per build, removed afterwards
    output: Path = Path("/var/cache/snapshotter/packages")  # OUTPUT/<profile>/<tag>.<N>/, one per build
    cache_dir: Path = Path("/var/cache/snapshotter/build")  # downloaded stages, overlay clones
    distfiles: Path | None = None  # DISTDIR shared by all builds (bind-mounted); default CACHE_DIR/distfiles
    # Build roots: "overlay" (an overlayfs over the stage unpacked once in CACHE_DIR/roots; extraction where
    # overlayfs is unavailable, said in the log) or "extract" (every build extracts its stage afresh).
    root: str = "overlay"
    cached_stages: int = 3  # unpacked stages kept in CACHE_DIR/roots (the newest used); `purge` trims
    cached_trees: int = 8  # exported trees (per tree id) kept in CACHE_DIR/trees (the newest used); `purge` trims


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
    queue: str = "sqlite"  # the build queue: "sqlite" (state_dir) or PostgreSQL (URL or "service=NAME")


@dataclass
class BinhostSettings:
    """[binhost]: delivering builds to clients (signed packages, editions, retention; docs/binhost.md)."""

    web_root: Path | None = None  # WEB_ROOT/<edition>/<profile> are the editions' document roots
    editions: list[str] = field(default_factory=lambda: ["testing", "production"])
    automatic_edition: str = "testing"  # moved to each successful build (forward only); "" for none
    signing_key: str = ""  # fingerprint: signs gpkgs, edition.json and settings tarballs
    gnupghome: Path | None = None  # keyring holding signing_key's secret key; default gpg's own
    passphrase_file: Path | None = None  # the key's passphrase (loopback pinentry); default none
    keep_builds: int = 5  # purge keeps the newest N builds of each profile
    rollback_days: int = 14  # ... and whatever an edition pointed at within this many days


_LISTEN_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class Endpoint:
    """One `[[tls.endpoints]]`: the TLS endpoint of a (profile, edition) at its own IP:port."""

    profile: str
    edition: str
    listen: str  # "IP:PORT" ("[IPv6]:PORT"), normalised
    server_cert: str  # NAME of `snapshotter pki issue-server NAME`

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass
class TlsSettings:
    """[tls]: the PKI of client certificates and the lighttpd endpoints (docs/tls.md)."""

    pki_dir: Path = Path("/etc/snapshotter/pki")  # root only (0700): CA keys, issued certificates, CRLs
    server_cert: str = "binhost"  # default server certificate of the endpoints (pki issue-server NAME)
    access_log_dir: Path = Path("/var/log/lighttpd")  # snapshotter-PROFILE-EDITION.access.log per endpoint
    endpoints: list[Endpoint] = field(default_factory=list)


def parse_listen(key: str, value: Any) -> str:
    """Normalise "IP:PORT" or "[IPv6]:PORT"; ConfigError naming `key` for anything else."""
    s = _str(key, value)
    m = _LISTEN_RE.match(s)
    port = int(m.group("port")) if m else 0
    if not m or not 1 <= port <= 65535:
        raise ConfigError(f"{key}: expected \"IP:PORT\" (an IPv6 address in brackets), got {s!r}")
    try:
        ip = ipaddress.ip_address(m.group("v6") or m.group("v4"))
    except ValueError:
        raise ConfigError(f"{key}: not an IP address: {s!r} (endpoints are IP-based virtual hosts)") from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_tls(table: Any, base: Path) -> TlsSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"tls: expected a table ([tls]), got {table!r}")
    rest = {k: v for k, v in table.items() if k != "endpoints"}
    tls: TlsSettings = _section("tls", TlsSettings, rest, base)
    raw = table.get("endpoints", [])
    if not isinstance(raw, list):
        raise ConfigError("tls.endpoints: expected tables [[tls.endpoints]] {profile, edition, listen}")
    known = ("profile", "edition", "listen", "server_cert")
    for i, item in enumerate(raw):
        k = f"tls.endpoints[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{k}: expected a table {{profile, edition, listen}}, got {item!r}")
        for sub in item:
            if sub not in known:
                raise ConfigError(f"{k}.{sub}: unknown key (known: {', '.join(sorted(known))})")
        for sub in ("profile", "edition", "listen"):
            if sub not in item:
                raise ConfigError(f"{k}.{sub}: missing")
        names = {sub: _str(f"{k}.{sub}", item.get(sub, tls.server_cert))
                 for sub in ("profile", "edition", "server_cert")}
        for sub, v in names.items():
            if not NAME_RE.match(v):
                raise ConfigError(f"{k}.{sub}: not a valid name: {v!r}")
        tls.endpoints.append(Endpoint(listen=parse_listen(f"{k}.listen", item["listen"]), **names))
    return tls


@dataclass(frozen=True)
class SigningSettings:
    """The key that signs a profile's packages and published files (see `signing_for`)."""

    fingerprint: str
    gnupghome: Path | None
    passphrase_file: Path | None


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
    binhost: BinhostSettings = field(default_factory=BinhostSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    profiles: dict[str, Profile] = field(default_factory=dict)


_SECTIONS: dict[str, type] = {
    "git": GitSettings,
    "sync": SyncSettings,
    "publish": PublishSettings,
    "build": BuildSettings,
    "service": ServiceSettings,
    "binhost": BinhostSettings,
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
    if cfg.sync.deadline <= 0:
        raise ConfigError(f"sync.deadline: must be positive, got {cfg.sync.deadline}")
    for key in ("max_side_file_size", "max_tarball_size", "max_unpacked_size", "max_member_size"):
        if getattr(cfg.sync, key) < 1:
            raise ConfigError(f"sync.{key}: must be a positive number of bytes, got {getattr(cfg.sync, key)}")
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
    check_queue_location(cfg.service.queue, "service.queue")
    for i, name in enumerate(cfg.service.build_profiles):
        if cfg.profiles and name not in cfg.profiles:
            raise ConfigError(f"service.build_profiles[{i}]: no profile {name!r} (known: {', '.join(sorted(cfg.profiles))})")
    if cfg.build.root not in BUILD_ROOTS:
        raise ConfigError(f"build.root: expected one of {', '.join(BUILD_ROOTS)}, got {cfg.build.root!r}")
    for key in ("cached_stages", "cached_trees"):
        if getattr(cfg.build, key) < 1:
            raise ConfigError(f"build.{key}: must be at least 1, got {getattr(cfg.build, key)}")
    _validate_binhost(cfg.binhost)
    _validate_tls(cfg)
    return cfg


def _validate_binhost(b: BinhostSettings) -> None:
    if not b.editions:
        raise ConfigError("binhost.editions: at least one edition is required")
    for i, name in enumerate(b.editions):
        if not NAME_RE.match(name):
            raise ConfigError(f"binhost.editions[{i}]: not a valid edition name (letters, digits, '.', '_', '-'; "
                              f"not starting with '.' or '-'): {name!r}")
        if name in b.editions[:i]:
            raise ConfigError(f"binhost.editions[{i}]: edition {name!r} is listed twice")
    if b.automatic_edition and b.automatic_edition not in b.editions:
        raise ConfigError(f"binhost.automatic_edition: {b.automatic_edition!r} is not one of binhost.editions "
                          f"({', '.join(b.editions)}); \"\" for none")
    if b.signing_key:
        b.signing_key = normalize_fingerprint(b.signing_key, "binhost.signing_key")
    if b.keep_builds < 1:
        raise ConfigError(f"binhost.keep_builds: must be at least 1, got {b.keep_builds}")
    if b.rollback_days < 0:
        raise ConfigError(f"binhost.rollback_days: must not be negative, got {b.rollback_days}")


def _validate_tls(cfg: Config) -> None:
    t = cfg.tls
    if not NAME_RE.match(t.server_cert):
        raise ConfigError(f"tls.server_cert: not a valid name: {t.server_cert!r}")
    seen: dict[tuple[str, str], int] = {}
    listens: dict[str, int] = {}
    for i, ep in enumerate(t.endpoints):
        k = f"tls.endpoints[{i}]"
        if ep.edition not in cfg.binhost.editions:
            raise ConfigError(f"{k}.edition: {ep.edition!r} is not one of binhost.editions "
                              f"({', '.join(cfg.binhost.editions)})")
        if cfg.profiles and ep.profile not in cfg.profiles:
            raise ConfigError(f"{k}.profile: no profile {ep.profile!r} (known: {', '.join(sorted(cfg.profiles))})")
        if (ep.profile, ep.edition) in seen:
            raise ConfigError(f"{k}: profile {ep.profile!r} edition {ep.edition!r} already has an endpoint "
                              f"(tls.endpoints[{seen[ep.profile, ep.edition]}])")
        if ep.listen in listens:
            raise ConfigError(f"{k}.listen: {ep.listen} is already used by tls.endpoints[{listens[ep.listen]}] "
                              "(one IP:port per profile and edition)")
        seen[ep.profile, ep.edition] = i
        listens[ep.listen] = i


def signing_for(cfg: Config, profile: Profile | str) -> SigningSettings | None:
    """The signing key of `profile`: each of signing_key, gnupghome and passphrase_file is taken from
    `[profiles.NAME]` when set there, else from `[binhost]`. None when neither names a signing key."""
    prof = cfg.profiles.get(profile) if isinstance(profile, str) else profile
    b = cfg.binhost
    fpr = (prof.signing_key if prof is not None else None) or b.signing_key
    if not fpr:
        return None
    home = prof.gnupghome if prof is not None and prof.gnupghome is not None else b.gnupghome
    passphrase = (prof.passphrase_file if prof is not None and prof.passphrase_file is not None
                  else b.passphrase_file)
    return SigningSettings(fingerprint=fpr, gnupghome=home, passphrase_file=passphrase)


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
        elif key == "tls":
            cfg.tls = parse_tls(value, base)
        elif key == "profiles":
            if not isinstance(value, dict):
                raise ConfigError("profiles: expected tables [profiles.NAME]")
            cfg.profiles = {name: parse_profile(name, table, base) for name, table in value.items()}
        else:
            known = sorted([*_TOP_LEVEL, *_SECTIONS, "profiles", "tls"])
            raise ConfigError(f"{key}: unknown key (known: {', '.join(known)})")
    return cfg
