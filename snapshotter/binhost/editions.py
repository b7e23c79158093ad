"""Editions: per (profile, edition) one document root that points at one build, switched atomically.

Layout under `[binhost] web_root` (docs/binhost.md):

    EDITION/PROFILE -> ../.snapshotter/roots/PROFILE/EDITION.N     the document root (a symlink)
    .snapshotter/builds/PROFILE/ID/       a build made publishable, once: packages/ (hard links to
                                          OUTPUT), snapshots/ (the tag, as `snapshotter publish` makes
                                          it), portage/ (the signed client settings)
    .snapshotter/builds/PROFILE/ID.files.json   sha256 of every file under ID/ (computed once)
    .snapshotter/roots/PROFILE/EDITION.N/ edition.json, edition.json.asc, b/ID -> the build,
                                          b/PREVIOUS -> the build before (for clients mid-update)
    .snapshotter/snapshots/FPR/COMMIT/    snapshots made once per (signing key, commit), files.json
                                          lists them
    .snapshotter/history.jsonl            the switches (history.py)
    .snapshotter/lock                     held around every switch and purge

A switch builds a complete new root (edition.json signed and fsynced), then renames a new symlink over
EDITION/PROFILE and fsyncs the directory: a client sees the old root or the new one, and every path it
uses after reading edition.json (`b/ID/...`) stays valid across the next switch too. Killed at any point,
the edition is at the old build or the new one; what is left over (a root never switched to, a
temporary symlink, a missing history line) is cleaned or written by the next switch or purge.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from snapshotter.binhost import history
from snapshotter.binhost.builds import Build, find_build, list_builds, manifest, parse_id
from snapshotter.binhost.settings import settings_tarball
from snapshotter.config import Config, SigningSettings, signing_for, validate_name
from snapshotter.errors import ConfigError, SnapshotterError
from snapshotter.fsutil import atomic_write, fsync_dir, is_temp, temp_name
from snapshotter.git.export import resolve
from snapshotter.git.repository import Repository, Tag
from snapshotter.lock import flocked
from snapshotter.openpgp import SigningError, detach_sign

log = logging.getLogger(__name__)

META = ".snapshotter"
EDITION_JSON = "edition.json"
FORMAT = 1
# Test hook: with SNAPSHOTTER_TEST_STOP_AT=STEP the process stops itself (SIGSTOP) at that step of a
# switch, so a test can kill -9 it exactly there. Steps: publishable-made (before the rename of the build's
# publishable directory), root-made, root-signed, link-made, switched (after the rename, before history).
STOP_ENV = "SNAPSHOTTER_TEST_STOP_AT"
SWITCH_LOCK_WAIT = 600.0  # seconds an automatic switch (after a build) waits for a promotion or purge


def _step(name: str) -> None:
    if os.environ.get(STOP_ENV) == name:
        os.kill(os.getpid(), signal.SIGSTOP)


@dataclass(frozen=True)
class Layout:
    """The paths under a web root."""

    web_root: Path

    @property
    def meta(self) -> Path:
        return self.web_root / META

    @property
    def history(self) -> Path:
        return self.meta / "history.jsonl"

    @property
    def lock(self) -> Path:
        return self.meta / "lock"

    def builds_dir(self, profile: str) -> Path:
        return self.meta / "builds" / profile

    def publishable(self, profile: str, build_id: str) -> Path:
        return self.builds_dir(profile) / build_id

    def files_json(self, profile: str, build_id: str) -> Path:
        return self.builds_dir(profile) / f"{build_id}.files.json"

    def roots_dir(self, profile: str) -> Path:
        return self.meta / "roots" / profile

    def snapshot_cache(self, fingerprint: str, commit: str) -> Path:
        return self.meta / "snapshots" / fingerprint / commit

    def doc_root(self, edition: str, profile: str) -> Path:
        return self.web_root / edition / profile


def layout(cfg: Config) -> Layout:
    if cfg.binhost.web_root is None:
        raise ConfigError("no web root: set [binhost] web_root (where the editions are published)")
    return Layout(cfg.binhost.web_root)


def check_edition(cfg: Config, edition: str) -> str:
    if edition not in cfg.binhost.editions:
        raise ConfigError(f"unknown edition {edition!r} (editions: {', '.join(cfg.binhost.editions)})")
    return edition


def require_signing(cfg: Config, profile: str) -> SigningSettings:
    s = signing_for(cfg, profile)
    if s is None:
        raise SigningError(f"no signing key for profile {profile}: set [binhost] signing_key "
                           f"(or [profiles.{profile}] signing_key)")
    return s


# ---- the state of an edition ---------------------------------------------------------------------------
@dataclass
class EditionState:
    profile: str
    edition: str
    root: str | None = None  # "EDITION.N" the document root points at
    build: str | None = None
    previous: str | None = None  # the build it pointed at before (edition.json previous_build)
    record: dict[str, Any] | None = None  # edition.json
    problem: str | None = None  # the document root exists but is not a usable root


def _root_name_ok(name: str, edition: str) -> bool:
    prefix = f"{edition}."
    return name.startswith(prefix) and name[len(prefix):].isdigit()


def current(lay: Layout, profile: str, edition: str) -> EditionState:
    """Where the document root of (profile, edition) points, read from the symlink and edition.json."""
    st = EditionState(profile, edition)
    link = lay.doc_root(edition, profile)
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return st
    except OSError as e:
        if e.errno == errno.EINVAL:
            st.problem = f"{link} is not a symlink"
            return st
        raise
    name = os.path.basename(target)
    expected = os.path.join("..", META, "roots", profile, name)
    if target != expected or not _root_name_ok(name, edition):
        st.problem = f"{link} points at {target}, not at a root of {profile}/{edition}"
        return st
    try:
        data = json.loads((lay.roots_dir(profile) / name / EDITION_JSON).read_text())
    except (OSError, ValueError) as e:
        st.problem = f"{link}: root {name} has no readable edition.json ({e})"
        return st
    st.root, st.record = name, data
    st.build = data.get("build") if isinstance(data.get("build"), str) else None
    prev = data.get("previous_build")
    st.previous = prev if isinstance(prev, str) else None
    return st


# ---- making a build publishable ------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create `path` (never existing before, never through a symlink) with `data`, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: Path, dst: Path) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())


def link_tree(src: Path, dst: Path, what: str) -> bool:
    """Hard-link every regular file below `src` into the new directory `dst` (same relative paths;
    symlinks are skipped). When hard links are impossible (EXDEV: another file system) the files are
    copied, with one warning. Returns whether it copied."""
    copied = False
    dst.mkdir(mode=0o755)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for d in dirnames:
            (dst / rel / d).mkdir(mode=0o755)
        for name in sorted(filenames):
            s = Path(dirpath) / name
            if s.is_symlink() or not s.is_file():
                continue
            t = dst / rel / name
            if not copied:
                try:
                    os.link(s, t, follow_symlinks=False)
                    continue
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    log.warning("%s: hard links from %s are impossible (another file system): copying the "
                                "files instead", what, src)
                    copied = True
            _copy_file(s, t)
    return copied


def _fsync_tree(top: Path) -> None:
    for dirpath, _dirnames, _filenames in os.walk(top):
        fsync_dir(Path(dirpath))


def hash_files(top: Path) -> dict[str, str]:
    """{relative path: sha256} of every regular file below `top`, sorted."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out[p.relative_to(top).as_posix()] = _sha256(p)
    return dict(sorted(out.items()))


SnapshotMaker = Callable[[Config, Tag, SigningSettings, Path], list[Path]]
"""Writes the snapshot of a tag, signed with the given key, into a directory (which exists) and returns
its files (the tarball and its side files, e.g. `.md5sum`, `.gpgsig`). The service passes the one of
`snapshotter publish` (service/delivery.py): this package does not import publish (tests/test_layers.py)."""

CACHE_FILES = "files.json"


def _snapshot(cfg: Config, lay: Layout, build: Build, signing: SigningSettings, dest: Path,
              maker: SnapshotMaker) -> None:
    """The build's tag as `maker` makes it, signed by the profile's key, hard-linked into `dest` from a cache
    that makes it once per (key, commit)."""
    repo = Repository(cfg.repo, cfg.git.branch).require()
    tag = repo.find_tag(build.tag)
    if tag.commit != build.commit:
        raise SnapshotterError(f"build {build.profile} {build.id}: tag {build.tag} is commit {tag.commit} in "
                               f"{cfg.repo}, but the build used {build.commit}")
    cache = lay.snapshot_cache(signing.fingerprint, tag.commit)
    cache.mkdir(parents=True, exist_ok=True)
    with flocked(cache / ".lock", f"snapshot cache {cache}", wait=3600):
        files = _cached_files(cache)
        if files is None:
            for dirpath, _dirnames, filenames in os.walk(cache):
                for name in filenames:
                    if is_temp(name):
                        os.unlink(os.path.join(dirpath, name))  # left by a maker that died
            made = maker(cfg, tag, signing, cache)
            files = [p.resolve().relative_to(cache.resolve()).as_posix() for p in made]
            atomic_write(cache / CACHE_FILES, (json.dumps(files) + "\n").encode(), durable=True)
        dest.mkdir(mode=0o755)
        for rel in files:
            src = cache / rel
            try:
                os.link(src, dest / src.name)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                _copy_file(src, dest / src.name)


def _cached_files(cache: Path) -> list[str] | None:
    """The files a maker made into `cache` earlier (all still there), or None."""
    try:
        files = json.loads((cache / CACHE_FILES).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and (cache / f).is_file()
                                                           for f in files):
        return None
    return files


def _sign(path: Path, signing: SigningSettings) -> None:
    sig = detach_sign(path, signing.fingerprint, signing.gnupghome, name=path.name,
                      passphrase_file=signing.passphrase_file)
    _write_new(path.with_name(path.name + ".asc"), sig)


def _settings(cfg: Config, build: Build, signing: SigningSettings, dest: Path) -> None:
    assert build.commit is not None
    _commit, mtime = resolve(cfg.repo, build.commit)
    s = settings_tarball(build, mtime)
    dest.mkdir(mode=0o755)
    _write_new(dest / s.name, s.data)
    _sign(dest / s.name, signing)


def _stage4(build: Build, signing: SigningSettings, dest: Path) -> None:
    """The stage4 the build packed (docs/build.md), if any: `stages/stage4-PROFILE-ID.tar.zst` hard-linked
    from the build's directory, with `.sha256` (sha256sum's format) and a detached signature `.asc`, so a
    new host can be installed from exactly what the edition runs. Its sha256 must be build.json's."""
    s4 = manifest(build).get("stage4")
    if s4 is None:
        return
    what = f"build {build.profile} {build.id}"
    name, sha = (s4.get("file"), s4.get("sha256")) if isinstance(s4, dict) else (None, None)
    if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(sha, str):
        raise SnapshotterError(f"{what}: build.json's stage4 is not {{file, sha256}}; refusing to publish it")
    src = build.path / name
    if src.is_symlink() or not src.is_file():
        raise SnapshotterError(f"{what}: its stage4 {src} is missing; refusing to publish it")
    dest.mkdir(mode=0o755)
    suffix = name[name.index(".tar"):] if ".tar" in name else ""
    pub = dest / f"stage4-{build.profile}-{build.id}{suffix}"
    try:
        os.link(src, pub, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        _copy_file(src, pub)
    if _sha256(pub) != sha:
        raise SnapshotterError(f"{what}: its stage4 {src} does not have the sha256 of build.json; refusing to "
                               "publish it")
    _write_new(dest / f"{pub.name}.sha256", f"{sha}  {pub.name}\n".encode())
    _sign(pub, signing)


def require_ok(build: Build, action: str) -> Build:
    if build.state != "ok":
        why = {"failed": "failed", "incomplete": "is incomplete (still running, or crashed)",
               "invalid": f"has an unreadable build.json ({build.detail})"}.get(build.state, build.state)
        raise SnapshotterError(f"build {build.profile} {build.id} {why}; refusing to {action} it")
    if build.unsigned:
        raise SnapshotterError(f"build {build.profile} {build.id} has unsigned packages (clients refuse them); "
                               f"refusing to {action} it")
    if not build.packages_dir.is_dir():
        raise SnapshotterError(f"build {build.profile} {build.id} has no packages/ directory; refusing to "
                               f"{action} it")
    return build


def _check_packages(build: Build, files: dict[str, str]) -> None:
    published = {k.removeprefix("packages/"): v for k, v in files.items() if k.startswith("packages/")}
    for rel, sha in build.package_files.items():
        if published.get(rel) != sha:
            raise SnapshotterError(f"build {build.profile} {build.id}: packages/{rel} does not match its "
                                   "build.json (changed or missing since the build)")


def _check_signing_key(build: Build, signing: SigningSettings) -> None:
    if build.signing_key and build.signing_key.upper() != signing.fingerprint:
        raise SnapshotterError(f"build {build.profile} {build.id} was signed with {build.signing_key}, but the "
                               f"profile's signing key is now {signing.fingerprint}; rebuild the tag")


def publishable_files(lay: Layout, profile: str, build_id: str) -> dict[str, str]:
    """The sha256 map of a publishable build (from ID.files.json; recomputed and written if missing)."""
    path = lay.files_json(profile, build_id)
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return {str(k): str(v) for k, v in data.items()}
    except (OSError, ValueError):
        pass
    files = hash_files(lay.publishable(profile, build_id))
    atomic_write(path, (json.dumps(files, indent=2, sort_keys=True) + "\n").encode(), durable=True)
    return files


def make_publishable(cfg: Config, build: Build, snapshot: SnapshotMaker,
                     signing: SigningSettings | None = None) -> Path:
    """`.snapshotter/builds/PROFILE/ID/` for `build` (made once; later calls return it).

    Built in a temporary directory next to it (packages hard-linked from OUTPUT, the tag's snapshot, the
    signed settings), checked against build.json, fsynced, then renamed into place.
    """
    lay = layout(cfg)
    require_ok(build, "publish")
    signing = signing or require_signing(cfg, build.profile)
    _check_signing_key(build, signing)
    dest = lay.publishable(build.profile, build.id)
    if dest.is_dir() and lay.files_json(build.profile, build.id).is_file():
        return dest
    pdir = lay.builds_dir(build.profile)
    pdir.mkdir(parents=True, exist_ok=True)
    with flocked(pdir / f".{build.id}.lock", f"publishing build {build.profile} {build.id}", wait=3600):
        if dest.is_dir():
            publishable_files(lay, build.profile, build.id)
            return dest
        for stale in pdir.glob(f".{build.id}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = pdir / f".{build.id}.partial-{os.getpid()}"
        partial.mkdir(mode=0o755)
        try:
            link_tree(build.packages_dir, partial / "packages", f"build {build.profile} {build.id}")
            _snapshot(cfg, lay, build, signing, partial / "snapshots", snapshot)
            _settings(cfg, build, signing, partial / "portage")
            _stage4(build, signing, partial / "stages")
            files = hash_files(partial)
            _check_packages(build, files)
            _fsync_tree(partial)
            _step("publishable-made")
            os.rename(partial, dest)
            fsync_dir(pdir)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        atomic_write(lay.files_json(build.profile, build.id),
                     (json.dumps(files, indent=2, sort_keys=True) + "\n").encode(), durable=True)
    log.info("build %s %s is publishable (%d files)", build.profile, build.id, len(files))
    return dest


# ---- switching -----------------------------------------------------------------------------------------
def edition_json(build: Build, edition: str, files: dict[str, str], previous: str | None, root: str,
                 entry: history.Entry, signing: SigningSettings) -> bytes:
    """edition.json: deterministic (sorted keys, 2-space indent, final newline)."""
    record = {
        "format": FORMAT,
        "profile": build.profile,
        "edition": edition,
        "build": build.id,
        "tag": build.tag,
        "commit": build.commit,
        "overlays": [{"name": n, "commit": c} for n, c in build.overlays],
        "path": f"b/{build.id}",
        "files": files,
        "previous_build": previous,
        "root": root,
        "signing_key": signing.fingerprint,
        "switched": entry.to_dict(),
    }
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _new_root(lay: Layout, profile: str, edition: str) -> tuple[str, Path]:
    d = lay.roots_dir(profile)
    d.mkdir(parents=True, exist_ok=True)
    used = [int(n[len(edition) + 1:]) for n in os.listdir(d) if _root_name_ok(n, edition)]
    n = max(used, default=0) + 1
    while True:
        name = f"{edition}.{n}"
        try:
            (d / name).mkdir(mode=0o755)
        except FileExistsError:
            n += 1
            continue
        return name, d / name


def _build_link(profile: str, build_id: str) -> str:
    # from roots/PROFILE/EDITION.N/b/ID up to .snapshotter/: b, EDITION.N, PROFILE, roots
    return os.path.join("..", "..", "..", "..", "builds", profile, build_id)


def reconcile(lay: Layout, profile: str, edition: str) -> None:
    """Write the history line of the current switch of (profile, edition) if it is missing (the switching
    process died after the rename). Called under the lock."""
    st = current(lay, profile, edition)
    if st.root is None or st.record is None:
        return
    last = history.last_for(history.read(lay.history), profile, edition)
    if last is not None and last.root == st.root:
        return
    sw = st.record.get("switched")
    if isinstance(sw, dict):
        try:
            history.append(lay.history, history.Entry.from_dict(sw))
            log.info("history: recorded the switch of %s/%s to %s (its line was missing)", profile, edition,
                     st.build)
        except ValueError:
            pass


@dataclass
class SwitchReport:
    """What a promote, rollback or automatic move did."""

    profile: str
    edition: str
    action: str
    from_build: str | None
    to_build: str | None
    changed: bool
    root: str | None = None
    message: str = ""
    exit_status: int = 0
    warnings: list[str] = field(default_factory=list)


def _switch(cfg: Config, lay: Layout, build: Build, edition: str, action: str,
            signing: SigningSettings) -> SwitchReport:
    """Point (build.profile, edition) at `build`. The caller holds the lock and made `build` publishable."""
    profile = build.profile
    for e in cfg.binhost.editions:
        reconcile(lay, profile, e)
    cur = current(lay, profile, edition)
    link = lay.doc_root(edition, profile)
    if link.exists() and not link.is_symlink():
        raise SnapshotterError(f"{link} exists and is not a symlink; move it away")
    if cur.build == build.id:
        return SwitchReport(profile, edition, action, cur.build, build.id, False, cur.root,
                            f"{profile}/{edition} is already at build {build.id}")
    if not lay.publishable(profile, build.id).is_dir() or not build.path.is_dir():
        raise SnapshotterError(f"build {profile} {build.id} was removed meanwhile (purge?)")
    files = publishable_files(lay, profile, build.id)
    entry = history.Entry(time=history.format_time(history.now_utc()), user=history.current_user(), action=action,
                          profile=profile, edition=edition, from_build=cur.build, to_build=build.id, root="")
    name, root = _new_root(lay, profile, edition)
    entry = replace(entry, root=name)
    try:
        (root / "b").mkdir(mode=0o755)
        os.symlink(_build_link(profile, build.id), root / "b" / build.id)
        if cur.build and cur.build != build.id and lay.publishable(profile, cur.build).is_dir():
            os.symlink(_build_link(profile, cur.build), root / "b" / cur.build)
        _step("root-made")
        _write_new(root / EDITION_JSON, edition_json(build, edition, files, cur.build, name, entry, signing))
        _sign(root / EDITION_JSON, signing)
        fsync_dir(root / "b")
        fsync_dir(root)
        fsync_dir(root.parent)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    _step("root-signed")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(link)
    os.symlink(os.path.join("..", META, "roots", profile, name), tmp)
    try:
        _step("link-made")
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
    _step("switched")
    history.append(lay.history, entry)
    msg = f"{profile}/{edition}: {cur.build or 'nothing'} -> {build.id} ({action})"
    log.info("%s", msg)
    return SwitchReport(profile, edition, action, cur.build, build.id, True, name, msg)


def _clean_temp_links(lay: Layout, edition: str) -> None:
    d = lay.web_root / edition
    if d.is_dir():
        for p in d.iterdir():
            if is_temp(p.name) and p.is_symlink():
                p.unlink(missing_ok=True)


def switch_to(cfg: Config, build: Build, edition: str, action: str, *, snapshot: SnapshotMaker,
              lock_wait: float = 0.0) -> SwitchReport:
    """Make `build` publishable (outside the lock: it may compress a snapshot), then switch under the lock."""
    lay = layout(cfg)
    check_edition(cfg, edition)
    signing = require_signing(cfg, build.profile)
    require_ok(build, action)
    make_publishable(cfg, build, snapshot, signing)
    lay.meta.mkdir(parents=True, exist_ok=True)
    with flocked(lay.lock, f"the web root {lay.web_root}", wait=lock_wait):
        _clean_temp_links(lay, edition)
        return _switch(cfg, lay, build, edition, action, signing)


def promote(cfg: Config, profile: str, to_edition: str, *, snapshot: SnapshotMaker, from_edition: str | None = None,
            build_id: str | None = None, lock_wait: float = 0.0) -> SwitchReport:
    """Point `to_edition` of `profile` at the build `from_edition` (default: the automatic edition) points
    at, or at `build_id`."""
    validate_name(profile)
    lay = layout(cfg)
    check_edition(cfg, to_edition)
    if build_id is not None and from_edition is not None:
        raise ConfigError("give --from or --build, not both")
    if build_id is None:
        src = from_edition or cfg.binhost.automatic_edition
        if not src:
            raise ConfigError("no automatic edition is configured: give --from EDITION or --build ID")
        check_edition(cfg, src)
        if src == to_edition:
            raise ConfigError(f"--from and --to are both {src}")
        st = current(lay, profile, src)
        if st.build is None:
            raise SnapshotterError(f"{profile}/{src} points at no build" + (f" ({st.problem})" if st.problem else "")
                                   + "; nothing to promote")
        build_id = st.build
    build = find_build(cfg.build.output, profile, build_id)
    return switch_to(cfg, build, to_edition, "promote", snapshot=snapshot, lock_wait=lock_wait)


def rollback(cfg: Config, profile: str, edition: str, *, snapshot: SnapshotMaker, to: str | None = None,
             lock_wait: float = 0.0) -> SwitchReport:
    """Point `edition` of `profile` back at the build it pointed at before the current one, or at `to`."""
    validate_name(profile)
    lay = layout(cfg)
    check_edition(cfg, edition)
    st = current(lay, profile, edition)
    if to is None:
        if st.build is None:
            raise SnapshotterError(f"{profile}/{edition} points at no build; nothing to roll back")
        if st.previous is None:
            raise SnapshotterError(f"{profile}/{edition} has no earlier build to roll back to (give --to ID)")
        to = st.previous
    parse_id(to)
    if to == st.build:
        raise SnapshotterError(f"{profile}/{edition} is at build {to} already")
    build = find_build(cfg.build.output, profile, to)
    return switch_to(cfg, build, edition, "rollback", snapshot=snapshot, lock_wait=lock_wait)


def on_build_success(cfg: Config, profile: str, build_id: str, *, snapshot: SnapshotMaker,
                     lock_wait: float = SWITCH_LOCK_WAIT) -> SwitchReport:
    """After a successful build: move the profile's automatic edition to it, only forward in (tag, N)
    order (a late build of an older tag never replaces a newer one; a rebuild of the same tag does).
    Nothing happens without a web root or an automatic edition.

    The build itself succeeded whatever happens here, so problems come back in the report, not as an
    exception: exit_status != 0 and a one-line message (no signing key, unsigned packages, a busy lock
    after `lock_wait` seconds, gpg failing, ...) for the caller to log.
    """
    auto = cfg.binhost.automatic_edition
    if cfg.binhost.web_root is None or not auto:
        why = "no [binhost] web_root" if cfg.binhost.web_root is None else "no automatic edition"
        return SwitchReport(profile, auto, "automatic", None, build_id, False, message=f"not published ({why})")
    try:
        return _automatic(cfg, profile, build_id, auto, snapshot, lock_wait)
    except SnapshotterError as e:
        return SwitchReport(profile, auto, "automatic", None, build_id, False,
                            message=f"build {profile} {build_id} not published to {auto}: {e}", exit_status=e.exit_code)


def _automatic(cfg: Config, profile: str, build_id: str, auto: str, snapshot: SnapshotMaker,
               lock_wait: float) -> SwitchReport:
    lay = layout(cfg)
    build = find_build(cfg.build.output, profile, build_id)
    cur = current(lay, profile, auto)
    if cur.build is not None and parse_id(cur.build) >= build.key:
        return SwitchReport(profile, auto, "automatic", cur.build, cur.build, False, cur.root,
                            f"{profile}/{auto} stays at {cur.build} (not older than {build.id})")
    signing = require_signing(cfg, profile)
    require_ok(build, "publish")
    make_publishable(cfg, build, snapshot, signing)
    lay.meta.mkdir(parents=True, exist_ok=True)
    with flocked(lay.lock, f"the web root {lay.web_root}", wait=lock_wait):
        _clean_temp_links(lay, auto)
        cur = current(lay, profile, auto)  # another build may have moved it meanwhile
        if cur.build is not None and parse_id(cur.build) >= build.key:
            return SwitchReport(profile, auto, "automatic", cur.build, cur.build, False, cur.root,
                                f"{profile}/{auto} stays at {cur.build} (not older than {build.id})")
        return _switch(cfg, lay, build, auto, "automatic", signing)


# ---- reports for `snapshotter builds` and `snapshotter editions` ----------------------------------------
def _known_profiles(cfg: Config, lay: Layout | None, builds: list[Build]) -> list[str]:
    names = set(cfg.profiles) | {b.profile for b in builds}
    if lay is not None and (lay.meta / "roots").is_dir():
        names |= {p for p in os.listdir(lay.meta / "roots") if not p.startswith(".")}
    return sorted(names)


@dataclass
class BuildRow:
    build: Build
    editions: list[str]  # editions pointing at it


@dataclass
class BuildsReport:
    rows: list[BuildRow]
    exit_status: int = 0


def builds_report(cfg: Config, profile: str | None = None) -> BuildsReport:
    if profile is not None:
        validate_name(profile)
    builds = list_builds(cfg.build.output, profile)
    pointing: dict[tuple[str, str], list[str]] = {}
    if cfg.binhost.web_root is not None:
        lay = Layout(cfg.binhost.web_root)
        for prof in ([profile] if profile else _known_profiles(cfg, lay, builds)):
            for edition in cfg.binhost.editions:
                st = current(lay, prof, edition)
                if st.build:
                    pointing.setdefault((prof, st.build), []).append(edition)
    return BuildsReport([BuildRow(b, pointing.get((b.profile, b.id), [])) for b in builds])


@dataclass
class EditionsReport:
    states: list[EditionState]
    history: list[history.Entry]  # newest last
    exit_status: int = 0


def editions_report(cfg: Config, profile: str | None = None, limit: int = 20) -> EditionsReport:
    """Where each (profile, edition) points, and the last `limit` switches (of `profile`)."""
    lay = layout(cfg)
    if profile is not None:
        validate_name(profile)
    profiles = [profile] if profile else _known_profiles(cfg, lay, list_builds(cfg.build.output))
    states = [current(lay, p, e) for p in profiles for e in cfg.binhost.editions]
    entries = [e for e in history.read(lay.history) if profile is None or e.profile == profile]
    return EditionsReport(states, entries[-limit:] if limit > 0 else entries)
