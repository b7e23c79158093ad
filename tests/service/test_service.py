"""`snapshotter run` and `status` for real: a loopback HTTP mirror, real gpg, real git, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from helpers import servicelib, testlib
from helpers.servicelib import jobs

from snapshotter.config import load
from snapshotter.service.loop import retry_delay, window_start

NOW = datetime(2026, 11, 21, 2, 0, tzinfo=UTC)  # newest possible snapshot: 2026-11-20
D19, D20, D21 = date(2026, 11, 19), date(2026, 11, 20), date(2026, 11, 21)


def write_config(tmp: Path, mirror: testlib.HttpMirror, key: testlib.Key, service: str = "",
                 extra: str = "") -> Path:
    return servicelib.write_sync_config(tmp, mirror, key, service=service, extra=extra)


def now_env(now: datetime = NOW) -> dict[str, str]:
    return {"SNAPSHOTTER_NOW": str(int(now.timestamp()))}


def test_retry_schedule_backs_off_until_the_deadline(tmp_path: Path):
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text('[service]\nsync_time = "01:15"\nretry_interval = 600\nretry_deadline = 3600\n')
    cfg = load(cfg_path)
    assert window_start("01:15", NOW) == datetime(2026, 11, 21, 1, 15, tzinfo=UTC)
    assert window_start("03:00", NOW) == datetime(2026, 11, 20, 3, 0, tzinfo=UTC)
    at = datetime(2026, 11, 21, 1, 16, tzinfo=UTC)
    assert [retry_delay(cfg, n, at) for n in (1, 2, 3, 4)] == [600, 1200, 2400, 3540]  # capped by the deadline
    assert retry_delay(cfg, 1, datetime(2026, 11, 21, 2, 16, tzinfo=UTC)) is None


def test_run_once_imports_publishes_queues_and_status_reports(tmp_path: Path, http_mirror, gpg_key):
    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)
    www = tmp_path / "www"
    cfg = write_config(tmp_path, http_mirror, gpg_key, service="publish = true",
                       extra=f'[publish]\nout = "{www}"\nsigning_key = "{gpg_key.fingerprint}"\n'
                             f'gnupghome = "{gpg_key.home}"\nxz_level = 1\n')
    proc = testlib.run_cli("--config", str(cfg), "run", "--once", env=now_env())
    assert proc.returncode == 0, proc.stderr
    assert "sync: imported 2026-11-20" in proc.stderr
    assert "queued 2 build(s) for 2026-11-20" in proc.stderr
    assert "publish: published 2026-11-20 (latest 2026-11-20)" in proc.stderr
    assert sorted(jobs(tmp_path)) == [("basic", "2026-11-20", ()), ("server", "2026-11-20", ())]
    # What was published is the imported tree, signed by the publishing key.
    tarball = www / "snapshots" / "gentoo-20261120.tar.xz"
    testlib.gpg(gpg_key, "--verify", str(tarball) + ".gpgsig", str(tarball))
    listing = subprocess.run(["tar", "-tJf", str(tarball)], check=True, capture_output=True, text=True).stdout
    assert "gentoo-20261120/app-misc/hello/hello-1.0.ebuild" in listing.splitlines()
    # Again: nothing new, nothing queued twice, and it says the next day is not out yet.
    later = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
    proc = testlib.run_cli("--config", str(cfg), "run", "--once", env=now_env(later))
    assert proc.returncode == 0, proc.stderr
    assert "up to date (newest tag 2026-11-20); the snapshot of 2026-11-21 is not on the mirrors yet" in proc.stderr
    assert len(jobs(tmp_path)) == 2
    assert "publish: nothing new (latest 2026-11-20)" in proc.stderr
    st = testlib.run_cli("--config", str(cfg), "status")
    assert st.returncode == 0, st.stderr
    assert "newest tag: 2026-11-20 " in st.stdout
    assert "last failure: never" in st.stdout and "pending pushes: none" in st.stdout
    assert "builds: 2 queued, 0 running, 0 done, 0 failed" in st.stdout
    assert "queued  job 1: basic at 2026-11-20" in st.stdout


def test_run_once_reports_a_bad_signature_and_status_shows_it(tmp_path: Path, http_mirror, gpg_key, other_key):
    testlib.build_snapshot(http_mirror.root, D20, key=other_key)
    cfg = write_config(tmp_path, http_mirror, gpg_key)
    proc = testlib.run_cli("--config", str(cfg), "run", "--once", env=now_env())
    assert proc.returncode == 1 and "sync failed:" in proc.stderr and "Traceback" not in proc.stderr
    st = testlib.run_cli("--config", str(cfg), "status")
    assert "newest tag: none" in st.stdout
    assert "last failure: 20" in st.stdout and "signature" in st.stdout.lower()
    assert "builds: 0 queued, 0 running, 0 done, 0 failed" in st.stdout
    assert not (tmp_path / "state" / "queue.sqlite").exists()  # nothing queued; looking created nothing


def _reader(proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)


def wait_line(lines: list[str], text: str, timeout: float = 30.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if any(text in line for line in lines):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in:\n{''.join(lines)}")


def start_run(cfg: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    full = dict(os.environ, **env)
    proc = subprocess.Popen(["snapshotter", "--config", str(cfg), "run"], stderr=subprocess.PIPE, text=True,
                            env=full, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    threading.Thread(target=_reader, args=(proc, lines), daemon=True).start()
    return proc, lines


@pytest.mark.slow
def test_run_loop_retries_until_the_snapshot_appears_then_stops_on_sigterm(tmp_path: Path, http_mirror, gpg_key):
    testlib.build_snapshot(http_mirror.root, D19, key=gpg_key)
    cfg = write_config(tmp_path, http_mirror, gpg_key,
                       service='sync_time = "01:15"\nretry_interval = 1\nretry_deadline = 21600')
    proc, lines = start_run(cfg, now_env())
    try:
        wait_line(lines, "sync: imported 2026-11-19")
        wait_line(lines, "retry 1 in 1 s")  # 2026-11-20 is due but not out yet
        wait_line(lines, "retry 2 in 2 s")  # backoff doubles
        testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)  # Gentoo publishes it late
        wait_line(lines, "sync: imported 2026-11-20", timeout=30)
        assert sorted(jobs(tmp_path)[-2:]) == [("basic", "2026-11-20", ()), ("server", "2026-11-20", ())]
        time.sleep(0.5)
        n = len(lines)
        time.sleep(1.5)
        assert not any("retry" in line for line in lines[n:]), "no retries once the day is imported"
        proc.send_signal(signal.SIGTERM)  # how fast it exits while idle: benchmarks/bench_service.py
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert "SIGTERM received" in text and "snapshotter run: stopped" in text and "Traceback" not in text


def test_sigterm_during_a_sync_finishes_the_step_and_exits_0(tmp_path: Path, http_mirror, gpg_key):
    # A big enough snapshot that the sync is still running when the signal arrives.
    files = dict(testlib.BASE_TREE)
    files.update({f"app-misc/p{i}/p{i}-1.ebuild": os.urandom(512).hex() for i in range(400)})
    testlib.build_snapshot(http_mirror.root, D20, files, key=gpg_key)
    cfg = write_config(tmp_path, http_mirror, gpg_key)
    proc, lines = start_run(cfg, now_env())
    try:
        wait_line(lines, "starting with a catch-up cycle")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert "SIGINT received" in text and "Traceback" not in text
    assert text.index("SIGINT received") < text.index("sync: imported")  # it arrived mid-step
    # The step was finished, not torn: the day is imported and its builds are queued.
    assert "sync: imported 2026-11-20" in text
    assert len(jobs(tmp_path)) == 2
    tags = testlib.run_cli("--config", str(cfg), "tags")
    assert tags.stdout.startswith("2026-11-20 ")


def test_sync_command_queues_builds_for_the_tags_it_imports(tmp_path: Path, http_mirror, gpg_key):
    testlib.build_snapshot(http_mirror.root, D19, key=gpg_key)
    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)
    cfg = write_config(tmp_path, http_mirror, gpg_key, service='build_profiles = ["server"]')
    proc = testlib.run_cli("--config", str(cfg), "sync", "--date", "20261119", env=now_env())
    assert proc.returncode == 0, proc.stderr
    proc = testlib.run_cli("--config", str(cfg), "sync", env=now_env())
    assert proc.returncode == 0, proc.stderr
    # Only the configured profile; one job per new tag, as a push of the tags would queue.
    assert jobs(tmp_path) == [("server", "2026-11-19", ()), ("server", "2026-11-20", ())]
    proc = testlib.run_cli("--config", str(cfg), "sync", env=now_env())
    assert proc.returncode == 0 and len(jobs(tmp_path)) == 2


def test_run_once_while_another_sync_holds_the_lock_exits_75(tmp_path: Path, http_mirror, gpg_key):
    import fcntl

    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)
    cfg = write_config(tmp_path, http_mirror, gpg_key)
    repo = tmp_path / "gentoo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    with open(repo / "snapshotter.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = testlib.run_cli("--config", str(cfg), "run", "--once", env=now_env())
    assert proc.returncode == 75 and "sync skipped:" in proc.stderr and "locked" in proc.stderr
    assert jobs(tmp_path) == []
