"""Which builds a ref update queues.

- A new date tag (`YYYY-MM-DD`) in the snapshot repository queues a build of every profile (or of those
  listed in `service.build_profiles`), with the overlays at their configured refs.
- A push to an overlay repository queues the profiles whose overlays use that repository (matched by
  its path or URL path), with that overlay pinned at the pushed commit and the tree at the snapshot
  repository's newest tag. A branch push counts when the branch is the overlay's configured `ref`; a
  tag push always counts (a new release of the overlay).

Ref names and object ids come from outside (the pusher): they are checked against git's
check-ref-format rules and a strict allow-list before anything else happens, and they are only ever
passed to git as single arguments, never to a shell.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from snapshotter.errors import EXIT_OK, SnapshotterError
from snapshotter.git.repository import Repository, git, git_env, tag_date
from snapshotter.service.jobqueue import BuildQueue, Job, open_queue

if TYPE_CHECKING:
    from snapshotter.config import Config

log = logging.getLogger(__name__)

ZERO_RE = re.compile(r"^0+$")
OID_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
# The allow-list: branches and tags only, plain characters, no component starting with '.' or '-'.
REF_RE = re.compile(r"^refs/(heads|tags)/([A-Za-z0-9_][A-Za-z0-9._+-]*(?:/[A-Za-z0-9_][A-Za-z0-9._+-]*)*)$")
MAX_REF_LEN = 255


class RefError(SnapshotterError):
    """A pushed ref name or object id that is not acceptable."""


@dataclass(frozen=True)
class RefUpdate:
    """One line a post-receive hook reads: `<old> <new> <ref>`."""

    old: str
    new: str
    ref: str

    @property
    def kind(self) -> str:
        """'heads' or 'tags' (valid updates only)."""
        return REF_RE.match(self.ref)[1]  # type: ignore[index]

    @property
    def short(self) -> str:
        return REF_RE.match(self.ref)[2]  # type: ignore[index]

    @property
    def deleted(self) -> bool:
        return bool(ZERO_RE.match(self.new))


def check_ref_name(ref: str) -> str:
    """Return `ref` if it is an acceptable branch or tag name, else raise RefError (printable)."""
    shown = ref.encode("unicode_escape", errors="replace").decode("ascii")[:100]
    if (len(ref) > MAX_REF_LEN or not REF_RE.match(ref) or ".." in ref or ref.endswith((".lock", "."))
            or "/." in ref or ".lock/" in ref):
        raise RefError(f"rejected ref name {shown!r}: only refs/heads/* and refs/tags/* made of letters, "
                       "digits and . _ + - / are accepted")
    # And git's own rules, asked with the name as one argument (no shell anywhere).
    proc = subprocess.run(["git", "check-ref-format", ref], capture_output=True, env=git_env())
    if proc.returncode != 0:
        raise RefError(f"rejected ref name {shown!r}: not a valid git ref name")
    return ref


def parse_updates(text: str) -> tuple[list[RefUpdate], list[str]]:
    """Parse post-receive input: the acceptable updates, and one message per rejected line."""
    updates, rejected = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            parts = line.split(" ")
            if len(parts) != 3:
                raise RefError(f"line {n}: expected '<old> <new> <ref>'")
            old, new, ref = parts
            for oid in (old, new):
                if not OID_RE.match(oid):
                    raise RefError(f"line {n}: not an object id: {oid[:80]!r}")
            updates.append(RefUpdate(old, new, check_ref_name(ref)))
        except RefError as e:
            rejected.append(str(e))
    return updates, rejected


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _url_path(url: str) -> Path | None:
    """The repository path an overlay URL names (local path, file://, ssh://..., host:path)."""
    if "://" in url:
        path = urlsplit(url).path
    elif ":" in url.split("/", 1)[0]:
        path = url.split(":", 1)[1]
    else:
        path = url
    return Path(path) if path.startswith("/") else None


def repo_matches(url: str, repo: Path) -> bool:
    """Does an overlay `url` name the repository at `repo`? (with or without a trailing .git)"""
    path = _url_path(url)
    if path is None:
        return False
    candidates = {path, path.with_name(path.name + ".git")}
    if path.name.endswith(".git"):
        candidates.add(path.with_name(path.name[:-4]))
    return any(_same_path(c, repo) for c in candidates)


def is_snapshot_repository(cfg: Config, repo: Path) -> bool:
    return _same_path(Path(cfg.repo), Path(repo))


def peel_commit(repo: Path, oid: str) -> str:
    """The commit `oid` (a commit or an annotated tag) points at in `repo`."""
    if not OID_RE.match(oid):
        raise RefError(f"not an object id: {oid[:80]!r}")
    proc = git(repo, "rev-parse", "--verify", "--quiet", f"{oid}^{{commit}}", check=False)
    commit = proc.stdout.decode().strip()
    if proc.returncode != 0 or not OID_RE.match(commit):
        raise RefError(f"{oid} does not point at a commit in {repo}")
    return commit


def tag_profiles(cfg: Config) -> list[str]:
    """Profiles built for each new snapshot tag: `service.build_profiles`, or every profile."""
    return sorted(cfg.service.build_profiles or cfg.profiles)


def tag_jobs(cfg: Config, tags: list[str]) -> list[Job]:
    jobs: list[Job] = []
    for tag in tags:
        if tag_date(tag) is None:
            raise RefError(f"not a snapshot tag (YYYY-MM-DD): {tag!r}")
        jobs.extend(Job(profile, tag) for profile in tag_profiles(cfg))
    return jobs


def overlay_jobs(cfg: Config, repo: Path, update: RefUpdate) -> list[Job]:
    """Jobs for a push to an overlay repository (none if no profile uses it for that ref)."""
    users = []
    for name in sorted(cfg.profiles):
        for ov in getattr(cfg.profiles[name], "overlays", []):
            if repo_matches(ov.url, repo) and (update.kind == "tags" or update.short == ov.ref):
                users.append((name, ov.name))
    if not users:
        return []
    newest = Repository(cfg.repo, cfg.git.branch).newest_tag()
    if newest is None:
        raise SnapshotterError(f"the snapshot repository {cfg.repo} has no snapshot tag yet; nothing to build against")
    commit = peel_commit(repo, update.new)
    return [Job(profile, newest.name, ((overlay, commit),)) for profile, overlay in users]


def jobs_for_push(cfg: Config, repo: Path, updates: list[RefUpdate]) -> list[Job]:
    """The jobs a push of `updates` into `repo` asks for, in a stable order, without duplicates."""
    jobs: list[Job] = []
    snapshot_repo = is_snapshot_repository(cfg, repo)
    for up in updates:
        if up.deleted:
            log.info("%s deleted: nothing to build", up.ref)
            continue
        if snapshot_repo:
            if up.kind == "tags" and tag_date(up.short) is not None:
                if cfg.service.queue_builds:
                    jobs.extend(tag_jobs(cfg, [up.short]))
            else:
                log.debug("%s in the snapshot repository is not a snapshot tag: nothing to build", up.ref)
        else:
            found = overlay_jobs(cfg, repo, up)
            if not found:
                log.info("%s: no profile builds it", up.ref)
            jobs.extend(found)
    return list(dict.fromkeys(jobs))


def enqueue_all(queue: BuildQueue, jobs: list[Job], source: str) -> list[int]:
    ids = []
    for job in jobs:
        jid, created = queue.enqueue(job, source=source)
        if created:
            log.info("queued build %d: %s", jid, job.describe())
        else:
            log.info("build %d already queued: %s", jid, job.describe())
        ids.append(jid)
    return ids


@dataclass
class AddReport:
    """What `add_jobs` did: for each job, its id and whether it was newly queued (False: already queued)."""

    added: list[tuple[Job, int, bool]] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return EXIT_OK  # every failure is a SnapshotterError, raised before anything is queued


def add_jobs(cfg: Config, profiles: Sequence[str], tag: str | None = None,
             overlays: Sequence[tuple[str, str]] = (), queue: BuildQueue | None = None,
             source: str = "cli") -> AddReport:
    """Queue builds by hand (`snapshotter queue add`): each of `profiles` at `tag` (default: the newest tag),
    with `overlays` pinned as (overlay name, full commit id).

    Everything is checked before anything is queued: the tag is in the repository, every profile is
    configured and has every pinned overlay, and the pins are full commit ids.
    """
    repository = Repository(cfg.repo, cfg.git.branch)
    if tag is None:
        newest = repository.newest_tag()
        if newest is None:
            raise SnapshotterError(f"the snapshot repository {cfg.repo} has no snapshot tag yet")
        tag = newest.name
    else:
        tag = repository.find_tag(tag).name
    jobs = []
    for profile in profiles:
        if profile not in cfg.profiles:
            raise SnapshotterError(f"no profile {profile!r} (known: {', '.join(sorted(cfg.profiles)) or 'none'})")
        job = Job(profile, tag, tuple(overlays))
        known = {o.name for o in cfg.profiles[profile].overlays}
        for name, _ in job.overlays:
            if name not in known:
                raise SnapshotterError(f"profile {profile} has no overlay {name!r}")
        jobs.append(job)
    q = queue or open_queue(cfg)
    report = AddReport()
    for job in jobs:
        jid, created = q.enqueue(job, source=source)
        report.added.append((job, jid, created))
    return report


def queue_builds_for_tags(cfg: Config, tags: list[str], queue: BuildQueue | None = None) -> list[int]:
    """Queue the builds for newly imported snapshot tags (called by `sync`); returns the job ids.

    Does nothing when `service.queue_builds` is off or no profile is configured.
    """
    if not cfg.service.queue_builds or not tags:
        return []
    jobs = tag_jobs(cfg, tags)
    if not jobs:
        return []
    return enqueue_all(queue or open_queue(cfg), jobs, source="sync")


def _without_future_tags(updates: list[RefUpdate]) -> tuple[list[RefUpdate], list[str]]:
    """Split off date tags pushed into the snapshot repository for a day after the newest snapshot that
    can exist: no sync made them, nothing is built for them, and the pusher is told (a post-receive hook
    cannot refuse a ref any more: while such a tag exists, `sync` refuses to run and `status` names it)."""
    # Imported here only: the hook starts fast for overlay pushes.
    from snapshotter.sync.run import FUTURE_SLACK, newest_possible_day, now_from_env

    limit = newest_possible_day(now_from_env()) + FUTURE_SLACK
    kept, refused = [], []
    for up in updates:
        day = tag_date(up.short) if up.kind == "tags" and not up.deleted else None
        if day is not None and day > limit:
            refused.append(f"{up.ref}: a snapshot tag in the future (the newest snapshot that can exist is "
                           f"{limit - FUTURE_SLACK:%Y-%m-%d}): nothing is queued for it, and every sync fails "
                           f"until it is deleted (git tag -d {up.short})")
        else:
            kept.append(up)
    return kept, refused


def queue_push(cfg: Config, repo: Path, text: str, queue: BuildQueue | None = None) -> list[int]:
    """Handle a post-receive hook's input for `repo`: validate, work out the jobs, enqueue them.

    Rejected lines (hostile ref names, garbage) are logged and skipped; if there were any, RefError is
    raised after the acceptable updates have been queued.
    """
    updates, rejected = parse_updates(text)
    if is_snapshot_repository(cfg, repo):
        updates, future = _without_future_tags(updates)
        rejected += future
    for msg in rejected:
        log.error("%s", msg)
    jobs = jobs_for_push(cfg, repo, updates)
    ids = enqueue_all(queue or open_queue(cfg), jobs, source=f"push:{Path(repo).resolve()}") if jobs else []
    if rejected:
        raise RefError(f"{len(rejected)} pushed ref(s) rejected; nothing was queued for them")
    return ids
