"""A build of one profile at one tag, as the service runs it: resolve, pin, check, lock, allocate the
build's id and directory, then hand the chroot library a typed `BuildSpec`.

Here the configuration meets the builder: the tag is resolved to a commit of the snapshot repository,
the signing key is checked with a test signature, overlays are fetched into bare cache clones and pinned
to commits, the stage is fetched with the same downloader as snapshots (retries, resume, size checks) and
its sha256 checked, and the profile's lock is held for the whole build (one build per profile at a time).
Only then does the build get its id and its own directory (binhost.builds.allocate): a build that fails
any of these checks leaves no directory; one that fails later is recorded there as failed. Errors of the
chroot library come back as SnapshotterError with the same message and exit status.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from chroot import builder, portageconf
from chroot.builder import BuildResult
from chroot.errors import ChrootError
from chroot.spec import BuildSpec, PortageSettings, Signing, Stage
from chroot.stage import verify_stage
from snapshotter import __version__, openpgp
from snapshotter.binhost.builds import Build, allocate, find_build, list_builds, manifest
from snapshotter.config import (
    LATEST_BUILD,
    STAGE_SUFFIXES,
    Config,
    Overlay,
    Profile,
    SigningSettings,
    is_url,
    parse_overlays,
    signing_for,
    validate_name,
)
from snapshotter.download import DEFAULT_DEADLINE, Downloader
from snapshotter.errors import ConfigError, SnapshotterError
from snapshotter.fsutil import check_private_dir, file_digest, tree_hash
from snapshotter.git.export import resolve
from snapshotter.git.repository import Repository, git
from snapshotter.lock import flocked
from snapshotter.service import buildcache, delivery, incremental

log = logging.getLogger(__name__)

UNSIGNED_WARNING = ("profile %s has no signing key ([binhost] signing_key): its packages are not signed, and "
                    "Portage 3.0.78 and later refuse unsigned binary packages by default (binpkg appears unsigned)")



@dataclass
class BuildRequest:
    profile: str
    tag: str | None = None  # default: the newest tag of the snapshot repository
    overlay_refs: dict[str, str] = field(default_factory=dict)  # overlay name -> ref, overriding the profile
    output: Path | None = None  # default: [build].output
    keep_root: bool = False
    deliver: bool = True  # move the profile's automatic edition to a good build (rebuild checks: False)
    stage4: bool | None = None  # pack the root as a stage4; None: the profile's `stage4`
    incremental: bool | None = None  # reuse the newest good build's packages; None: the profile's `mode`
    reverse_deps: bool = False  # incremental: also rebuild what build-depends on a package built from source
    #                             (or the profile's rebuild_reverse_deps)


@dataclass(frozen=True)
class GitTree:
    """A commit of a git repository: the gentoo tree at a tag, an overlay at its pinned ref."""

    name: str
    repo: Path
    commit: str
    url: str = ""
    ref: str = ""

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "url": self.url, "ref": self.ref, "commit": self.commit}


@dataclass(frozen=True)
class ExportedTree:
    """A GitTree exported into the tree cache: what the build mounts read-only (chroot.spec.TreeSource)."""

    source: GitTree
    path: Path

    @property
    def name(self) -> str:
        return self.source.name

    def describe(self) -> dict[str, str]:
        return self.source.describe()


@contextmanager
def chroot_errors() -> Iterator[None]:
    """Errors of the chroot library as SnapshotterError: same one line, same exit status."""
    try:
        yield
    except ChrootError as e:
        raise SnapshotterError(str(e), e.exit_code) from None


def portage_settings(profile: Profile) -> PortageSettings:
    return PortageSettings(name=profile.name, make_conf=dict(profile.make_conf),
                           portage_profile=profile.portage_profile, portage_confdir=profile.portage_confdir,
                           portage_confdir_sha256=None if profile.portage_confdir is None
                           else tree_hash(profile.portage_confdir),
                           world=None if profile.world is None else list(profile.world),
                           emerge_args=list(profile.emerge_args))


def resolve_profile(cfg: Config, name: str, overlay_refs: dict[str, str] | None = None) -> Profile:
    """The configured profile `name`, with overlay refs overridden (every name must be one of its overlays)."""
    validate_name(name)
    prof = cfg.profiles.get(name)
    if prof is None:
        known = ", ".join(sorted(cfg.profiles)) or "none configured"
        raise ConfigError(f"unknown build profile {name!r} (profiles: {known})")
    if overlay_refs:
        names = {o.name for o in prof.overlays}
        for ov in overlay_refs:
            if ov not in names:
                raise ConfigError(f"overlay {ov!r} is not an overlay of profile {name}")
        prof = replace(prof, overlays=parse_overlays(
            f"profiles.{prof.name}.overlays",
            [{"name": o.name, "url": o.url, "ref": overlay_refs.get(o.name, o.ref)} for o in prof.overlays],
            Path("/")))
    return prof


def fetch_overlay(overlay: Overlay, cache_dir: Path, *, timeout: float = DEFAULT_DEADLINE) -> GitTree:
    """Fetch the overlay's git repository into a bare cache clone and resolve its ref to a commit.

    The fetch has `timeout` seconds (sync.deadline): a server that accepts and never answers fails the
    build instead of holding it (and its job's lease) forever.

    The ref is tried as a tag, then a branch, then a commit id (hex); anything else is an error naming
    the overlay.
    """
    cache = cache_dir / "overlays" / f"{overlay.name}.git"
    # Builds of different profiles may share an overlay cache: one fetch at a time.
    with flocked(cache_dir / "overlays" / f"{overlay.name}.lock", f"overlay cache {overlay.name}", wait=600):
        if not (cache / "HEAD").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            git(cache, "init", "--quiet", "--bare")
        log.info("overlay %s: fetching %s", overlay.name, overlay.url)
        try:
            git(cache, "fetch", "--quiet", "--force", "--prune", "--no-write-fetch-head", "--end-of-options",
                overlay.url, "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", timeout=timeout)
        except SnapshotterError as e:
            raise SnapshotterError(f"overlay {overlay.name}: fetching {overlay.url} failed: {e}") from None
    candidates = [f"refs/tags/{overlay.ref}", f"refs/heads/{overlay.ref}"]
    if all(c in "0123456789abcdef" for c in overlay.ref.lower()) and 7 <= len(overlay.ref) <= 64:
        candidates.append(overlay.ref)
    for cand in candidates:
        proc = git(cache, "rev-parse", "--verify", "--quiet", f"{cand}^{{commit}}", check=False)
        if proc.returncode == 0:
            commit = proc.stdout.decode().strip()
            log.info("overlay %s: %s is %s", overlay.name, overlay.ref, commit)
            return GitTree(overlay.name, cache, commit, overlay.url, overlay.ref)
    raise SnapshotterError(f"overlay {overlay.name}: ref {overlay.ref!r} is not a tag, branch or commit of "
                           f"{overlay.url}")




def fetch_stage(source: str, cache_dir: Path, expected_sha256: str | None, *, timeout: float = 60.0,
                retries: int = 4, deadline: float = DEFAULT_DEADLINE) -> Path:
    """The stage as a local file: `source` itself, or a download of the URL into `cache_dir`.

    A cached download whose sha256 matches `expected_sha256` is reused; without a pinned sha256 the URL
    is downloaded again every time.
    """
    if not is_url(source):
        p = Path(source)
        if not p.is_file():
            raise SnapshotterError(f"stage {p} does not exist")
        return p
    name = _download_name(source, expected_sha256)
    if not expected_sha256:
        log.warning("stage %s has no stage_sha256: it is downloaded every time and not verified", source)
    dest = cache_dir / name
    if expected_sha256 and dest.is_file() and file_digest(dest, "sha256") == expected_sha256:
        log.info("stage: using cached %s", dest)
        return dest
    log.info("stage: downloading %s", source)
    downloader = Downloader(cache_dir, timeout=timeout, retries=retries, deadline=deadline,
                            deadline_key="sync.deadline")
    try:
        return downloader.fetch(source, name)
    finally:
        downloader.close()


def _download_name(url: str, sha256: str | None) -> str:
    """The name a stage URL is downloaded to in the stage download cache (by sha256 prefix when pinned)."""
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if not name.endswith(STAGE_SUFFIXES):
        raise SnapshotterError(f"{name}: unknown stage compression (expected .tar.xz, .tar.bz2 or .tar.zst)")
    return f"{sha256[:16]}-{name}" if sha256 else name


def cached_stage_file(source: str, cache_dir: Path, sha256: str | None) -> Path | None:
    """The stage as a local file if it is one already (a path, or a pinned URL downloaded before), without
    downloading or hashing it; None otherwise."""
    if not is_url(source):
        path = Path(source)
    elif sha256:
        path = cache_dir / _download_name(source, sha256)
    else:
        return None
    return path if path.is_file() else None


@dataclass(frozen=True)
class StageSource:
    """Where a build's stage comes from: a configured file or URL, or a build's stage4."""

    source: str  # path or URL (fetch_stage)
    sha256: str | None
    build: str | None = None  # the build id whose stage4 it is


def _stage4_of(build: Build) -> StageSource | None:
    """The stage4 a good build packed, per its build.json (None: failed, or packed none)."""
    if not build.ok:
        return None
    s4 = manifest(build).get("stage4")
    if not isinstance(s4, dict):
        return None
    name, sha = s4.get("file"), s4.get("sha256")
    if not isinstance(name, str) or "/" in name or name.startswith(".") or not name.endswith(STAGE_SUFFIXES) \
            or not isinstance(sha, str):
        return None
    return StageSource(str(build.path / name), sha, build.id)


def resolve_stage(profile: Profile, output: Path) -> StageSource:
    """The stage a build of `profile` starts from.

    `stage = "latest-build"`: the stage4 of the profile's newest good build (by tag, then N) that has
    one, else `seed_stage` (so a chain starts, or restarts once its builds are purged, from a
    configured stage3); `stage = "build:ID"`: that build's stage4, which must exist and be good. A
    failed build is never a seed. The sha256 is build.json's, checked before anything is extracted.
    """
    which = profile.stage_build
    if which is None:
        return StageSource(profile.stage, profile.stage_sha256)
    key = f"profiles.{profile.name}.stage"
    if which == LATEST_BUILD:
        for b in reversed(list_builds(output, profile.name)):
            found = _stage4_of(b)
            if found is not None and Path(found.source).is_file():
                log.info("profile %s: seeded from the stage4 of build %s", profile.name, b.id)
                return found
        if profile.seed_stage is None:
            raise ConfigError(f"{key}: profile {profile.name} has no good build with a stage4 in {output} yet, "
                              "and no seed_stage to start the chain from")
        log.info("profile %s: no good build with a stage4 yet; seeded from seed_stage %s", profile.name,
                 profile.seed_stage)
        return StageSource(profile.seed_stage, profile.seed_stage_sha256)
    b = find_build(output, profile.name, which)
    if not b.ok:
        raise ConfigError(f"{key}: build {which} is {b.state}; only a good build seeds another")
    found = _stage4_of(b)
    if found is None or not Path(found.source).is_file():
        raise ConfigError(f"{key}: build {which} has no stage4 (built with stage4 = false, or removed)")
    return found


def default_gnupghome() -> Path:
    """gpg's own home when none is configured: $GNUPGHOME, else ~/.gnupg."""
    return Path(os.environ.get("GNUPGHOME") or Path.home() / ".gnupg")


def _agent_running(home: Path) -> bool:
    if shutil.which("gpg-connect-agent") is None:
        return True  # cannot tell: leave whatever runs alone
    # Its exit status is 0 either way; a running agent answers with a data line.
    proc = subprocess.run(["gpg-connect-agent", "--homedir", str(home), "--no-autostart", "GETINFO pid", "/bye"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    return any(line.startswith("D ") for line in proc.stdout.splitlines())


def _stop_agent(home: Path) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=30)


def check_signing(profile: Profile, signing: SigningSettings) -> Signing:
    """The chroot library's signing spec for `profile`, after a test signature with the key.

    SigningError (one line) when the home, the secret key or the passphrase file is missing or the key
    cannot sign (expired, revoked, needs a passphrase that is not given); ConfigError when the profile's
    make_conf contradicts signing. A gpg-agent that the test signature started is stopped again."""
    settings = portage_settings(profile)
    try:
        portageconf.check_signing_settings(settings)
    except ChrootError as e:
        raise ConfigError(str(e)) from None
    home = signing.gnupghome or default_gnupghome()
    what = f"profile {profile.name}: signing key {signing.fingerprint}"
    if not home.is_dir():
        raise openpgp.SigningError(f"{what}: gnupghome {home} does not exist or is not a directory")
    passphrase = signing.passphrase_file
    if passphrase is not None and (not passphrase.is_file() or not os.access(passphrase, os.R_OK)):
        raise openpgp.SigningError(f"{what}: passphrase file {passphrase} is missing or not readable")
    agent_was_running = _agent_running(home)
    try:
        with tempfile.TemporaryDirectory(prefix="snapshotter-signcheck-") as tmp:
            probe = Path(tmp) / "probe"
            probe.write_bytes(b"snapshotter: can this key sign packages?\n")
            openpgp.detach_sign(probe, signing.fingerprint, home, name="a test message", passphrase_file=passphrase)
        public = openpgp.export_public_key(signing.fingerprint, home)
    except openpgp.SigningError as e:
        hint = " (the key has a passphrase: set passphrase_file)" if "No pinentry" in str(e) else ""
        raise openpgp.SigningError(f"{what}: {e}{hint}; the build was not started") from None
    finally:
        if not agent_was_running:
            _stop_agent(home)
    log.info("%s: a test signature works; packages will be signed", what)
    return Signing(gnupghome=home.resolve(), fingerprint=signing.fingerprint, public_key=public.decode(),
                   passphrase_file=None if passphrase is None else passphrase.resolve())


def run_build(cfg: Config, req: BuildRequest, *, console: bool = False) -> BuildResult:
    """Build `req.profile` at `req.tag` (default: the newest tag) under the profile's lock, as a new
    build with its own id and directory (OUTPUT/<profile>/<TAG>.<N>/).

    Setup problems (unknown profile or tag, missing or unusable signing key, bad stage_sha256, overlay
    ref, locked profile) raise SnapshotterError before the build's directory exists; later ones are
    recorded there as a failed build and raised; an emerge failure returns ok=False (exit_status != 0).
    """
    profile = resolve_profile(cfg, req.profile, req.overlay_refs)
    sign_cfg = signing_for(cfg, profile)
    with chroot_errors():
        builder.check_host(signing=sign_cfg is not None)
    repo = Repository(cfg.repo, cfg.git.branch).require()
    if req.tag is None:
        newest = repo.newest_tag()
        if newest is None:
            raise SnapshotterError(f"{cfg.repo} has no snapshot tags yet; run `snapshotter sync` first")
        tag = newest
    else:
        tag = repo.find_tag(req.tag)
    signing = None if sign_cfg is None else check_signing(profile, sign_cfg)
    if signing is None:
        log.warning(UNSIGNED_WARNING, profile.name)
    work = cfg.build.work_dir
    work.mkdir(parents=True, exist_ok=True)
    check_private_dir(work)  # the default is under /var/tmp: a directory someone else made is refused
    with flocked(work / f"{profile.name}.lock", f"build profile {profile.name}"):
        # Everything that can be checked without a root is checked first: nothing is created on failure.
        overlays = [fetch_overlay(o, cfg.build.cache_dir, timeout=cfg.sync.deadline) for o in profile.overlays]
        output = req.output or cfg.build.output
        src = resolve_stage(profile, output)
        overlay_root = cfg.build.root == "overlay" and not req.keep_root
        stages, tree_cache = buildcache.stage_cache(cfg), buildcache.tree_cache(cfg)
        stage_file = None
        if overlay_root and src.sha256 and stages.contains(src.sha256):  # no download, no hashing: unpacked
            stage_file = cached_stage_file(src.source, cfg.build.cache_dir / "stages", src.sha256)
        if stage_file is None:
            stage_file = fetch_stage(src.source, cfg.build.cache_dir / "stages", src.sha256, timeout=cfg.sync.timeout,
                                     retries=cfg.sync.retries, deadline=cfg.sync.deadline)
        if overlay_root and src.sha256:
            # Hashed once, by the stage cache when it unpacks it (below, still before the build's directory
            # exists); an unpacked copy was checked when it was made: not hashed again for every build.
            stage_sha = src.sha256
        else:
            with chroot_errors():
                stage_sha = verify_stage(stage_file, src.sha256)
        _, source_time = resolve(repo.path, tag.commit)
        settings, reuse = incremental.plan(profile, portage_settings(profile), incremental=req.incremental,
                                           output=output, repo=repo.path, commit=tag.commit,
                                           overlays={o.name: o.commit for o in overlays}, signing=signing,
                                           tag=tag.name, overlay_repos={o.name: o.repo for o in overlays},
                                           reverse_deps=req.reverse_deps or profile.rebuild_reverse_deps)
        with ExitStack() as held:
            # Trees and the unpacked stage are held (shared locks) until the build is over: a purge
            # running meanwhile skips them.
            unpacked = None
            if overlay_root:
                with chroot_errors():
                    unpacked = held.enter_context(stages.unpacked(stage_file, stage_sha))
            gentoo_src = GitTree("gentoo", repo.path, tag.commit)
            gentoo = ExportedTree(gentoo_src, held.enter_context(tree_cache.tree(repo.path, tag.commit)))
            trees = [ExportedTree(o, held.enter_context(tree_cache.tree(o.repo, o.commit))) for o in overlays]
            build_id, out = allocate(output, profile.name, tag.name)
            log.info("build %s of profile %s at %s: %s", build_id, profile.name, tag.name, out)
            spec = BuildSpec(
                settings=settings, tag=tag.name, commit=tag.commit, repo=str(repo.path),
                stage=Stage(stage_file, src.source, stage_sha, build=src.build, unpacked=unpacked),
                gentoo=gentoo, overlays=list(trees),
                work_dir=work / profile.name, output=out, build_id=build_id,
                distfiles=cfg.build.distfiles or cfg.build.cache_dir / "distfiles", signing=signing,
                keep_root=req.keep_root, tool_version=__version__,
                stage4=profile.stage4 if req.stage4 is None else req.stage4, source_time=source_time, reuse=reuse)
            with chroot_errors():
                result = builder.run_build(spec, console=console)
        buildcache.purge_caches(cfg)  # back to [build] cached_stages / cached_trees, now that these are free
    if result.ok and req.output is None and req.deliver:
        deliver(cfg, profile.name, build_id)
    return result


def deliver(cfg: Config, profile: str, build_id: str) -> None:
    """Move the profile's automatic edition to a good build (forward only; see binhost.editions). The
    build stands whatever happens here: a problem is logged, not raised."""
    report = delivery.on_build_success(cfg, profile, build_id)
    if report.exit_status != 0:
        log.error("%s", report.message)
    elif report.changed:
        log.info("%s/%s: %s -> %s", profile, report.edition, report.from_build or "(none)", report.to_build)
    else:
        log.info("%s", report.message)
