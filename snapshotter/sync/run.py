"""`snapshotter sync`: find new daily snapshots on the mirrors, verify them, import, tag and push.

Which days: from the day after the newest tag up to the newest snapshot that can exist (yesterday UTC;
two days back before 01:00 UTC, since snapshots appear after 00:45 UTC), oldest first, at most
`max_catchup_days` of them. An empty repository gets the newest snapshot the mirrors have (walking back
up to 40 days, as emerge-webrsync does); finding none of those days on any mirror is an error (the
mirror URL is probably wrong). A day that no mirror has yet is skipped, not an error.

For each day, mirrors are tried in order and on each mirror the names emerge-webrsync asks for
(gentoo-D.tar.xz, gentoo-D.tar.bz2, portage-D.tar.xz, portage-D.tar.bz2). A candidate that is missing or
broken (404, HTML page, reset, md5 mismatch) makes us try the next one; a bad OpenPGP signature stops the
whole run, since it may mean a keyring problem rather than a bad mirror.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from snapshotter.config import Config
from snapshotter.download import Downloader, NotFound, Unreachable
from snapshotter.errors import FetchError, SnapshotterError, VerificationError, child_failure
from snapshotter.git.repository import Repository, git
from snapshotter.lock import flocked
from snapshotter.openpgp import SignatureVerifier
from snapshotter.sync import state as syncstate
from snapshotter.sync.importer import Identity, ImportResult, import_tarball, snapshot_limits
from snapshotter.sync.md5sum import check_md5
from snapshotter.sync.push import push_pending

log = logging.getLogger(__name__)

NAMES = ("gentoo-{}.tar.xz", "gentoo-{}.tar.bz2", "portage-{}.tar.xz", "portage-{}.tar.bz2")
FIRST_IMPORT_LOOKBACK = 40  # days, as emerge-webrsync

# (label, done, total) — a download in bytes or an import in compressed bytes read.
Progress = Callable[[str, int, int | None], None]
# Queues the builds of the given tags (oldest first) and returns the job ids; raises when it cannot.
QueueBuilds = Callable[[list[str]], list[int]]
# A tag more than this many days after the newest snapshot that can exist was not made by a sync.
FUTURE_SLACK = timedelta(days=1)


@dataclass
class SyncReport:
    imported: list[ImportResult] = field(default_factory=list)
    up_to_date: bool = False
    push_failed: list[tuple[str, str]] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    queued_tags: list[str] = field(default_factory=list)  # tags whose builds this run queued
    queue_failed: str | None = None  # why queueing them failed (they stay pending for the next run)


def newest_possible_day(now: datetime) -> date:
    """The newest snapshot that can exist at `now`: yesterday (UTC), or the day before before 01:00 UTC."""
    now = now.astimezone(UTC)
    day = now.date() - timedelta(days=1)
    return day - timedelta(days=1) if now.hour < 1 else day


def days_to_fetch(newest_tag: date, newest: date, max_catchup_days: int) -> list[date]:
    """Days to try, oldest first, after the newest tag (a non-empty repository)."""
    first = max(newest_tag + timedelta(days=1), newest - timedelta(days=max_catchup_days - 1))
    return [first + timedelta(days=i) for i in range((newest - first).days + 1)]


def now_from_env() -> datetime:
    """The current time; SNAPSHOTTER_NOW=<unix time> fixes it (for tests and dry runs)."""
    fixed = os.environ.get("SNAPSHOTTER_NOW")
    if fixed:
        try:
            return datetime.fromtimestamp(int(fixed), UTC)
        except ValueError:
            raise SnapshotterError(f"SNAPSHOTTER_NOW must be a unix time, got {fixed!r}") from None
    return datetime.now(UTC)


class _DayFetcher:
    """Finds, downloads and verifies the snapshot of one day across mirrors and names."""

    def __init__(self, cfg: Config, downloader: Downloader, verifier: SignatureVerifier,
                 progress: Progress | None) -> None:
        self.cfg, self.dl, self.verifier, self.progress = cfg, downloader, verifier, progress

    def fetch(self, day: date, report: SyncReport) -> tuple[Path, list[Path]] | None:
        """Return (verified tarball, files to delete after import), or None if no mirror has the day.

        Raises VerificationError/FetchError when the day exists somewhere but no copy is good, and
        SignatureError (stopping the run) on a bad signature.
        """
        stamp = f"{day:%Y%m%d}"
        bad: list[str] = []  # copies that exist but are broken
        unreachable: list[str] = []  # mirrors we could not talk to
        progress = self.progress
        for url, name, md5sum in self._candidates(stamp, bad, unreachable):
            files: list[Path] = []
            try:
                files.append(self.dl.fetch_side(url + ".gpgsig", name + ".gpgsig"))
                tick = (lambda done, total, n=name: progress(f"fetch {n}", done, total)) if progress else None
                files.append(self.dl.fetch(url, name, tick))
                check_md5(files[1], md5sum)
            except (FetchError, VerificationError) as e:
                bad.append(str(e))
                log.warning("%s; trying the next candidate", e)
                _remove(files)
                continue
            sig, tarball = files
            try:
                signer = self.verifier.verify(tarball, sig)
            except SnapshotterError:
                _remove(files)
                raise
            log.debug("%s: md5 ok, good signature by %s", name, signer)
            return tarball, files
        if bad:
            raise VerificationError(f"snapshot {stamp}: no good copy on any mirror ({len(bad)} tried); last: {bad[-1]}")
        self._check_reached(stamp, unreachable)
        report.warnings.extend(unreachable)
        return None

    def exists(self, day: date) -> bool:
        """Does a mirror have the day (its .md5sum, good or broken)? Writes nothing to disk.

        Raises FetchError when no mirror could be reached.
        """
        stamp = f"{day:%Y%m%d}"
        bad: list[str] = []
        unreachable: list[str] = []
        if next(self._candidates(stamp, bad, unreachable), None) is not None or bad:
            return True
        self._check_reached(stamp, unreachable)
        return False

    def _candidates(self, stamp: str, bad: list[str], unreachable: list[str]) -> Iterator[tuple[str, str, bytes]]:
        """(URL, file name, .md5sum contents) of each copy of the day the mirrors have, in the order to try.

        A mirror that cannot be reached is added to `unreachable` and skipped; a broken .md5sum answer to
        `bad`.
        """
        for base in self.cfg.sync.mirrors:
            base = base.rstrip("/")
            for pattern in NAMES:
                name = pattern.format(stamp)
                url = f"{base}/snapshots/{name}"
                try:
                    md5sum = self.dl.fetch_small(url + ".md5sum")
                except NotFound:
                    continue
                except Unreachable as e:
                    unreachable.append(str(e))
                    log.warning("%s; trying the next mirror", e)
                    break
                except FetchError as e:
                    bad.append(str(e))
                    log.warning("%s; trying the next candidate", e)
                    continue
                yield url, name, md5sum

    def _check_reached(self, stamp: str, unreachable: list[str]) -> None:
        if len(unreachable) == len(self.cfg.sync.mirrors):
            raise FetchError(f"snapshot {stamp}: no mirror could be reached; last: {unreachable[-1]}")


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def run_sync(cfg: Config, *, day: date | None = None, push: bool = True, now: datetime | None = None,
             progress: Progress | None = None, queue: QueueBuilds | None = None) -> SyncReport:
    """Import new snapshots into `cfg.repo` (see the module doc); push unless `push` is False.

    Holds the repository's flock for the whole run (LockedError, exit 75, if another run holds it).
    Raises SnapshotterError subclasses; days imported before an error stay imported. A sync into a
    repository that does not exist yet checks the keys and finds its snapshot on the mirrors first, so
    that when it fails there (a missing key file, a fingerprint not in it, a mirror that cannot be reached
    or has nothing) it leaves no repository and no download cache behind.

    `queue`, when given, is called under the lock with every tag whose builds are still to be queued
    (`pending_builds`: newer than the state's `queued_through`), after the imports, also when they
    failed; `queued_through` only advances when it returns. So a queue that fails after the refs moved
    loses nothing: the next run (even one with nothing new) queues those tags.
    """
    repo = Repository(cfg.repo, cfg.git.branch)
    now = now or now_from_env()
    first = _find_first_day(cfg, day, now) if not repo.path.exists() else None
    with flocked(repo.lock_path, f"repository {repo.path}"):
        repo.create()
        state = syncstate.load(repo)
        if state.queued_through is None:  # not known (an older state file, or none): nothing before now
            newest = repo.newest_tag()
            state.queued_through = newest.name if newest is not None else ""
            syncstate.save(repo, state)  # before any import, so that a crash cannot lose the new tags
        elif state.rebuilt is not None:
            syncstate.save(repo, state)  # says so once, and replaces the unusable file
        report = SyncReport()
        try:
            _import_days(cfg, repo, day, now, progress, report, first)
        except SnapshotterError as e:
            state.last_failure, state.last_failure_reason = syncstate.now_iso(), str(e)
            if report.imported:
                state.last_tag = report.imported[-1].tag
            _queue_pending(repo, state, queue, report, now)
            if push and cfg.git.push and report.imported:
                for remote, reason in push_pending(repo, cfg.git.push, state, timeout=cfg.sync.deadline):
                    log.error("push to %s failed: %s (the import is kept; the next run retries)", remote, reason)
            syncstate.save(repo, state)
            raise
        except Exception as e:  # a bug: still recorded for `status`, and the refs are as git left them
            state.last_failure = syncstate.now_iso()
            state.last_failure_reason = f"internal error: {type(e).__name__}: {e}"
            try:
                syncstate.save(repo, state)
            except SnapshotterError as e2:
                log.error("%s", e2)
            raise
        if report.imported:
            state.last_tag = report.imported[-1].tag
            _gc_auto(repo)
        _queue_pending(repo, state, queue, report, now)
        if push and cfg.git.push:
            before = set(syncstate.pending_pushes(cfg.git.push, repo, state))
            report.push_failed = push_pending(repo, cfg.git.push, state, timeout=cfg.sync.deadline)
            failed = {r for r, _ in report.push_failed}
            report.pushed = [r for r in cfg.git.push if r in before and r not in failed]
        state.last_success = syncstate.now_iso()
        syncstate.save(repo, state)
        return report


def pending_builds(repo: Repository, state: syncstate.SyncState, now: datetime) -> list[str]:
    """Tags whose builds are still to be queued: newer than `state.queued_through`, oldest first (none
    while it is not known); tags in the future (`future_tags`) are never built."""
    if state.queued_through is None:
        return []
    limit = newest_possible_day(now) + FUTURE_SLACK
    return [t.name for t in repo.tags() if t.name > state.queued_through and t.day <= limit]


def future_tags(repo: Repository, now: datetime) -> list[str]:
    """Date tags after the newest snapshot that can exist (plus FUTURE_SLACK): not made by a sync (a
    sync tags a snapshot with the day before its timestamp.x), e.g. pushed from outside. The newest tag
    decides which day a sync fetches next, so such a tag would stop every import."""
    limit = newest_possible_day(now) + FUTURE_SLACK
    return [t.name for t in repo.tags() if t.day > limit]


def _queue_pending(repo: Repository, state: syncstate.SyncState, queue: QueueBuilds | None, report: SyncReport,
                   now: datetime) -> None:
    """Queue the builds of every pending tag; advance `state.queued_through` only when that worked."""
    if queue is None:
        return
    tags = pending_builds(repo, state, now)
    if not tags:
        return
    try:
        queue(tags)
    except Exception as e:  # noqa: BLE001 - the refs moved: whatever failed, the tags stay pending
        report.queue_failed = str(e) if isinstance(e, SnapshotterError) else f"internal error: {type(e).__name__}: {e}"
        log.debug("queueing builds for %s failed: %s (they stay pending)", ", ".join(tags), report.queue_failed)
        return
    report.queued_tags = tags
    state.queued_through = tags[-1]


def lookback_days(now: datetime) -> list[date]:
    """The days a first import looks at, newest first: FIRST_IMPORT_LOOKBACK days up to the newest possible."""
    last = newest_possible_day(now)
    return [last - timedelta(days=i) for i in range(FIRST_IMPORT_LOOKBACK)]


def nothing_found(cfg: Config, days: list[date]) -> FetchError:
    """The error of a first sync that found no snapshot over the whole look-back window `days`."""
    tried = ", ".join(cfg.sync.mirrors)
    why = ("the mirror URL is probably wrong: it must be the mirror's root, the directory that holds "
           "snapshots/ (e.g. https://distfiles.gentoo.org), not .../snapshots")
    if any(m.rstrip("/").endswith("/snapshots") for m in cfg.sync.mirrors):
        why = ("the mirror URL ends in /snapshots: give the mirror's root, the directory that holds "
               "snapshots/ (e.g. https://distfiles.gentoo.org)")
    return FetchError(f"no snapshot on any mirror for the {len(days)} days {days[-1]:%Y-%m-%d} to "
                      f"{days[0]:%Y-%m-%d} (sync.mirrors: {tried}); {why}")


def _find_first_day(cfg: Config, day: date | None, now: datetime) -> date:
    """Before a sync creates its repository: check the keys and find the day to import, writing nothing.

    Only .md5sum files are fetched, into memory; the keys go to a throwaway keyring that is removed.
    Raises what the sync itself would (ConfigError, FetchError).
    """
    if cfg.git.sign_tags:
        _tag_signer(cfg)
    days = [day] if day is not None else lookback_days(now)
    downloader = Downloader.for_sync(cfg.sync)
    try:
        with SignatureVerifier(cfg.sync.keyring, cfg.sync.fingerprints) as verifier:
            fetcher = _DayFetcher(cfg, downloader, verifier, None)
            for d in days:
                if fetcher.exists(d):
                    return d
                log.debug("no snapshot for %s on any mirror (yet)", d)
    finally:
        downloader.close()
    if day is not None:
        raise FetchError(f"no mirror has a snapshot for {day:%Y-%m-%d}")
    raise nothing_found(cfg, days)


def _import_days(cfg: Config, repo: Repository, day: date | None, now: datetime, progress: Progress | None,
                 report: SyncReport, first: date | None = None) -> None:
    """Import the days to import (see the module doc); `first`: the newest day a first import found."""
    newest = repo.newest_tag()
    future = future_tags(repo, now)
    if future:
        raise SnapshotterError(
            f"tag {future[-1]} in {repo.path} is in the future (the newest snapshot that can exist is "
            f"{newest_possible_day(now):%Y-%m-%d}): it was not made by a sync, and no day after it would ever "
            f"be imported; check where it came from, then delete it: git --git-dir={repo.path} tag -d "
            f"{' '.join(future)}")
    if day is not None:
        if newest is not None and day <= newest.day:
            raise SnapshotterError(f"snapshot {day:%Y-%m-%d} is not newer than the newest tag {newest.name}; "
                                   "refusing to commit it on top")
        days, stop_at_first = [day], False
    elif newest is None:
        days = [d for d in lookback_days(now) if first is None or d <= first]
        stop_at_first = True
    else:
        days = days_to_fetch(newest.day, newest_possible_day(now), cfg.sync.max_catchup_days)
        stop_at_first = False
    if not days:
        report.up_to_date = True
        return
    identity = Identity(cfg.git.author_name, cfg.git.author_email)
    sign_tag = _tag_signer(cfg) if cfg.git.sign_tags else None
    downloader = Downloader.for_sync(cfg.sync)
    try:
        with SignatureVerifier(cfg.sync.keyring, cfg.sync.fingerprints) as verifier:
            fetcher = _DayFetcher(cfg, downloader, verifier, progress)
            for d in days:
                found = fetcher.fetch(d, report)
                if found is None:
                    if day is not None:
                        raise FetchError(f"no mirror has a snapshot for {d:%Y-%m-%d}")
                    log.debug("no snapshot for %s on any mirror (yet)", d)
                    continue
                tarball, files = found
                tick = (lambda done, total, n=tarball.name: progress(f"import {n}", done, total)) if progress else None
                try:
                    result = import_tarball(repo, tarball, identity, file_day=d, sign_tag=sign_tag, progress=tick,
                                           limits=snapshot_limits(cfg))
                finally:
                    _remove(files)
                report.imported.append(result)
                log.debug("imported %s: %s", result.tag, result.commit)
                if stop_at_first:
                    break
    finally:
        downloader.close()
    if not report.imported and newest is None and day is None:
        raise nothing_found(cfg, lookback_days(now))
    if not report.imported:
        report.up_to_date = True


def _tag_signer(cfg: Config) -> Callable[[bytes], bytes]:
    if not cfg.git.signing_key:
        raise SnapshotterError("git.sign_tags is on but git.signing_key is not set")
    from snapshotter.openpgp import detach_sign

    def sign(body: bytes) -> bytes:
        with tempfile.NamedTemporaryFile(prefix="snapshotter-tag-") as f:
            f.write(body)
            f.flush()
            return detach_sign(Path(f.name), cfg.git.signing_key, cfg.git.gnupghome)

    return sign


def _gc_auto(repo: Repository) -> None:
    """Each import adds a pack; let git consolidate them when it judges it worth it (after 50 packs).

    In the foreground, under the sync's lock: a detached `git gc --auto` (git's default) would repack
    after this process has exited, beside the next sync or publish, and systemd kills what a oneshot
    unit leaves behind, so a repack started from the timer unit would never finish.
    """
    proc = git(repo.path, "-c", "gc.autoDetach=false", "gc", "--auto", "--quiet", check=False)
    if proc.returncode != 0:
        log.warning("git gc --auto failed (the import is kept): %s", child_failure(proc.stderr, proc.returncode))
