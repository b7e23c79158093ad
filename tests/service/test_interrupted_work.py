"""Work that must not be lost after the refs moved, and what stops the pipeline told rather than silent
(issue 12, points 8, 9 and 12): a queue that fails after the tag was made, a tree cache that cannot be
written, a date tag from the future pushed from outside, a bug inside a cycle of `snapshotter run`.
Real CLI, git, gpg, an HTTP mirror on 127.0.0.1 and the SQLite queue."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from helpers import servicelib, testlib
from helpers.servicelib import git_run, jobs, make_config, make_repos

from snapshotter.config import load
from snapshotter.service.jobqueue import SqliteQueue, queue_path
from snapshotter.service.loop import run_cycle

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)  # the newest possible snapshot is 2026-11-20
D19, D20, D21 = date(2026, 11, 19), date(2026, 11, 20), date(2026, 11, 21)
ENV = {"SNAPSHOTTER_NOW": str(int(NOW.timestamp()))}


def write_config(tmp: Path, mirror: testlib.HttpMirror, key: testlib.Key, state_dir: Path) -> Path:
    return servicelib.write_sync_config(tmp, mirror, key, state_dir=state_dir, profiles=("basic",))


def queued_tags(state_dir: Path) -> list[str]:
    return sorted(r.job.tag for r in SqliteQueue(queue_path(state_dir)).list())




def test_builds_a_failed_queue_missed_are_queued_by_the_next_sync(
        tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the queue's directory should be\n")
    state_dir = blocker / "state"
    cfg = write_config(tmp_path, http_mirror, gpg_key, state_dir)
    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)
    proc = testlib.run_cli("--config", str(cfg), "sync", env=ENV)
    testlib.one_error(proc, "queueing the builds of 2026-11-20 failed", "stay pending")
    repo = tmp_path / "gentoo.git"
    assert git_run(repo, "tag").split() == ["2026-11-20"]  # the import is kept
    state = json.loads((repo / "snapshotter" / "state.json").read_text())
    assert state["queued_through"] == ""  # nothing queued yet, and that is on disk
    # `status` names the tags still waiting for their builds.
    st = testlib.run_cli("--config", str(cfg), "status", env=ENV)
    assert "builds not yet queued for: 2026-11-20" in st.stdout, st.stdout + st.stderr
    # The queue works again: the next sync has nothing to import and queues the missed builds.
    blocker.unlink()
    again = testlib.run_cli("--config", str(cfg), "sync", env=ENV)
    assert again.returncode == 0, again.stderr
    assert "already up to date (newest tag 2026-11-20)" in again.stdout
    assert queued_tags(state_dir) == ["2026-11-20"]
    # ... once: a third sync queues nothing more, and status has nothing pending.
    assert testlib.run_cli("--config", str(cfg), "sync", env=ENV).returncode == 0
    assert queued_tags(state_dir) == ["2026-11-20"]
    st = testlib.run_cli("--config", str(cfg), "status", env=ENV)
    assert "builds not yet queued" not in st.stdout


def test_tree_cache_that_cannot_be_written_does_not_undo_the_import(
        tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key) -> None:
    state_dir = tmp_path / "state"
    cfg = write_config(tmp_path, http_mirror, gpg_key, state_dir)
    repo = tmp_path / "gentoo.git"
    testlib.build_snapshot(http_mirror.root, D19, key=gpg_key)
    assert testlib.run_cli("--config", str(cfg), "sync", "--date", "20261119", env=ENV).returncode == 0
    cache = repo / "snapshotter" / "tree.cache"
    cache.unlink()
    (cache / "in-the-way").mkdir(parents=True)  # renaming a file over it fails after the refs moved
    testlib.build_snapshot(http_mirror.root, D20, {**testlib.BASE_TREE, "licenses/GPL-2": "GPL\n"}, key=gpg_key)
    proc = testlib.run_cli("--config", str(cfg), "sync", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("2026-11-20 ") and "cannot write the tree cache" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert queued_tags(state_dir) == ["2026-11-19", "2026-11-20"]
    state = json.loads((repo / "snapshotter" / "state.json").read_text())
    assert state["last_tag"] == "2026-11-20" and state["queued_through"] == "2026-11-20"
    assert git_run(repo, "show", "2026-11-20:licenses/GPL-2") == "GPL\n"
    # The next day imports normally (the tree read from git).
    shutil.rmtree(cache)
    testlib.build_snapshot(http_mirror.root, D21, key=gpg_key)
    later = testlib.run_cli("--config", str(cfg), "sync", env={"SNAPSHOTTER_NOW": str(int(NOW.timestamp()) + 86400)})
    assert later.returncode == 0 and later.stdout.startswith("2026-11-21 "), later.stderr
    assert git_run(repo, "ls-tree", "-r", "--name-only", "2026-11-21").count("licenses/GPL-2") == 0


def test_a_date_tag_from_the_future_is_named_not_silent(
        tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key) -> None:
    state_dir = tmp_path / "state"
    cfg = write_config(tmp_path, http_mirror, gpg_key, state_dir)
    repo = tmp_path / "gentoo.git"
    testlib.build_snapshot(http_mirror.root, D19, key=gpg_key)
    assert testlib.run_cli("--config", str(cfg), "sync", "--date", "20261119", env=ENV).returncode == 0
    git_run(repo, "tag", "-a", "-m", "from outside", "2099-01-01", "main")
    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)
    proc = testlib.run_cli("--config", str(cfg), "sync", env=ENV)
    testlib.one_error(proc, "tag 2099-01-01", "in the future", "tag -d 2099-01-01")
    assert git_run(repo, "tag").split() == ["2026-11-19", "2099-01-01"]
    assert queued_tags(state_dir) == ["2026-11-19"]  # nothing is built for it
    st = testlib.run_cli("--config", str(cfg), "status", env=ENV)
    assert "future tags: 2099-01-01" in st.stdout
    assert "last failure" in st.stdout and "in the future" in st.stdout
    # Once it is deleted, the imports go on.
    git_run(repo, "tag", "-d", "2099-01-01")
    ok = testlib.run_cli("--config", str(cfg), "sync", env=ENV)
    assert ok.returncode == 0 and ok.stdout.startswith("2026-11-20 "), ok.stderr
    assert queued_tags(state_dir) == ["2026-11-19", "2026-11-20"]


def test_post_receive_hook_refuses_to_queue_a_date_tag_from_the_future(tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    cfg = make_config(tmp_path, repos.mirror, {"basic": []})
    assert testlib.run_cli("--config", str(cfg), "hooks", "install", str(repos.mirror)).returncode == 0
    repos.date_tag("2099-01-01")
    out = subprocess.run(["git", "push", "origin", "main", "2099-01-01"], cwd=repos.mirror_work,
                         capture_output=True, text=True)
    assert "refs/tags/2099-01-01: a snapshot tag in the future" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert jobs(tmp_path) == []
    # An ordinary date tag in the same push is still queued.
    repos.date_tag("2026-11-20")
    git_run(repos.mirror_work, "push", "origin", "2026-11-20")
    assert [tag for _, tag, _ in jobs(tmp_path)] == ["2026-11-20"]


def test_a_bug_inside_a_cycle_is_recorded_and_the_loop_goes_on(
        tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the import step raises what no code path should (a bug); the cycle returns."""
    state_dir = tmp_path / "state"
    cfg_path = write_config(tmp_path, http_mirror, gpg_key, state_dir)
    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)
    monkeypatch.setenv("SNAPSHOTTER_NOW", ENV["SNAPSHOTTER_NOW"])
    from snapshotter.sync import run as syncrun

    def broken(*args: object, **kw: object) -> None:
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(syncrun, "_import_days", broken)
    result = run_cycle(load(cfg_path))
    assert result.error == "internal error: ZeroDivisionError: injected" and result.needs_retry
    st = testlib.run_cli("--config", str(cfg_path), "status", env=ENV)
    assert "last failure:" in st.stdout and "internal error: ZeroDivisionError: injected" in st.stdout
    monkeypatch.undo()
    monkeypatch.setenv("SNAPSHOTTER_NOW", ENV["SNAPSHOTTER_NOW"])
    result = run_cycle(load(cfg_path))
    assert result.error is None and result.imported == ["2026-11-20"]
