"""Three days of a tree with awkward content (symlinks, long names, deep paths, binary data), imported
by the real `snapshotter sync` from signed snapshots on a loopback HTTP mirror and published by the real
`snapshotter publish`; and listings to compare the trees clients get with what went in."""

from __future__ import annotations

import hashlib
import os
from datetime import date
from pathlib import Path

import pytest

from helpers import testlib

LONG_DIR = "dev-python/" + "a-very-long-package-name-" * 4 + "x"
DAYS: dict[date, dict] = {
    date(2026, 1, 10): {
        **testlib.BASE_TREE,
        "profiles/link": ("symlink", "repo_name"),
        "scripts/run": ("symlink", "../sys-apps/tool/files/run.sh"),
        f"{LONG_DIR}/" + "n" * 110 + "-1.0.ebuild": "EAPI=8\n",
        "files/" + "deep/" * 40 + "leaf": "deep\n",
        "bin/blob.dat": bytes(range(256)) * 64,
    },
}
DAYS[date(2026, 1, 11)] = {
    **{k: v for k, v in DAYS[date(2026, 1, 10)].items() if k != "licenses/MIT"},
    "app-misc/hello/hello-1.1.ebuild": "EAPI=8\nSLOT=0\nKEYWORDS=\"~amd64\"\n",
    "sys-apps/tool/files/run.sh": "#!/bin/sh\necho no longer executable\n",
    "licenses/GPL-2": "GPL\n",
}
DAYS[date(2026, 1, 12)] = {
    **DAYS[date(2026, 1, 11)],
    "eclass/foo.eclass": "# foo, changed\n",
    "profiles/link": ("symlink", "categories"),
}
NOW = str(testlib.snapshot_time(date(2026, 1, 12)) + 3600)


def tag_of(day: date) -> str:
    return f"{day:%Y-%m-%d}"


def sync_days(repo: Path, upstream: testlib.HttpMirror, key: testlib.Key, days: list[date],
              now: str = NOW) -> None:
    """Import `days` into `repo` with the real `snapshotter sync` from an HTTP mirror on 127.0.0.1."""
    for day in days:
        testlib.build_snapshot(upstream.root, day, DAYS[day], key=key)
        r = testlib.run_cli("sync", "--repo", str(repo), "--mirror", upstream.url, "--keyring", str(key.public),
                            "--fingerprint", key.fingerprint, "--date", f"{day:%Y%m%d}", "--no-push",
                            "--cache-dir", str(repo.parent / "cache"), env={"SNAPSHOTTER_NOW": now})
        assert r.returncode == 0, r.stderr


def build_synced(tmp_path_factory: pytest.TempPathFactory, key: testlib.Key) -> Path:
    """A bare mirror holding the three DAYS, imported by the real sync."""
    base = tmp_path_factory.mktemp("synced")
    upstream = testlib.serve(base / "upstream")
    try:
        repo = base / "gentoo.git"
        sync_days(repo, upstream, key, sorted(DAYS))
    finally:
        upstream.server.shutdown()
        upstream.server.server_close()
    return repo


def run_publish(repo: Path, out: Path, key: testlib.Key, *args: str, env: dict | None = None,
                timeout: float = 120):
    return testlib.run_cli("publish", "--repo", str(repo), "--out", str(out), "--signing-key", key.fingerprint,
                           "--gnupghome", str(key.home), *args, env=env, timeout=timeout)


def tree_listing(root: Path) -> dict[str, tuple]:
    """path -> ("dir", mode) | ("link", target) | ("file", mode, sha256)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def expected_listing(files: dict, day: date) -> dict[str, tuple]:
    """What a tree built from `files` (testlib.write_tree format, plus timestamp.x) must look like."""
    files = {**files, "metadata/timestamp.x": testlib.timestamp_line(testlib.snapshot_time(day))}
    out: dict[str, tuple] = {}
    for rel, value in files.items():
        parts = rel.split("/")
        for i in range(1, len(parts)):
            out["/".join(parts[:i])] = ("dir", 0o755)
        if isinstance(value, tuple) and value[0] == "symlink":
            out[rel] = ("link", value[1])
        else:
            content = value[1] if isinstance(value, tuple) else value
            content = content.encode() if isinstance(content, str) else content
            mode = 0o755 if isinstance(value, tuple) and value[0] == "exec" else 0o644
            out[rel] = ("file", mode, hashlib.sha256(content).hexdigest())
    return out
