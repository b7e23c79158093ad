"""The pre-receive and post-receive hooks for real: `snapshotter hooks install`, then `git push` into the
bare repositories."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from helpers import testlib
from helpers.servicelib import GIT_ENV, git_run, jobs, make_config, make_repos

from snapshotter.service import hooks
from snapshotter.service.jobqueue import queue_path


@pytest.fixture
def setup(tmp_path: Path):
    repos = make_repos(tmp_path)
    cfg = make_config(tmp_path, repos.mirror, {
        "basic": [],
        "desktop": [{"name": "myov", "url": str(repos.overlay), "ref": "main"}],
        "server": [{"name": "myov", "url": f"file://{repos.overlay}", "ref": "stable"}],
    })
    for bare in (repos.mirror, repos.overlay):
        out = testlib.run_cli("--config", str(cfg), "hooks", "install", str(bare))
        assert out.returncode == 0, out.stderr
    return repos, cfg


def wait_for_jobs(root: Path, n: int, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if len(jobs(root)) >= n:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"expected {n} jobs, have {jobs(root)}")


def test_installed_hook_bakes_in_quoted_paths(setup, tmp_path: Path):
    repos, cfg = setup
    hook = repos.mirror / "hooks" / "post-receive"
    text = hook.read_text()
    assert os.access(hook, os.X_OK) and hooks.MARKER in text
    assert f"CONFIG_FILE={cfg}" in text and "SNAPSHOTTER=/" in text
    # The file in the source tree is the same template with the defaults.
    assert (testlib.REPO_ROOT / "hooks" / "post-receive").read_text() == hooks.render("snapshotter", None)
    pre = repos.mirror / "hooks" / "pre-receive"
    assert os.access(pre, os.X_OK) and hooks.PRE_MARKER in pre.read_text() and f"CONFIG_FILE={cfg}" in pre.read_text()
    assert "hooks check" in pre.read_text()
    assert (testlib.REPO_ROOT / "hooks" / "pre-receive").read_text() == hooks.render("snapshotter", None, "pre-receive")
    # A path with a quote and a space stays one word for sh.
    weird = tmp_path / "it's a config.toml"
    weird.write_text(cfg.read_text())
    hooks.install(repos.overlay, "/bin/echo", weird)
    out = subprocess.run([str(repos.overlay / "hooks" / "post-receive")], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    assert out.stdout == f"--config {weird} hooks enqueue\n"


def test_install_refuses_foreign_hook_and_non_bare_repo(setup, tmp_path: Path):
    repos, cfg = setup
    foreign = repos.overlay / "hooks" / "post-receive"
    foreign.write_text("#!/bin/sh\necho mine\n")
    out = testlib.run_cli("--config", str(cfg), "hooks", "install", str(repos.overlay))
    assert out.returncode == 1 and "was not installed by snapshotter" in out.stderr
    assert foreign.read_text() == "#!/bin/sh\necho mine\n"
    out = testlib.run_cli("--config", str(cfg), "hooks", "install", str(repos.overlay), "--force")
    assert out.returncode == 0 and hooks.MARKER in foreign.read_text()
    out = testlib.run_cli("--config", str(cfg), "hooks", "install", str(repos.mirror_work))
    assert out.returncode == 1 and "not a bare git repository" in out.stderr
    assert "Traceback" not in out.stderr


def test_push_of_a_new_date_tag_queues_every_profile(setup, tmp_path: Path):
    """(How long the push takes with its hook: benchmarks/bench_service.py.)"""
    repos, _ = setup
    repos.date_tag("2026-11-20")
    out = git_run(repos.mirror_work, "push", "origin", "main", "2026-11-20")
    wait_for_jobs(tmp_path, 3)
    assert sorted(jobs(tmp_path)) == [("basic", "2026-11-20", ()), ("desktop", "2026-11-20", ()),
                                      ("server", "2026-11-20", ())]
    assert "queued build" in out  # the pusher sees what was queued ("remote: ...")
    # The same tag pushed again does not queue the builds twice. (Pushing an unchanged ref is "Everything
    # up-to-date" and runs no hook: the tag is deleted on the server and pushed anew, so the hook runs.)
    git_run(repos.mirror_work, "push", "origin", ":refs/tags/2026-11-20")
    out = git_run(repos.mirror_work, "push", "origin", "2026-11-20")
    assert "[new tag]" in out and out.count("already queued") == 3, out
    assert len(jobs(tmp_path)) == 3
    # A branch push and a non-date tag on the mirror queue nothing.
    repos.commit(repos.mirror_work, "x", "y")
    git_run(repos.mirror_work, "tag", "release-1")
    git_run(repos.mirror_work, "push", "origin", "main", "release-1")
    assert len(jobs(tmp_path)) == 3


def test_overlay_push_pins_the_overlay_for_profiles_using_it(setup, tmp_path: Path):
    """(How long the push takes with its hook: benchmarks/bench_service.py.)"""
    repos, _ = setup
    commit = repos.commit(repos.overlay_work, "NEWS", "1\n")
    git_run(repos.overlay_work, "push", "origin", "main")
    # desktop follows main; server follows "stable" (no build for a push to main)
    assert jobs(tmp_path) == [("desktop", "2026-11-19", (("myov", commit),))]
    # A push to the branch server follows; then a tag (an annotated tag is peeled to its commit).
    c2 = repos.commit(repos.overlay_work, "NEWS", "2\n")
    git_run(repos.overlay_work, "push", "origin", "main:stable")
    git_run(repos.overlay_work, "tag", "-a", "-m", "v1", "v1")
    git_run(repos.overlay_work, "push", "origin", "v1")
    assert jobs(tmp_path)[1:] == [("server", "2026-11-19", (("myov", c2),)),
                                  ("desktop", "2026-11-19", (("myov", c2),))]
    # The tree is the mirror's newest tag at the time of the push.
    repos.date_tag("2026-11-21")
    git_run(repos.mirror_work, "push", "origin", "main", "2026-11-21")
    c3 = repos.commit(repos.overlay_work, "NEWS", "3\n")
    git_run(repos.overlay_work, "push", "origin", "main")
    assert jobs(tmp_path)[-1] == ("desktop", "2026-11-21", (("myov", c3),))


@pytest.mark.parametrize("ref", ["refs/heads/x$(touch${IFS}PWNED)", "refs/tags/a;touch${IFS}PWNED",
                                 "refs/heads/`touch${IFS}PWNED`", "refs/heads/-rf"])
def test_hostile_ref_names_are_rejected_without_running_anything(setup, tmp_path: Path, ref: str):
    repos, _ = setup
    repos.commit(repos.overlay_work, "NEWS", "x\n")
    proc = subprocess.run(["git", "push", "origin", f"HEAD:{ref}"], cwd=repos.overlay_work, capture_output=True,
                          text=True, env={**os.environ, **GIT_ENV})
    assert proc.returncode == 0, proc.stderr  # post-receive cannot refuse; it only declines to act
    assert "rejected ref name" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert jobs(tmp_path) == []
    assert not list(tmp_path.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))


def test_enqueue_checks_every_input_line(setup, tmp_path: Path):
    repos, cfg = setup
    good_old = "0" * 40
    head = git_run(repos.overlay, "rev-parse", "main").strip()
    lines = [f"{good_old} {head} refs/heads/main", f"{good_old} {head} refs/heads/../../etc",
             f"{good_old} $(id) refs/heads/main", "garbage", f"{good_old} {head} refs/notes/x",
             f"{head} {good_old} refs/heads/main"]  # the last one is a deletion
    env = dict(os.environ, GIT_DIR=str(repos.overlay))
    proc = subprocess.run(["snapshotter", "--config", str(cfg), "hooks", "enqueue"], input="\n".join(lines),
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert proc.stderr.count("rejected ref name") == 2 and "not an object id" in proc.stderr
    assert "expected '<old> <new> <ref>'" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("snapshotter: error: 4 pushed ref(s) rejected")
    assert jobs(tmp_path) == [("desktop", "2026-11-19", (("myov", head),))]


def test_queue_database_is_shared_by_hook_and_cli(setup, tmp_path: Path):
    repos, cfg = setup
    repos.date_tag("2026-11-20")
    git_run(repos.mirror_work, "push", "origin", "main", "2026-11-20")
    out = testlib.run_cli("--config", str(cfg), "queue")
    assert out.returncode == 0 and out.stdout.count("queued ") == 3 and "desktop at 2026-11-20" in out.stdout
    with sqlite3.connect(queue_path(tmp_path / "state")) as db:
        sources = {s for (s,) in db.execute("SELECT source FROM jobs")}
    assert sources == {f"push:{repos.mirror.resolve()}"}


def push(work: Path, *refs: str, now: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_ENV, SNAPSHOTTER_NOW=now)  # the hooks inherit it: the clock they judge "future" by
    return subprocess.run(["git", "push", "origin", *refs], cwd=work, capture_output=True, text=True, env=env)


# 2026-11-21 12:00 UTC: the newest snapshot that can exist is 2026-11-20; a tag up to 2026-11-21 passes.
NOW = "1795262400"


def test_pre_receive_refuses_a_date_tag_from_the_future(setup, tmp_path: Path):
    """A date tag after the newest possible snapshot (plus a day) never reaches the snapshot repository:
    the whole push is refused before any ref moves, with one line to the pusher; nothing is queued. Other
    refs, the same tag in an overlay, and deleting such a tag pass; `status` names one that got in anyway."""
    repos, cfg = setup
    before = git_run(repos.mirror, "show-ref")
    repos.date_tag("2026-11-22")
    out = push(repos.mirror_work, "main", "2026-11-22", now=NOW)
    assert out.returncode != 0 and "pre-receive hook declined" in out.stderr, out.stderr
    errors = [x.rstrip() for x in out.stderr.splitlines() if "snapshotter: error:" in x]  # git pads remote lines
    assert errors == ["remote: snapshotter: error: refs/tags/2026-11-22: a snapshot tag in the future (the newest "
                      "snapshot that can exist is 2026-11-20); refused: a sync never makes one, and it would stop "
                      "every import"], out.stderr
    assert "Traceback" not in out.stderr
    assert git_run(repos.mirror, "show-ref") == before  # main did not move either
    assert jobs(tmp_path) == []
    # The newest day that may exist, and main alone, pass (and post-receive queues the tag's builds).
    git_run(repos.mirror_work, "tag", "-d", "2026-11-22")
    repos.date_tag("2026-11-21")
    out = push(repos.mirror_work, "main", "2026-11-21", now=NOW)
    assert out.returncode == 0, out.stderr
    assert "2026-11-21" in git_run(repos.mirror, "tag").split()
    assert {tag for _, tag, _ in jobs(tmp_path)} == {"2026-11-21"}
    # Overlays are not snapshot repositories: their tags are their own.
    git_run(repos.overlay_work, "tag", "2099-01-01")
    assert push(repos.overlay_work, "2099-01-01", now=NOW).returncode == 0
    # One that got in without the hook (created in place) is named by status; deleting it by a push passes.
    git_run(repos.mirror, "tag", "2099-01-01", "main")
    st = testlib.run_cli("--config", str(cfg), "status", env={"SNAPSHOTTER_NOW": NOW})
    assert "future tags: 2099-01-01" in st.stdout, st.stdout + st.stderr
    out = push(repos.mirror_work, ":refs/tags/2099-01-01", now=NOW)
    assert out.returncode == 0, out.stderr
    assert "2099-01-01" not in git_run(repos.mirror, "tag").split()


def check(cfg: Path, repo: Path, lines: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["snapshotter", "--config", str(cfg), "hooks", "check", "--repo", str(repo)], input=lines,
                          capture_output=True, text=True, env={**os.environ, "SNAPSHOTTER_NOW": NOW}, timeout=60)


def test_hooks_check_reads_lines_like_git(setup, tmp_path: Path):
    """`hooks check` itself: the snapshot repository's future tags refused (all named in one line),
    garbage and other refs left to post-receive."""
    repos, cfg = setup
    zero, oid = "0" * 40, "1" * 40
    lines = (f"{zero} {oid} refs/tags/2099-01-01\n{zero} {oid} refs/heads/main\n{zero} {oid} refs/tags/2099-02-01\n"
             "garbage\n")
    testlib.one_error(check(cfg, repos.mirror, lines), "refs/tags/2099-01-01, refs/tags/2099-02-01: a snapshot tag in the future")
    fine = f"{zero} {oid} refs/tags/2026-11-21\n{oid} {zero} refs/tags/2099-01-01\ngarbage\n"
    out = check(cfg, repos.mirror, fine)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    out = check(cfg, repos.overlay, lines)
    assert out.returncode == 0, out.stderr
