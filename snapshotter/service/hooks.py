"""The git hooks: rendering them and installing them into a bare repository.

post-receive is a four-line sh script that execs `snapshotter [--config FILE] hooks enqueue`; the
absolute path of the executable and of the configuration are baked in at install time, quoted for sh.
It only enqueues (see triggers.py), so the pusher's connection returns in a fraction of a second.

pre-receive execs `snapshotter [--config FILE] hooks check` (`check_push`) the same way: before any ref
moves, it refuses a push that would create or move a date tag of the snapshot repository in the future
(after the newest snapshot that can exist, plus a day: the rule of `sync` and `status`), which would
stop every import. Every other ref passes; it reads no network and no object, only the ref lines.

The files `hooks/post-receive` and `hooks/pre-receive` in the source tree are these templates with the
defaults filled in.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

from snapshotter.config import Config
from snapshotter.errors import SnapshotterError
from snapshotter.fsutil import atomic_write

log = logging.getLogger(__name__)

MARKER = "# portage-snapshotter post-receive hook"
PRE_MARKER = "# portage-snapshotter pre-receive hook"

TEMPLATE = """#!/bin/sh
{marker}
{comment}
# `snapshotter hooks install REPO [--config FILE]` writes this file with the two values below filled in
# (quoted for sh).
SNAPSHOTTER={exe}
CONFIG_FILE={config}
if [ -n "$CONFIG_FILE" ]; then
    exec "$SNAPSHOTTER" --config "$CONFIG_FILE" hooks {command}
fi
exec "$SNAPSHOTTER" hooks {command}
"""

# hook -> (marker, what it does, the `snapshotter hooks` command it runs)
HOOKS = {
    "pre-receive": (PRE_MARKER, """\
# Hands the refs about to be updated ("<old> <new> <ref>" lines on stdin) to `snapshotter hooks check`,
# which refuses the push (one line to the pusher) if it would create or move a date tag of the snapshot
# repository in the future: a sync never makes one, and it would stop every import. Other refs pass.
# No network, no objects read.""", "check"),
    "post-receive": (MARKER, """\
# Hands the pushed refs ("<old> <new> <ref>" lines on stdin) to `snapshotter hooks enqueue`, which
# validates them and queues the builds they ask for. It only enqueues: it never builds in the pusher's
# connection, and returns in a fraction of a second.""", "enqueue"),
}


def render(executable: str, config: Path | None, hook: str = "post-receive") -> str:
    """The `hook` script for `executable` (absolute) and `config` (absolute, or None for the default)."""
    marker, comment, command = HOOKS[hook]
    return TEMPLATE.format(marker=marker, comment=comment, command=command, exe=shlex.quote(executable),
                           config=shlex.quote(str(config)) if config is not None else "''")


def check_push(cfg: Config, repo: Path, text: str) -> None:
    """The pre-receive check of `text` ("<old> <new> <ref>" lines) pushed to `repo`: SnapshotterError
    (one line naming every such ref) if `repo` is the snapshot repository and the push creates or moves
    a date tag after the newest snapshot that can exist plus FUTURE_SLACK (`sync.run.future_tags`'
    rule). Deleting such a tag, and every other ref, passes; lines that are not ref updates are left to
    post-receive."""
    from snapshotter.git.repository import tag_date
    from snapshotter.service.triggers import is_snapshot_repository, parse_updates
    from snapshotter.sync.run import FUTURE_SLACK, newest_possible_day, now_from_env

    if not is_snapshot_repository(cfg, repo):
        return
    limit = newest_possible_day(now_from_env()) + FUTURE_SLACK
    updates, _rejected = parse_updates(text)
    future = []
    for up in updates:
        day = tag_date(up.short) if up.kind == "tags" and not up.deleted else None
        if day is not None and day > limit:
            future.append(up.ref)
    if future:
        raise SnapshotterError(f"{', '.join(future)}: a snapshot tag in the future (the newest snapshot that can "
                               f"exist is {limit - FUTURE_SLACK:%Y-%m-%d}); refused: a sync never makes one, and "
                               "it would stop every import")


def find_executable() -> str:
    """The absolute path of the `snapshotter` executable running now (or on PATH)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "snapshotter" and argv0.is_file():
        return str(argv0.resolve())
    found = shutil.which("snapshotter")
    if found is None:
        raise SnapshotterError("cannot find the snapshotter executable; pass --executable")
    return str(Path(found).resolve())


def _is_bare(repo: Path) -> bool:
    return (repo / "HEAD").is_file() and (repo / "objects").is_dir() and (repo / "refs").is_dir()


def install(repo: Path, executable: str, config: Path | None, force: bool = False) -> list[Path]:
    """Write REPO/hooks/pre-receive and REPO/hooks/post-receive (mode 755, atomically); returns their
    paths.

    Refuses a repository that is not bare, a relative executable or config, a missing config file,
    and an existing hook of either name that is not ours (unless `force`; nothing is written then).
    """
    repo = Path(repo)
    if not _is_bare(repo):
        raise SnapshotterError(f"{repo} is not a bare git repository")
    exe = Path(executable)
    if not exe.is_absolute() or not os.access(exe, os.X_OK) or not exe.is_file():
        raise SnapshotterError(f"{executable}: not an absolute path to an executable")
    if config is not None:
        config = Path(config).absolute()
        if not config.is_file():
            raise SnapshotterError(f"config file {config} does not exist")
    hooks_dir = repo / "hooks"
    hooks_dir.mkdir(exist_ok=True)
    targets = [hooks_dir / name for name in HOOKS]
    for target in targets:
        if target.exists() and not force:
            try:
                ours = HOOKS[target.name][0] in target.read_text(errors="replace")
            except OSError as e:
                raise SnapshotterError(f"{target}: {e.strerror}") from None
            if not ours:
                raise SnapshotterError(f"{target} exists and was not installed by snapshotter; use --force to "
                                       "replace it")
    for target in targets:
        # Pushers can write the repository's top: a hooks/ they replaced with a symlink is refused.
        atomic_write(target, render(str(exe), config, target.name).encode(), mode=0o755, durable=True,
                     nofollow_dir=True)
    log.debug("installed %s (run %s%s)", ", ".join(map(str, targets)), exe,
              f" --config {config}" if config else "")  # the caller says it
    return targets
