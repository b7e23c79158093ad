"""The policy behind `snapshotter sync` and `queue add` lives in the service layer (service.loop.sync_and_queue,
service.triggers.add_jobs): what they decide, with a real loopback mirror, gpg, git and the SQLite queue."""

from __future__ import annotations

import subprocess
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from helpers import servicelib, testlib

from snapshotter.config import load
from snapshotter.errors import EXIT_OK, EXIT_PUSH_FAILED, SignatureError, SnapshotterError
from snapshotter.service.jobqueue import open_queue
from snapshotter.service.loop import sync_and_queue
from snapshotter.service.triggers import add_jobs

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)  # the newest possible snapshot is 2026-11-20
D18, D19, D20 = date(2026, 11, 18), date(2026, 11, 19), date(2026, 11, 20)


def write_config(tmp: Path, mirror: testlib.HttpMirror, key: testlib.Key, extra: str = "") -> Path:
    return servicelib.write_sync_config(tmp, mirror, key, extra=extra)


def queued(cfg_path: Path) -> list[tuple[str, str]]:
    return sorted((r.job.profile, r.job.tag) for r in open_queue(load(cfg_path)).list())


def test_sync_queues_the_builds_of_the_days_it_imported_before_failing(
        tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key, other_key: testlib.Key) -> None:
    cfg = write_config(tmp_path, http_mirror, gpg_key)
    now = {"SNAPSHOTTER_NOW": str(int(NOW.timestamp()))}
    testlib.build_snapshot(http_mirror.root, D18, key=gpg_key)
    assert testlib.run_cli("--config", str(cfg), "sync", "--date", "20261118", env=now).returncode == 0
    testlib.build_snapshot(http_mirror.root, D19, key=gpg_key)
    testlib.build_snapshot(http_mirror.root, D20, key=other_key)  # the second day of the catch-up is bad
    proc = testlib.run_cli("--config", str(cfg), "sync", env=now)
    assert proc.returncode == 1 and "signature verification failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    # 2026-11-19 was imported before the failure, and its builds are queued as a push of the tag would.
    assert queued(cfg) == [("basic", "2026-11-18"), ("basic", "2026-11-19"),
                           ("server", "2026-11-18"), ("server", "2026-11-19")]


def test_sync_and_queue_reports_what_happened_with_its_exit_status(
        tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key) -> None:
    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)
    gone = tmp_path / "missing" / "gone.git"
    cfg = load(write_config(tmp_path, http_mirror, gpg_key, extra=f'[git]\npush = ["{gone}"]\n'))
    outcome = sync_and_queue(cfg, now=NOW)
    assert outcome.error is None and outcome.queue_error is None
    assert [r.tag for r in outcome.report.imported] == outcome.new_tags == ["2026-11-20"]
    assert outcome.newest is not None and outcome.newest.name == "2026-11-20"
    assert len(outcome.queued) == 2
    assert [remote for remote, _ in outcome.report.push_failed] == [str(gone)]
    assert outcome.exit_status == EXIT_PUSH_FAILED
    # Once the remote exists: pushed, nothing new, nothing queued again.
    subprocess.run(["git", "init", "-q", "--bare", str(gone)], check=True)
    again = sync_and_queue(cfg, now=NOW)
    assert again.exit_status == EXIT_OK
    assert again.report.up_to_date and again.new_tags == [] and again.queued == []
    assert again.report.pushed == [str(gone)]


def test_sync_and_queue_carries_the_error_and_its_exit_status(
        tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key, other_key: testlib.Key) -> None:
    testlib.build_snapshot(http_mirror.root, D20, key=other_key)
    cfg = load(write_config(tmp_path, http_mirror, gpg_key))
    outcome = sync_and_queue(cfg, now=NOW)
    assert isinstance(outcome.error, SignatureError)
    assert outcome.exit_status == outcome.error.exit_code == 1
    assert outcome.new_tags == [] and outcome.queued == [] and outcome.newest is None


def make_tagged_repo(repo: Path, *tags: str) -> None:
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(repo)], check=True)
    git = ["git", f"--git-dir={repo}", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    tree = subprocess.run([*git, "mktree"], input="", capture_output=True, text=True, check=True).stdout.strip()
    for name in tags:
        commit = subprocess.run([*git, "commit-tree", tree, "-m", name], capture_output=True, text=True,
                                check=True).stdout.strip()
        subprocess.run([*git, "tag", "-a", "-m", name, name, commit], check=True)


def test_add_jobs_checks_every_profile_before_queueing_any(tmp_path: Path, http_mirror: testlib.HttpMirror,
                                                          gpg_key: testlib.Key) -> None:
    cfg = load(write_config(tmp_path, http_mirror, gpg_key))
    make_tagged_repo(tmp_path / "gentoo.git", "2026-11-19", "2026-11-20")
    with pytest.raises(SnapshotterError, match="no profile 'nope'"):
        add_jobs(cfg, ["basic", "nope"])
    with pytest.raises(SnapshotterError, match="profile basic has no overlay 'myov'"):
        add_jobs(cfg, ["basic"], overlays=[("myov", "a" * 40)])
    assert not (tmp_path / "state" / "queue.sqlite").exists() or open_queue(cfg).list() == []
    report = add_jobs(cfg, ["basic", "server"])  # at the newest tag
    assert [(job.profile, job.tag, created) for job, _, created in report.added] == [
        ("basic", "2026-11-20", True), ("server", "2026-11-20", True)]
    assert report.exit_status == EXIT_OK
    again = add_jobs(cfg, ["basic"], tag="2026-11-20")
    assert [(jid, created) for _, jid, created in again.added] == [(report.added[0][1], False)]
