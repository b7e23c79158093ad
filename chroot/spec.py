"""What a caller hands the builder: a typed, fully resolved build spec.

The library does not read configuration files or repositories: the caller resolves the tag to a commit,
fetches and pins the stage and the overlays, and passes them here. Trees reach the root through the
`TreeSource` protocol, which the caller implements (e.g. a git commit exported into a cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

DEFAULT_FEATURES = ("buildpkg", "cgroup", "ipc-sandbox", "network-sandbox", "parallel-fetch")
DEFAULT_EMERGE_ARGS = ("--emptytree", "@world")
# Variables the builder owns: both directories are bind-mounted from the host.
RESERVED_VARS = frozenset({"PKGDIR", "DISTDIR"})


class TreeSource(Protocol):
    """An ebuild repository pinned at one commit: a directory holding its tree, which the build sees
    read-only at /var/db/repos/NAME (a bind mount in the build's namespace)."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> Path:
        """The tree's directory; it must not change while the build runs (the caller holds it)."""

    def describe(self) -> dict[str, str]:
        """What build.json records about it (name, url, ref, commit)."""


@dataclass(frozen=True)
class PortageSettings:
    """The root's Portage configuration for one build profile."""

    name: str  # the build profile's name (make.conf header, log lines)
    make_conf: dict[str, str] = field(default_factory=dict)
    portage_profile: str | None = None  # relative to the gentoo tree's profiles/; None keeps the stage's
    portage_confdir: Path | None = None
    portage_confdir_sha256: str | None = None  # the caller's digest of it, recorded in build.json
    world: list[str] | None = None  # None keeps the stage's /var/lib/portage/world
    emerge_args: list[str] = field(default_factory=lambda: list(DEFAULT_EMERGE_ARGS))

    def features(self) -> list[str]:
        """FEATURES for make.conf: the configured (or default) ones, always with buildpkg."""
        given = self.make_conf.get("FEATURES")
        feats = given.split() if given is not None else list(DEFAULT_FEATURES)
        if "buildpkg" not in feats:
            feats.insert(0, "buildpkg")
        return feats


@dataclass(frozen=True)
class Stage:
    """A local stage tarball and the sha256 it must have (None: not pinned, only recorded)."""

    path: Path
    source: str  # what build.json records: the configured path or URL
    sha256: str | None = None
    build: str | None = None  # the build id whose stage4 this is (a seeded build), recorded in build.json
    # The stage already unpacked by the caller from a file with the pinned `sha256` (held unchanged for the
    # build): the read-only lower layer of an overlay root (chroot.overlay). None: the build extracts `path`.
    unpacked: Path | None = None


@dataclass(frozen=True)
class Signing:
    """Sign every gpkg the Portage way (FEATURES=binpkg-signing, BINPKG_GPG_SIGNING_*).

    The caller has checked that `gnupghome` holds the secret key and that it can sign. The builder copies
    the home (and the passphrase file) into a tmpfs that exists only in the build's mount namespace
    (nsrun.PrivateDir), so the key is never in the stage, the root or a package, and trusts
    `public_key` in the root's /etc/portage/gnupg (Portage verifies each package it has just signed).
    """

    gnupghome: Path  # host directory holding the secret key
    fingerprint: str  # BINPKG_GPG_SIGNING_KEY (40 hex digits)
    public_key: str  # the key's armored public part
    passphrase_file: Path | None = None  # given to gpg with the loopback pinentry (no terminal needed)


@dataclass(frozen=True)
class Reuse:
    """An incremental build: package files of an earlier good build are hard-linked into the new build's
    packages/ before emerge runs (chroot.incremental), so that `--usepkg` reuses them instead of building."""

    base_build: str  # the id of the build whose packages are reused
    base_packages: Path  # its packages/ directory
    paths: list[str]  # package files relative to base_packages to link (the caller chose them)


@dataclass(frozen=True)
class BuildSpec:
    settings: PortageSettings
    tag: str
    commit: str
    repo: str  # where the gentoo tree comes from (recorded in build.json)
    stage: Stage
    gentoo: TreeSource
    overlays: list[TreeSource]
    work_dir: Path  # this profile's build roots: WORK/<profile>/<tag>-<time>-<pid>/root
    output: Path  # this build's own directory (OUTPUT/<profile>/<build id>/), created by the caller, empty
    build_id: str  # recorded in build.json
    distfiles: Path  # DISTDIR, shared by builds, bind-mounted
    signing: Signing | None = None  # None: the packages are not signed
    keep_root: bool = False
    tool_version: str = ""  # recorded in build.json
    stage4: bool = False  # pack the root of a successful build as OUTPUT/.../stage4.tar.zst (chroot.stage4)
    source_time: int = 0  # unix time every member of the stage4 gets (the tag's commit time)
    reuse: Reuse | None = None  # an incremental build's reused packages; None: a full build
