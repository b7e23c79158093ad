"""Keeping the suite off the host's directories: a configuration that moves every built-in default path
under a temporary directory (tests/conftest.py points SNAPSHOTTER_CONFIG at it for the whole session),
and listings of the host directories those defaults point into, taken at the start and the end of the
session, to fail the run if a test wrote there anyway.

The stand-in stage cache /var/cache/snapshotter-tests (helpers/stage.py) is a deliberate test cache and
not one of these directories.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

from snapshotter import config

Listing = dict[str, tuple[str, int, int]] | None  # path -> (type, size, mtime in ns); None: no such directory


def default_paths() -> dict[str, Path]:
    """Every path-valued default of the configuration, by its key ("repo", "sync.cache_dir", ...)."""
    defaults = config.Config()
    found: dict[str, Path] = {}
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if isinstance(value, Path):
            found[f.name] = value
        elif dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                if isinstance(getattr(value, g.name), Path):
                    found[f"{f.name}.{g.name}"] = getattr(value, g.name)
    return found


def watched() -> list[Path]:
    """The host directories no test may change: /var/lib/snapshotter, /var/cache/snapshotter and whatever
    else a built-in default points at (each path once: not when it lies under one already watched)."""
    out = [Path("/var/lib/snapshotter"), Path("/var/cache/snapshotter")]
    for path in sorted(default_paths().values()):
        if not any(path == w or w in path.parents for w in out):
            out.append(path)
    return out


def safe_config(base: Path) -> str:
    """A configuration (TOML) that sets every path default, and publish.out, to a path under `base`."""
    keys = [*default_paths(), "publish.out"]
    top = [f'{key} = "{base / key}"' for key in keys if "." not in key]
    sections: dict[str, list[str]] = {}
    for key in keys:
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, []).append(f'{name} = "{base / section / name}"')
    lines = ["# Written by tests/conftest.py: every path under a temporary directory.", *top]
    for section, entries in sections.items():
        lines += ["", f"[{section}]", *entries]
    return "\n".join(lines) + "\n"


def listing(root: Path) -> Listing:
    """Every entry under `root` (itself included) with its type, size and mtime; symlinks not followed."""
    if not os.path.lexists(root):
        return None
    out: dict[str, tuple[str, int, int]] = {}

    def add(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # removed while we looked: it shows as missing next time
            return
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
        out[os.path.relpath(path, root)] = (kind, st.st_size, st.st_mtime_ns)

    add(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            add(os.path.join(dirpath, name))
    return out


def changes(root: Path, before: Listing, after: Listing) -> list[str]:
    """What differs between two listings of `root`, one line each ([] when nothing changed)."""
    if before is None and after is None:
        return []
    if before is None:
        return [f"{root}: did not exist, now exists ({len(after or {})} entries)"]
    if after is None:
        return [f"{root}: existed, now gone"]
    out = []
    for rel in sorted(before.keys() | after.keys()):
        path = root / rel if rel != "." else root
        if rel not in before:
            out.append(f"{path}: created")
        elif rel not in after:
            out.append(f"{path}: removed")
        elif before[rel] != after[rel]:
            (k0, s0, m0), (k1, s1, m1) = before[rel], after[rel]
            what = [f"type {k0} -> {k1}"] if k0 != k1 else []
            what += [f"size {s0} -> {s1}"] if s0 != s1 else []
            what += ["mtime changed"] if m0 != m1 else []
            out.append(f"{path}: {', '.join(what)}")
    return out
