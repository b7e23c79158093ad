"""`snapshotter purge`: remove builds no policy keeps, and what only they used; disk use for `status`.

A build is kept when it is among the newest `[binhost] keep_builds` builds of its profile (tag, N order,
whatever their state), when an edition points at it or keeps it as the previous build of its current
root (clients in the middle of an update), or when an edition pointed at it within the last
`[binhost] rollback_days` days (history), or when its stage4 seeds the profile's next build (`stage =
"latest-build"` or `"build:ID"`, docs/build.md). An incomplete build (no build.json) is kept while a build of its
profile runs on this host (the profile's build lock is held). Everything else goes: first a tombstone
(its id is never handed out again), then its publishable copy under the web root, then its OUTPUT
directory. Then roots no edition points at, and cached snapshots no publishable build links any more.
The whole purge holds the editions' lock, so no switch happens meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.binhost import history
from snapshotter.binhost.builds import INCOMPLETE, Build, build_lock_path, list_builds, manifest, tombstone
from snapshotter.binhost.editions import CACHE_FILES, Layout, current, reconcile
from snapshotter.config import LATEST_BUILD, NAME_RE, Config
from snapshotter.errors import LockedError, SnapshotterError
from snapshotter.fsutil import fsync_dir
from snapshotter.lock import flocked

log = logging.getLogger(__name__)


@dataclass
class Kept:
    build: Build
    reasons: list[str]


@dataclass
class PurgeReport:
    dry_run: bool
    removed: list[Build] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    roots_removed: list[str] = field(default_factory=list)  # PROFILE/EDITION.N
    snapshots_removed: list[str] = field(default_factory=list)  # FPR/COMMIT
    exit_status: int = 0


def _building(lock: Path) -> bool:
    """Whether another process holds the build lock `lock` (without creating it)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # also releases the lock if it was taken
    return False


def _profiles(cfg: Config, lay: Layout | None, builds: list[Build]) -> list[str]:
    names = set(cfg.profiles) | {b.profile for b in builds}
    if lay is not None:
        for d in (lay.meta / "roots", lay.meta / "builds"):
            if d.is_dir():
                names |= {p for p in os.listdir(d) if NAME_RE.match(p)}
    return sorted(names)


def _seed(cfg: Config, profile: str, bs: list[Build]) -> str | None:
    """The build whose stage4 the profile's next build starts from (`stage = "latest-build"`: the newest
    good build with a stage4; `"build:ID"`: that one), so purge never takes a chain's seed away."""
    prof = cfg.profiles.get(profile)
    which = None if prof is None else prof.stage_build
    if which is None:
        return None
    if which != LATEST_BUILD:
        return which
    for b in sorted(bs, key=lambda b: b.key, reverse=True):
        if b.ok and _has_stage4(b):
            return b.id
    return None


def _has_stage4(b: Build) -> bool:
    try:
        s4 = manifest(b).get("stage4")
    except SnapshotterError:
        return False
    return isinstance(s4, dict) and isinstance(s4.get("file"), str) and (b.path / s4["file"]).is_file()


def keep_reasons(cfg: Config, builds: list[Build]) -> dict[tuple[str, str], list[str]]:
    """{(profile, build id): why it is kept} for every build some rule keeps."""
    reasons: dict[tuple[str, str], list[str]] = {}

    def keep(profile: str, build_id: str | None, why: str) -> None:
        if build_id:
            reasons.setdefault((profile, build_id), []).append(why)

    by_profile: dict[str, list[Build]] = {}
    for b in builds:
        by_profile.setdefault(b.profile, []).append(b)
    for profile, bs in by_profile.items():
        for b in sorted(bs, key=lambda b: b.key)[-cfg.binhost.keep_builds:]:
            keep(profile, b.id, f"newest {cfg.binhost.keep_builds}")
        keep(profile, _seed(cfg, profile, bs), "seeds the profile's next build (its stage4)")
        prof = cfg.profiles.get(profile)
        seeded = prof is not None and prof.stage_build is not None
        if (seeded or any(b.state == INCOMPLETE for b in bs)) and _building(build_lock_path(cfg, profile)):
            for b in bs:
                if b.state == INCOMPLETE:
                    keep(profile, b.id, "a build of the profile is running")
                elif seeded and b.ok and _has_stage4(b):
                    # It may be the seed the running build resolved before a newer build became the seed.
                    keep(profile, b.id, "a build of the profile is running (its stage4 may be that build's seed)")
    if cfg.binhost.web_root is not None:
        lay = Layout(cfg.binhost.web_root)
        for profile in _profiles(cfg, lay, builds):
            for edition in cfg.binhost.editions:
                st = current(lay, profile, edition)
                keep(profile, st.build, f"{edition} points at it")
                keep(profile, st.previous, f"previous build of {edition}")
        since = history.window_start(cfg.binhost.rollback_days)
        for profile, build_id in sorted(history.pointed_at_since(history.read(lay.history), since)):
            keep(profile, build_id, f"in {cfg.binhost.rollback_days}-day rollback window")
    return reasons


def _rm(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def _used_roots(cfg: Config, lay: Layout, profile: str) -> set[str]:
    return {r for e in cfg.binhost.editions if (r := current(lay, profile, e).root) is not None}


def _unused_roots(cfg: Config, lay: Layout, profiles: list[str]) -> list[tuple[str, str]]:
    out = []
    for profile in profiles:
        d = lay.roots_dir(profile)
        if not d.is_dir():
            continue
        used = _used_roots(cfg, lay, profile)
        # Roots of editions no longer configured are left alone: their document roots may still be served.
        out += [(profile, name) for name in sorted(os.listdir(d))
                if name not in used and name.rsplit(".", 1)[0] in cfg.binhost.editions]
    return out


def _cache_entries(lay: Layout) -> list[tuple[Path, list[Path]]]:
    """(directory, snapshot files) of each cached snapshot (FPR/COMMIT)."""
    top = lay.meta / "snapshots"
    out: list[tuple[Path, list[Path]]] = []
    if not top.is_dir():
        return out
    for fpr in sorted(os.listdir(top)):
        for commit in sorted(os.listdir(top / fpr)):
            d = top / fpr / commit
            files = [Path(dp) / n for dp, _dn, fn in os.walk(d) for n in fn
                     if not (dp == str(d) and n in (".lock", CACHE_FILES))]
            out.append((d, files))
    return out


def _unused_snapshots(lay: Layout) -> list[Path]:
    """Cached snapshot directories (FPR/COMMIT) whose files no publishable build links any more."""
    return [d for d, files in _cache_entries(lay) if all(p.stat().st_nlink == 1 for p in files)]


def purge(cfg: Config, *, dry_run: bool = False, lock_wait: float = 0.0) -> PurgeReport:
    """Remove what no policy keeps (see the module docstring); with `dry_run`, only say what would go."""
    report = PurgeReport(dry_run=dry_run)
    lay = Layout(cfg.binhost.web_root) if cfg.binhost.web_root is not None else None
    if lay is None or (dry_run and not lay.meta.is_dir()):
        _purge(cfg, lay, report, dry_run)
        return report
    lay.meta.mkdir(parents=True, exist_ok=True)
    with flocked(lay.lock, f"the web root {lay.web_root}", wait=lock_wait):
        _purge(cfg, lay, report, dry_run)
    return report


def _purge(cfg: Config, lay: Layout | None, report: PurgeReport, dry_run: bool) -> None:
    builds = list_builds(cfg.build.output)
    if lay is not None and not dry_run:
        for profile in _profiles(cfg, lay, builds):
            for edition in cfg.binhost.editions:
                reconcile(lay, profile, edition)  # the rollback window reads the history
    reasons = keep_reasons(cfg, builds)
    for b in builds:
        why = reasons.get((b.profile, b.id))
        if why:
            report.kept.append(Kept(b, why))
            continue
        report.removed.append(b)
        if dry_run:
            continue
        log.info("purge: removing build %s %s (%s)", b.profile, b.id, b.state)
        tombstone(cfg.build.output, b.profile, b.id)
        if lay is not None:
            pub = lay.publishable(b.profile, b.id)
            with flocked(lay.builds_dir(b.profile) / f".{b.id}.lock", f"build {b.profile} {b.id}", wait=60):
                _rm(pub)
                _rm(lay.files_json(b.profile, b.id))
            (lay.builds_dir(b.profile) / f".{b.id}.lock").unlink(missing_ok=True)
        _rm(b.path)
        fsync_dir(b.path.parent)
    if lay is None:
        return
    profiles = _profiles(cfg, lay, builds)
    for profile, name in _unused_roots(cfg, lay, profiles):
        report.roots_removed.append(f"{profile}/{name}")
        if not dry_run:
            _rm(lay.roots_dir(profile) / name)
    if dry_run:
        removed = {(b.profile, b.id) for b in report.removed}
        report.snapshots_removed = [str(p.relative_to(lay.meta / "snapshots")) for p in _unused_snapshots(lay)]
        # Snapshots only the builds about to go link: known after the removal; estimate from the link counts.
        report.snapshots_removed += _snapshots_freed_by(lay, removed, report.snapshots_removed)
        return
    for p in _unused_snapshots(lay):
        try:
            with flocked(p / ".lock", f"snapshot cache {p}"):  # a build being made publishable may use it
                (p / CACHE_FILES).unlink(missing_ok=True)
        except LockedError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        report.snapshots_removed.append(str(p.relative_to(lay.meta / "snapshots")))


def _snapshots_freed_by(lay: Layout, removed: set[tuple[str, str]], already: list[str]) -> list[str]:
    """For a dry run: cache entries whose every other link is in a build that would be removed."""
    links: dict[int, int] = {}  # inode -> links inside builds that would be removed
    for profile, build_id in removed:
        snapdir = lay.publishable(profile, build_id) / "snapshots"
        if snapdir.is_dir():
            for p in snapdir.iterdir():
                ino = p.stat().st_ino
                links[ino] = links.get(ino, 0) + 1
    out = []
    for d, files in _cache_entries(lay):
        rel = str(d.relative_to(lay.meta / "snapshots"))
        stats = [p.stat() for p in files]
        if rel not in already and stats and all(st.st_nlink - 1 <= links.get(st.st_ino, 0) for st in stats):
            out.append(rel)
    return out


# ---- disk use ------------------------------------------------------------------------------------------
@dataclass
class DiskUse:
    output_bytes: int  # OUTPUT: every build of every profile
    output_builds: int
    web_root_bytes: int | None  # what the web root adds (snapshots, settings, copies); hard links not counted
    web_root: Path | None


def _walk_bytes(top: Path, seen: set[tuple[int, int]]) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def disk_use(cfg: Config) -> DiskUse:
    """Bytes on disk of the build output and of what the web root adds to it (each inode counted once)."""
    seen: set[tuple[int, int]] = set()
    out = _walk_bytes(cfg.build.output, seen) if cfg.build.output.is_dir() else 0
    n = len(list_builds(cfg.build.output))
    web = cfg.binhost.web_root
    web_bytes = _walk_bytes(web, seen) if web is not None and web.is_dir() else None
    return DiskUse(out, n, web_bytes, web)


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"
