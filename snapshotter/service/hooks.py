"""The git post-receive hook: rendering it and installing it into a bare repository.

The hook is a four-line sh script that execs `snapshotter [--config FILE] hooks enqueue`; the absolute
path of the executable and of the configuration are baked in at install time, quoted for sh. It only
enqueues (see triggers.py), so the pusher's connection returns in a fraction of a second. The file
`hooks/post-receive` in the source tree is this template with the defaults filled in.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

from snapshotter.errors import SnapshotterError
from snapshotter.fsutil import atomic_write

log = logging.getLogger(__name__)

MARKER = "# portage-snapshotter post-receive hook"

TEMPLATE = """#!/bin/sh
{marker}
# Hands the pushed refs ("<old> <new> <ref>" lines on stdin) to `snapshotter hooks enqueue`, which
# validates them and queues the builds they ask for. It only enqueues: it never builds in the pusher's
# connection, and returns in a fraction of a second. `snapshotter hooks install REPO [--config FILE]`
# writes this file with the two values below filled in (quoted for sh).
SNAPSHOTTER={exe}
CONFIG_FILE={config}
if [ -n "$CONFIG_FILE" ]; then
    exec "$SNAPSHOTTER" --config "$CONFIG_FILE" hooks enqueue
fi
exec "$SNAPSHOTTER" hooks enqueue
"""


def render(executable: str, config: Path | None) -> str:
    """The hook script for `executable` (absolute) and `config` (absolute, or None for the default)."""
    return TEMPLATE.format(marker=MARKER, exe=shlex.quote(executable),
                           config=shlex.quote(str(config)) if config is not None else "''")


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


def install(repo: Path, executable: str, config: Path | None, force: bool = False) -> Path:
    """Write REPO/hooks/post-receive (mode 755, atomically); returns its path.

    Refuses a repository that is not bare, a relative executable or config, a missing config file,
    and an existing post-receive hook that is not ours (unless `force`).
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
    target = hooks_dir / "post-receive"
    if target.exists() and not force:
        try:
            ours = MARKER in target.read_text(errors="replace")
        except OSError as e:
            raise SnapshotterError(f"{target}: {e.strerror}") from None
        if not ours:
            raise SnapshotterError(f"{target} exists and was not installed by snapshotter; use --force to replace it")
    # Pushers can write the repository's top: a hooks/ they replaced with a symlink is refused.
    atomic_write(target, render(str(exe), config).encode(), mode=0o755, durable=True, nofollow_dir=True)
    log.debug("installed %s (runs %s%s)", target, exe, f" --config {config}" if config else "")  # the caller says it
    return target
