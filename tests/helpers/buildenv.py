"""The environment of the real-Portage chroot build tests (fixtures in tests/chroot/conftest.py): the
stand-in stage, signed snapshots synced into the mirror by the real `snapshotter sync`, an overlay with two
tags, signing keys and the configuration with the profiles `basic`, `trouble` and `chain`."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from chroot import builder
from chroot.mounts import mounts_under, safe_rmtree
from helpers import ebuild_repo, signkeys, testlib
from helpers import stage as test_stage

TAG1, TAG2 = "2026-01-01", "2026-01-02"


def sync_mirror(base: Path, cfg: Path, http: testlib.HttpMirror, key: testlib.Key,
                days: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """The mirror is made the real way: signed daily snapshots of `days` (tag -> tree files; default tag 1:
    hello-1.0 and the slow trouble-1, tag 2: hello-1.1 and the failing trouble-2) on an HTTP mirror,
    imported by `snapshotter sync`. Returns tag -> commit from `snapshotter tags`."""
    if days is None:
        days = {TAG1: ebuild_repo.tree_files(hello="1.0", trouble="1"),
                TAG2: ebuild_repo.tree_files(hello="1.1", trouble="2")}
    for tag, files in days.items():
        testlib.build_snapshot(http.root, date.fromisoformat(tag), files, key=key)
        r = testlib.run_cli("--config", str(cfg), "sync", "--mirror", http.url, "--keyring", str(key.public),
                            "--fingerprint", key.fingerprint, "--cache-dir", str(base / "sync-cache"),
                            "--date", tag.replace("-", ""), "--no-push",
                            env={"SNAPSHOTTER_NOW": str(testlib.snapshot_time(date(2026, 1, 10)))})
        assert r.returncode == 0, r.stderr
    r = testlib.run_cli("--config", str(cfg), "tags")
    assert r.returncode == 0, r.stderr
    tags = dict(line.split()[:2] for line in r.stdout.splitlines())
    assert list(tags) == list(days)
    return tags


def portage_env(tmp_path_factory, gpg_key):
    """The environment of a module of real chroot builds (a generator: yields it, then checks for leaks
    and cleans up): stand-in stage, the mirror synced by the real `snapshotter sync` from signed
    snapshots (TAG1, TAG2), an overlay with tags v1 and v2, signing keys, the configuration."""
    if os.geteuid() != 0:
        pytest.skip("chroot builds need root")
    base = tmp_path_factory.mktemp("build").resolve()
    stage_file = test_stage.ensure_stage()
    sha = hashlib.sha256(stage_file.read_bytes()).hexdigest()
    ov_tags = ebuild_repo.git_repo_with_tags(base / "overlay", [
        ("v1", ebuild_repo.overlay_files("1.0")), ("v2", ebuild_repo.overlay_files("2.0"))], bare=False)
    # Build roots on tmpfs when there is one: extracting and removing 174 MB per build on a busy disk
    # costs 20-30 s; on tmpfs about 2 s. Outputs stay on disk.
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="snapshotter-test-work-", dir=shm)) if os.access(shm, os.W_OK) \
        else base / "work"
    confdir = base / "confdir"
    testlib.write_tree(confdir, {"package.accept_keywords/tilde": "dev-libs/tilde ~amd64\n"})
    # The trouble profile takes its stage by URL from a real HTTP server (downloaded once, then cached).
    mirror = testlib.serve(base / "http")
    (base / "http" / "stages").mkdir()
    try:
        os.link(stage_file, base / "http" / "stages" / stage_file.name)
    except OSError:  # another file system
        shutil.copyfile(stage_file, base / "http" / "stages" / stage_file.name)
    (base / "http" / "distfiles").mkdir()
    (base / "http" / "distfiles" / ebuild_repo.DISTFILE).write_bytes(ebuild_repo.distfile())
    # Signing keys: basic's has a passphrase (read from a file, no terminal), trouble's has none.
    basic_key = signkeys.make_signing_key(base / "gnupg-basic", passphrase="build pass phrase")
    passphrase = base / "basic-passphrase"
    passphrase.write_text("build pass phrase\n")
    passphrase.chmod(0o600)
    trouble_key = signkeys.make_signing_key(base / "gnupg-trouble")
    cfg = base / "snapshotter.toml"
    cfg.write_text(f"""
repo = "{base}/mirror.git"
state_dir = "{base}/state"
[build]
work_dir = "{work}"
output = "{base}/out"
cache_dir = "{base}/cache"

[profiles.basic]
stage = "{stage_file}"
stage_sha256 = "{sha}"
portage_profile = "default"
world = ["app-misc/hello", "app-misc/extra", "dev-libs/tilde", "app-misc/fetched"]
portage_confdir = "{confdir}"
overlays = [{{ name = "extra", url = "{base}/overlay", ref = "v1" }}]
make_conf = {{ MAKEOPTS = "-j2", USE = "-doc", GENTOO_MIRRORS = "{mirror.url}" }}
signing_key = "{basic_key.fingerprint}"
gnupghome = "{basic_key.home}"
passphrase_file = "{passphrase}"

[profiles.trouble]
stage = "{mirror.url}/stages/{stage_file.name}"
stage_sha256 = "{sha}"
portage_profile = "default"
world = ["app-misc/trouble"]
signing_key = "{trouble_key.fingerprint}"
gnupghome = "{trouble_key.home}"

[profiles.chain]
stage = "latest-build"
seed_stage = "{stage_file}"
seed_stage_sha256 = "{sha}"
portage_profile = "default"
world = ["app-misc/hello"]
""")
    tags = sync_mirror(base, cfg, mirror, gpg_key)
    yield {"base": base, "work": work, "cfg": cfg, "tags": tags, "ov_tags": ov_tags, "stage": stage_file,
           "sha": sha, "confdir": confdir, "http": mirror, "basic_key": basic_key, "trouble_key": trouble_key}
    mirror.server.shutdown()
    mirror.server.server_close()
    assert mounts_under(base) == [], "a mount leaked: refusing to let pytest delete the tmp dir"
    left = builder.processes_in(work)  # a build that outlived its builder (a bug): stop it, then fail
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    safe_rmtree(work)  # checks mountinfo itself
    assert left == [], f"processes were still running in the build roots: {left}"
