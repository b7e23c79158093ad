"""Build workers for real: real processes, kill -9, leases, the real chroot builder.

Most tests use a tiny stand-in stage (bash, a few coreutils and their libraries, and an `emerge`
script that sleeps for the seconds named in the tree's BUILD_SECONDS and writes one package;
tests/helpers/tinystage.py), so they take seconds. The last one goes hook -> queue -> worker -> a real build with real Portage in
the stand-in Gentoo stage of tests/stage.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ebuild_repo, stage, testlib
from helpers.servicelib import git_run, make_config
from helpers.tinystage import make_mirror, tiny_stage

from snapshotter.service.jobqueue import Job, JobState, SqliteQueue, queue_path
from snapshotter.service.worker import BuildChildResult, BuildChildSpec


@pytest.fixture(scope="module")
def stand_in_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_stage(tmp_path_factory.mktemp("stage") / "tiny-stage.tar.xz")


def setup_env(tmp_path: Path, stage: Path, tags: dict[str, dict[str, str]]) -> Path:
    bare = make_mirror(tmp_path, tags)
    return make_config(tmp_path, bare, {"tiny": []}, stage=stage, extra=(
        f'[build]\nwork_dir = "{tmp_path / "work"}"\noutput = "{tmp_path / "out"}"\n'
        f'cache_dir = "{tmp_path / "cache"}"\n'))


def queue(tmp_path: Path) -> SqliteQueue:
    return SqliteQueue(queue_path(tmp_path / "state"))


def test_build_child_payloads_round_trip():
    """What crosses to the build child and back: one to_json/from_json pair each, strict on reading."""
    spec = BuildChildSpec(Path("/etc/snapshotter.toml"), "basic", "2026-11-20", {"ov": "a" * 40}, 7)
    assert BuildChildSpec.from_json(spec.to_json()) == spec
    default = BuildChildSpec(None, "basic", "2026-11-20", {}, 8)
    assert BuildChildSpec.from_json(default.to_json()) == default
    for res in (BuildChildResult(False, "no tag 2026-11-25"),
                BuildChildResult(True, "ok", "/out/basic/2026-11-20/build.log", "/out/basic/2026-11-20")):
        assert BuildChildResult.from_json(res.to_json()) == res
    for bad in ("[]", '{"ok": true}', '{"ok": "yes", "detail": "x", "log": null, "output": null}'):
        with pytest.raises(ValueError):
            BuildChildResult.from_json(bad)
    with pytest.raises(ValueError):
        BuildChildSpec.from_json('{"config": null, "profile": "basic", "tag": 1, "overlays": {}, "job": 1}')


def start_worker(cfg: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["snapshotter", "--config", str(cfg), "worker", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def procs_with_cmdline(argv: list[str], under: Path) -> list[int]:
    """Processes running `argv` chrooted somewhere below `under` (our build roots only)."""
    want = ("\0".join(argv) + "\0").encode()
    prefix = str(under.resolve()) + "/"
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes() == want and os.readlink(p / "root").startswith(prefix):
                    found.append(int(p.name))
            except OSError:
                pass
    return found


def wait_for(cond, timeout: float, what: str) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_once_builds_a_job_and_records_failures_for_retry(tmp_path: Path, stand_in_stage: Path):
    cfg = setup_env(tmp_path, stand_in_stage, {
        "2026-11-19": {"BUILD_SECONDS": "0", "VERSION": "v19\n"},
        "2026-11-20": {"BUILD_SECONDS": "0", "VERSION": "v20\n", "FAIL": "yes\n"},
    })
    q = queue(tmp_path)
    ok_id, _ = q.enqueue(Job("tiny", "2026-11-19"))
    bad_id, _ = q.enqueue(Job("tiny", "2026-11-20"))
    proc = testlib.run_cli("--config", str(cfg), "worker", "--once")
    assert proc.returncode == 0, proc.stderr
    rec = q.get(ok_id)
    assert rec.state == JobState.DONE and rec.attempts == 1
    assert (tmp_path / "out/tiny/2026-11-19.1/packages/app-misc/fake/fake-1.gpkg.tar").read_text() == "v19\n"
    assert rec.log_path == str(tmp_path / "out/tiny/2026-11-19.1/build.log")
    assert "stand-in emerge --emptytree @world" in Path(rec.log_path).read_text()
    assert q.get(bad_id).state == JobState.QUEUED  # --once: one job only
    proc = testlib.run_cli("--config", str(cfg), "worker", "--once")
    assert proc.returncode == 4, proc.stderr
    rec = q.get(bad_id)
    assert rec.state == JobState.FAILED and "build failed" in rec.detail
    assert "fails on purpose" in Path(rec.log_path).read_text()
    out = testlib.run_cli("--config", str(cfg), "status")
    assert f"failed  job {bad_id}: tiny at 2026-11-20" in out.stdout and f"queue retry {bad_id}" in out.stdout
    out = testlib.run_cli("--config", str(cfg), "queue", "retry", str(bad_id))
    assert out.returncode == 0 and q.get(bad_id).state == JobState.QUEUED
    out = testlib.run_cli("--config", str(cfg), "queue", "retry", str(ok_id))
    assert out.returncode == 1 and "only failed jobs can be retried" in out.stderr
    out = testlib.run_cli("--config", str(cfg), "worker", "--once")  # still failing: recorded again
    assert out.returncode == 4 and q.get(bad_id).attempts == 2


def test_a_setup_error_fails_the_job_with_its_reason(tmp_path: Path, stand_in_stage: Path):
    cfg = setup_env(tmp_path, stand_in_stage, {"2026-11-19": {"BUILD_SECONDS": "0", "VERSION": "v\n"}})
    q = queue(tmp_path)
    jid, _ = q.enqueue(Job("tiny", "2026-11-25"))  # no such tag in the mirror
    proc = testlib.run_cli("--config", str(cfg), "worker", "--once")
    assert proc.returncode == 4
    rec = q.get(jid)
    assert rec.state == JobState.FAILED and "no tag 2026-11-25" in rec.detail and Path(rec.log_path).exists()


@pytest.mark.slow
def test_worker_killed_mid_job_is_taken_over_after_the_lease_and_never_runs_twice(tmp_path: Path,
                                                                                 stand_in_stage: Path):
    cfg = setup_env(tmp_path, stand_in_stage, {"2026-11-19": {"BUILD_SECONDS": "3.7", "VERSION": "v19\n"}})
    q = queue(tmp_path)
    jid, _ = q.enqueue(Job("tiny", "2026-11-19"))
    assert q.enqueue(Job("tiny", "2026-11-19")) == (jid, False)  # duplicate enqueue: one job
    a = start_worker(cfg, "--lease", "2", "--poll", "0.2")
    try:
        wait_for(lambda: procs_with_cmdline(["sleep", "3.7"], tmp_path), 30, "the build to start")
        rec = q.get(jid)
        assert rec.state == "running" and rec.worker.endswith(f":{a.pid}")
        a.send_signal(signal.SIGKILL)
        a.wait()
        # The kernel takes the whole build tree down with the worker (PID namespace + PDEATHSIG).
        wait_for(lambda: not procs_with_cmdline(["sleep", "3.7"], tmp_path), 5, "the orphaned build to die")
        assert q.get(jid).state == "running"  # ... but the queue only learns it from the lease
        assert testlib.run_cli("--config", str(cfg), "worker", "--once").stdout == ""
        assert q.get(jid).state == "running"  # lease not yet expired: nobody else takes it
        wait_for(lambda: q.get(jid).lease_until < time.time(), 5, "the lease to expire")
        b = testlib.run_cli("--config", str(cfg), "worker", "--once", "--lease", "2")
        assert b.returncode == 0, b.stderr
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    rec = q.get(jid)
    assert rec.state == JobState.DONE and rec.attempts == 2 and not rec.worker.endswith(f":{a.pid}")
    assert "lease of worker" in b.stderr and "taking it over" in b.stderr
    # The killed attempt keeps its build directory (incomplete: no build.json); the new one is a new build.
    assert not (tmp_path / "out/tiny/2026-11-19.1/build.json").exists()
    assert (tmp_path / "out/tiny/2026-11-19.2/packages/app-misc/fake/fake-1.gpkg.tar").read_text() == "v19\n"
    assert not list((tmp_path / "work" / "tiny").iterdir())  # the killed build's root was cleaned up


@pytest.mark.slow
def test_sigterm_kills_the_build_and_hands_the_job_back(tmp_path: Path, stand_in_stage: Path):
    cfg = setup_env(tmp_path, stand_in_stage, {
        "2026-11-20": {"BUILD_SECONDS": "60", "VERSION": "b\n"},
    })
    q = queue(tmp_path)
    slow, _ = q.enqueue(Job("tiny", "2026-11-20"))
    w1 = start_worker(cfg, "--poll", "0.2")
    try:
        wait_for(lambda: procs_with_cmdline(["sleep", "60"], tmp_path), 30, "the slow build to start")
        t0 = time.monotonic()
        w1.send_signal(signal.SIGTERM)
        out, _ = w1.communicate(timeout=20)
        print(f"worker stop on SIGTERM during a build: {time.monotonic() - t0:.2f} s")
        assert w1.returncode == 0, out
        assert "handed back to the queue" in out and "Traceback" not in out
        assert q.get(slow).state == JobState.QUEUED  # no need to wait for the lease
        wait_for(lambda: not procs_with_cmdline(["sleep", "60"], tmp_path), 5, "the build to be killed")
        # The builder got SIGTERM first and cleaned up its root before exiting.
        assert not [p for p in (tmp_path / "work" / "tiny").iterdir() if p.is_dir()]
    finally:
        if w1.poll() is None:
            w1.kill()
            w1.wait()


@pytest.mark.slow
def test_two_workers_share_the_queue_and_each_job_runs_once(tmp_path: Path, stand_in_stage: Path):
    bare = make_mirror(tmp_path, {"2026-11-19": {"BUILD_SECONDS": "0.3", "VERSION": "a\n"},
                                  "2026-11-20": {"BUILD_SECONDS": "0.3", "VERSION": "b\n"}})
    cfg = make_config(tmp_path, bare, {"one": [], "two": []}, stage=stand_in_stage, extra=(
        f'[build]\nwork_dir = "{tmp_path / "work"}"\noutput = "{tmp_path / "out"}"\n'
        f'cache_dir = "{tmp_path / "cache"}"\n'))
    q = queue(tmp_path)
    for _ in range(2):  # every job queued twice
        for profile in ("one", "two"):
            for tag in ("2026-11-19", "2026-11-20"):
                q.enqueue(Job(profile, tag))
    assert len(q.list()) == 4
    workers = [start_worker(cfg, "--poll", "0.2") for _ in range(2)]
    try:
        wait_for(lambda: q.counts()[JobState.DONE] == 4, 120, "all jobs to finish")
    finally:
        outputs = []
        for w in workers:
            w.send_signal(signal.SIGTERM)
            outputs.append(w.communicate(timeout=30)[0])
    assert all(w.returncode == 0 for w in workers), outputs
    finished = [line for out in outputs for line in out.splitlines() if ": done in " in line]
    assert len(finished) == 4  # four builds in all, whichever worker ran them
    assert all(out.count(": done in ") >= 1 for out in outputs), "both workers took jobs"
    assert {r.attempts for r in q.list()} <= {1, 2}  # 2 only if a job had to wait for its profile's lock
    for profile in ("one", "two"):
        for tag, version in (("2026-11-19", "a\n"), ("2026-11-20", "b\n")):
            pkg = tmp_path / "out" / profile / f"{tag}.1" / "packages/app-misc/fake/fake-1.gpkg.tar"
            assert pkg.read_text() == version


@pytest.mark.slow
@pytest.mark.portage
def test_hook_to_queue_to_worker_to_a_real_portage_build(tmp_path: Path):
    stage_file = stage.ensure_stage()
    bare = tmp_path / "gentoo.git"
    ebuild_repo.git_repo_with_tags(bare, [("2026-11-19", ebuild_repo.tree_files())])
    cfg = make_config(tmp_path, bare, {}, stage=stage_file, extra=(
        f'[build]\nwork_dir = "{tmp_path / "work"}"\noutput = "{tmp_path / "out"}"\n'
        f'cache_dir = "{tmp_path / "cache"}"\n'))
    cfg.write_text(cfg.read_text() + f'[profiles.real]\nstage = "{stage_file}"\nportage_profile = "default"\n'
                   'world = ["app-misc/hello"]\n')
    assert testlib.run_cli("--config", str(cfg), "hooks", "install", str(bare)).returncode == 0
    work = tmp_path / "clone"
    git_run(tmp_path, "clone", "-q", str(bare), str(work))
    for p in work.glob("app-misc/hello/*.ebuild"):
        p.unlink()
    testlib.write_tree(work, {k: v for k, v in ebuild_repo.tree_files(hello="1.1").items() if "hello" in k})
    git_run(work, "add", "-A")
    git_run(work, "commit", "-q", "-m", "Update portage tree to 2026-11-20")
    git_run(work, "tag", "-a", "-m", "2026-11-20", "2026-11-20")
    t0 = time.monotonic()
    out = git_run(work, "push", "origin", "main", "2026-11-20")
    print(f"push with hook: {time.monotonic() - t0:.2f} s")
    assert "queued build 1: real at 2026-11-20" in out
    t0 = time.monotonic()
    proc = testlib.run_cli("--config", str(cfg), "worker", "--once", timeout=600)
    print(f"worker --once real build: {time.monotonic() - t0:.1f} s")
    rec = queue(tmp_path).get(1)
    assert proc.returncode == 0, (proc.stderr, rec.detail, Path(rec.log_path).read_text()[-3000:])
    assert rec.state == JobState.DONE
    pkgs = tmp_path / "out/real/2026-11-20.1/packages"
    assert list(pkgs.glob("app-misc/hello/hello-1.1*")), sorted(str(p) for p in pkgs.rglob("*"))
    assert list(pkgs.glob("dev-libs/libfoo/libfoo-1.0*"))
    assert (pkgs / "Packages").is_file()
