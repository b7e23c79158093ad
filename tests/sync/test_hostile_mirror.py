"""`snapshotter sync` end to end against hostile mirrors (tests/helpers/faultserver.py): a drip-feeding
mirror meets the deadline and frees the repository lock, failover is not poisoned by a partial download,
`Content-Encoding: gzip` works, and the size caps on downloads and on what a snapshot unpacks to hold."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from helpers import testlib
from helpers.faultserver import FaultServer, serve_faults

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
D20 = date(2026, 11, 20)
TARBALL = "/snapshots/gentoo-20261120.tar.xz"


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[FaultServer]:
    srv = serve_faults(tmp_path / "mirror")
    yield srv
    srv.close()


def sync(tmp_path: Path, key: testlib.Key, *mirrors: str, config: str = "",
         repo: str = "gentoo.git") -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{repo}.toml"
    keys = {"retries": "1", "timeout": "10"}
    keys.update(line.split(" = ", 1) for line in config.splitlines() if line)  # type: ignore[misc]
    path.write_text("[sync]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    argv = ["--config", str(path), "sync", "--repo", str(tmp_path / repo), "--keyring", str(key.public),
            "--fingerprint", key.fingerprint, "--cache-dir", str(tmp_path / "cache")]
    for m in mirrors:
        argv += ["--mirror", m]
    return testlib.run_cli(*argv, env={"SNAPSHOTTER_NOW": str(int(NOW.timestamp()))})




def tags(repo: Path) -> list[str]:
    if not repo.exists():
        return []
    return subprocess.run(["git", f"--git-dir={repo}", "tag"], capture_output=True, text=True,
                          check=True).stdout.split()


def test_a_drip_feeding_mirror_fails_at_the_deadline_and_frees_the_lock(tmp_path: Path, mirror: FaultServer,
                                                                        gpg_key: testlib.Key) -> None:
    testlib.build_snapshot(mirror.root, D20, key=gpg_key)
    mirror.plan(TARBALL, "drip")
    proc = sync(tmp_path, gpg_key, mirror.url, config="timeout = 3\ndeadline = 3\nretries = 0\n")
    testlib.one_error(proc, "sync.deadline (3 s)")
    assert tags(tmp_path / "gentoo.git") == []
    fd = os.open(tmp_path / "gentoo.git" / "snapshotter.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again: nothing of the sync is left holding it
    finally:
        os.close(fd)


def test_failover_after_garbage_and_a_reset_is_not_poisoned(tmp_path: Path, mirror: FaultServer,
                                                            gpg_key: testlib.Key) -> None:
    """Mirror 1 sends garbage and resets, every time; its partial must not be resumed from mirror 2."""
    testlib.build_snapshot(mirror.root, D20, key=gpg_key)
    healthy = serve_faults(tmp_path / "healthy")
    try:
        testlib.build_snapshot(healthy.root, D20, key=gpg_key)
        mirror.plan(TARBALL, "garbage-reset")
        proc = sync(tmp_path, gpg_key, mirror.url, healthy.url)
        assert proc.returncode == 0, proc.stderr
        assert tags(tmp_path / "gentoo.git") == ["2026-11-20"]
        assert all("Range" not in h for h in healthy.requests(TARBALL))
    finally:
        healthy.close()


def test_gzip_content_encoding_on_every_file(tmp_path: Path, mirror: FaultServer, gpg_key: testlib.Key) -> None:
    tarball = testlib.build_snapshot(mirror.root, D20, key=gpg_key)
    for suffix in ("", ".md5sum", ".gpgsig"):
        mirror.plan(TARBALL + suffix, "gzip")
    proc = sync(tmp_path, gpg_key, mirror.url)
    assert proc.returncode == 0, proc.stderr
    assert tags(tmp_path / "gentoo.git") == ["2026-11-20"]
    assert tarball.stat().st_size > 0


def test_an_endless_md5sum_is_capped(tmp_path: Path, mirror: FaultServer, gpg_key: testlib.Key) -> None:
    testlib.build_snapshot(mirror.root, D20, key=gpg_key)
    mirror.plan(TARBALL + ".md5sum", "endless")
    proc = sync(tmp_path, gpg_key, mirror.url, config="max_side_file_size = 4096\n")
    testlib.one_error(proc, "sync.max_side_file_size (4096 bytes)")
    assert tags(tmp_path / "gentoo.git") == []


def test_a_tarball_over_the_cap_is_not_downloaded(tmp_path: Path, mirror: FaultServer,
                                                  gpg_key: testlib.Key) -> None:
    testlib.build_snapshot(mirror.root, D20, {**testlib.BASE_TREE, "big": os.urandom(200_000)}, key=gpg_key)
    proc = sync(tmp_path, gpg_key, mirror.url, config="max_tarball_size = 100000\n")
    testlib.one_error(proc, "sync.max_tarball_size (100000 bytes)")
    assert not list((tmp_path / "cache").glob("gentoo-*"))


def test_a_member_over_the_cap_is_refused_naming_the_key(tmp_path: Path, mirror: FaultServer,
                                                         gpg_key: testlib.Key) -> None:
    testlib.build_snapshot(mirror.root, D20, {**testlib.BASE_TREE, "distfiles/huge": b"\0" * (3 << 20)},
                           key=gpg_key)
    proc = sync(tmp_path, gpg_key, mirror.url, config="max_member_size = 1048576\n")
    testlib.one_error(proc, "'gentoo/distfiles/huge' is 3145728 bytes", "sync.max_member_size (1048576 bytes)")
    assert tags(tmp_path / "gentoo.git") == []


def test_a_snapshot_unpacking_past_the_cap_is_refused(tmp_path: Path, mirror: FaultServer,
                                                      gpg_key: testlib.Key) -> None:
    files = {**testlib.BASE_TREE, **{f"zeros/{i}": b"\0" * (512 << 10) for i in range(8)}}
    testlib.build_snapshot(mirror.root, D20, files, key=gpg_key)
    proc = sync(tmp_path, gpg_key, mirror.url, config="max_unpacked_size = 2097152\n")
    testlib.one_error(proc, "sync.max_unpacked_size (2097152 bytes)")
    assert tags(tmp_path / "gentoo.git") == []


def test_big_members_are_streamed_into_the_same_commit(tmp_path: Path, mirror: FaultServer,
                                                       gpg_key: testlib.Key) -> None:
    """A file over the streaming threshold goes through in chunks; the result is the blob a plain
    `git hash-object` gives, and a second day with it unchanged or changed is imported right."""
    big = os.urandom(1 << 20) * 6 + b"tail"
    testlib.build_snapshot(mirror.root, D20, {**testlib.BASE_TREE, "metadata/big.bin": big}, key=gpg_key)
    proc = sync(tmp_path, gpg_key, mirror.url)
    assert proc.returncode == 0, proc.stderr
    repo = tmp_path / "gentoo.git"
    want = subprocess.run(["git", "hash-object", "--stdin"], input=big, capture_output=True,
                          check=True).stdout.decode().strip()
    got = subprocess.run(["git", f"--git-dir={repo}", "rev-parse", "2026-11-20:metadata/big.bin"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert got == want
    fsck = subprocess.run(["git", f"--git-dir={repo}", "fsck", "--strict"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr


def test_a_push_to_a_remote_that_never_answers_fails_at_its_deadline(tmp_path: Path, mirror: FaultServer,
                                                                     gpg_key: testlib.Key) -> None:
    from helpers.faultserver import stalling_tcp

    from snapshotter.git.repository import Repository
    from snapshotter.sync import state as syncstate
    from snapshotter.sync.push import push_pending

    testlib.build_snapshot(mirror.root, D20, key=gpg_key)
    assert sync(tmp_path, gpg_key, mirror.url).returncode == 0
    repo = Repository(tmp_path / "gentoo.git")
    with stalling_tcp() as stuck:
        remote = f"http://127.0.0.1:{stuck.port}/gentoo.git"
        state = syncstate.SyncState()
        failed = push_pending(repo, [remote], state, timeout=3)
        assert stuck.accepted  # git did reach it
    assert failed == [(remote, "git push timed out after 3 s")]
    assert remote not in state.pushed


def test_concurrent_syncs_sharing_a_download_cache_never_share_a_file(tmp_path: Path, mirror: FaultServer,
                                                                     gpg_key: testlib.Key) -> None:
    """Two repositories, one cache, syncing at the same time (the issue saw an md5 mismatch or
    FileNotFoundError in 2 of 20 runs): each takes its turn at the cache and both import the same commit."""
    import threading

    testlib.build_snapshot(mirror.root, D20, {**testlib.BASE_TREE, "big": os.urandom(2 << 20)}, key=gpg_key)
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def one(name: str) -> None:
        results[name] = sync(tmp_path, gpg_key, mirror.url, repo=name)

    for rnd in range(3):
        names = [f"r{rnd}-a.git", f"r{rnd}-b.git"]
        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in names:
            assert results[n].returncode == 0, results[n].stderr
        commits = {subprocess.run(["git", f"--git-dir={tmp_path / n}", "rev-parse", "2026-11-20^{commit}"],
                                  capture_output=True, text=True, check=True).stdout for n in names}
        assert len(commits) == 1
