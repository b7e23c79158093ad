"""The real Gentoo client (`emerge-webrsync` from portage 3.0.83 on PyPI) against our published snapshots,
served over HTTP on 127.0.0.1, with OpenPGP verification on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import pytest
from helpers import testlib
from helpers.publishlib import DAYS, build_synced, expected_listing, run_publish, sync_days, tree_listing

from snapshotter.git.export import export_tree

pytestmark = pytest.mark.portage


def portage_bin() -> Path | None:
    here = Path(sys.executable).parent
    if (here / "emerge-webrsync").is_file():
        return here
    found = shutil.which("emerge-webrsync")
    return Path(found).resolve().parent if found else None


BIN = portage_bin()
needs_client = pytest.mark.skipif(BIN is None or shutil.which("rsync") is None,
                                  reason="needs emerge-webrsync (pip install portage==3.0.83) and rsync")


def webrsync(tmp: Path, mirror_url: str, key_file: Path, repo: Path, *args: str) -> subprocess.CompletedProcess:
    """The environment-only invocation: no config files, everything under `tmp`, gpg verification on."""
    assert BIN is not None
    for d in ("configroot", "distfiles", "home"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    # gpg-agent's socket lives in the client's temporary keyring: keep that path short (108-byte limit).
    short_tmp = Path(tempfile.mkdtemp(prefix="ew-", dir="/tmp"))
    path = os.pathsep.join([str(BIN), "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"])
    # Without gemato on PATH the client verifies with gpg against PORTAGE_GPG_KEY (see the notes).
    assert not any(Path(p, "gemato").exists() for p in path.split(os.pathsep)), "gemato on PATH needs an HKP stand-in"
    env = {
        "PATH": path, "HOME": str(tmp / "home"), "LC_ALL": "C", "TZ": "UTC",
        "PORTAGE_CONFIGROOT": str(tmp / "configroot"),
        "GENTOO_MIRRORS": mirror_url,
        "PORTAGE_TMPDIR": str(short_tmp),
        "DISTDIR": str(tmp / "distfiles"),
        "PKGDIR": str(tmp / "pkgdir"),
        "FEATURES": "-usersync -news",
        "PORTAGE_GPG_KEY": str(key_file),
        "PORTAGE_REPOSITORIES": f"[DEFAULT]\nmain-repo = gentoo\n[gentoo]\nlocation = {repo}\n",
    }
    try:
        return subprocess.run([str(BIN / "emerge-webrsync"), *args], env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        shutil.rmtree(short_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory, gpg_key: testlib.Key) -> Path:
    """Three days imported by the real `snapshotter sync`."""
    return build_synced(tmp_path_factory, gpg_key)


@pytest.fixture(scope="module")
def published(synced: Path, gpg_key: testlib.Key, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("published") / "www"
    r = run_publish(synced, out, gpg_key, "--all")
    assert r.returncode == 0, r.stderr
    server = testlib.serve(out)
    yield out, server
    server.server.shutdown()
    server.server.server_close()


@needs_client
def test_real_client_reverts_to_every_published_day(published, synced: Path, gpg_key: testlib.Key,
                                                    tmp_path: Path) -> None:
    out, server = published
    repo = tmp_path / "gentoo"
    for day in sorted(DAYS):
        r = webrsync(tmp_path / "client", server.url, gpg_key.public, repo, f"--revert={day:%Y%m%d}")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "PGP verification method: gpg" in r.stdout + r.stderr
        name = f"gentoo-{day:%Y%m%d}.tar.xz"
        assert [p for p in server.requests if name in p][:3] == [f"/snapshots/{name}{s}" for s in
                                                                 (".md5sum", ".gpgsig", "")]
        # The client's tree is the tag's tree: content, modes, symlinks (the client adds nothing here).
        exported = tmp_path / f"tag-{day}"
        export_tree(synced, f"{day:%Y-%m-%d}", exported)
        assert tree_listing(repo) == tree_listing(exported) == expected_listing(DAYS[day], day)


@needs_client
def test_real_client_refuses_another_key(published, other_key: testlib.Key, tmp_path: Path,
                                         gpg_key: testlib.Key) -> None:
    """Same snapshots, but the client trusts another key (whose uid also says infrastructure@gentoo.org)."""
    out, server = published
    repo = tmp_path / "gentoo"
    repo.mkdir()
    (repo / "marker").write_text("untouched\n")
    r = webrsync(tmp_path / "client", server.url, other_key.public, repo, "--revert=20260111")
    assert r.returncode != 0
    assert "signature verification failed" in r.stdout + r.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["marker"]
    # And a tarball re-signed by the other key is refused by a client trusting ours.
    forged = tmp_path / "forged"
    shutil.copytree(out, forged)
    other_key.sign(forged / "snapshots/gentoo-20260111.tar.xz")
    server2 = testlib.serve(forged)
    try:
        r = webrsync(tmp_path / "client2", server2.url, gpg_key.public, repo, "--revert=20260111")
    finally:
        server2.server.shutdown()
        server2.server.server_close()
    assert r.returncode != 0 and "signature verification failed" in r.stdout + r.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["marker"]


@needs_client
def test_client_config_stanza_drives_the_real_client(published, gpg_key: testlib.Key, tmp_path: Path) -> None:
    """The printed repos.conf + GENTOO_MIRRORS, used as they are, fetch and verify our snapshot."""
    out, server = published
    repo = tmp_path / "repo"
    key_path = tmp_path / "keys/snapshotter.asc"
    key_path.parent.mkdir()
    shutil.copy(gpg_key.public, key_path)
    r = testlib.run_cli("client-config", "--mirror-url", server.url + "/", "--key-path", str(key_path),
                        "--location", str(repo))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "sync-type = webrsync\n" in text and "sync-webrsync-verify-signature = yes\n" in text
    assert f"sync-openpgp-key-path = {key_path}\n" in text
    mirrors_line = next(line for line in text.splitlines() if line.startswith("GENTOO_MIRRORS="))
    assert mirrors_line == f'GENTOO_MIRRORS="{server.url}"'
    repos_conf = text.split("# /etc/portage/make.conf")[0]
    key_in_conf = next(line.split(" = ", 1)[1] for line in repos_conf.splitlines()
                       if line.startswith("sync-openpgp-key-path"))
    mirror_url = mirrors_line.split("=", 1)[1].strip('"')
    # Run the client with exactly these values (the portage sync module passes the key path the same way).
    r = webrsync(tmp_path / "client", mirror_url, Path(key_in_conf), repo, "--revert=20260112")
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree_listing(repo) == expected_listing(DAYS[date(2026, 1, 12)], date(2026, 1, 12))
    for bad in (["--mirror-url", "http://x/ y"], ["--mirror-url", "http://x", "--key-path", "rel/key.asc"],
                ["--mirror-url", 'http://x/"$(id)"']):
        r = testlib.run_cli("client-config", *bad)
        assert r.returncode == 1 and r.stderr.startswith("snapshotter: error: ") and not r.stdout


@needs_client
def test_real_client_default_sync_finds_a_recent_day(gpg_key: testlib.Key, tmp_path: Path,
                                                     http_mirror: testlib.HttpMirror) -> None:
    """Without --revert (what `emerge --sync` runs) the client walks back from yesterday and takes the
    newest published day it can verify."""
    from datetime import UTC, datetime, timedelta

    day = (datetime.now(UTC) - timedelta(days=2)).date()  # within the client's walk, even before 01:00 UTC
    DAYS[day] = {**DAYS[date(2026, 1, 12)], "app-misc/recent/recent-1.ebuild": "EAPI=8\n"}
    try:
        repo = tmp_path / "gentoo.git"
        sync_days(repo, http_mirror, gpg_key, [day], now=str(testlib.snapshot_time(day) + 3600))
        out = tmp_path / "www"
        r = run_publish(repo, out, gpg_key, "--xz-level", "1")
        assert r.returncode == 0, r.stderr
        server = testlib.serve(out)
        try:
            client_repo = tmp_path / "client-repo"
            r = webrsync(tmp_path / "client", server.url, gpg_key.public, client_repo)
        finally:
            server.server.shutdown()
            server.server.server_close()
        assert r.returncode == 0, r.stdout + r.stderr
        assert tree_listing(client_repo) == expected_listing(DAYS[day], day)
    finally:
        DAYS.pop(day)
