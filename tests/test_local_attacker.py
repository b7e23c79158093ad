"""Local attackers (docs/security.md): whoever can push to the repository (git needs write access to its
top directory) or write to state_dir or a work directory may plant symlinks, hard links and fifos where
the tools create or truncate files. Each case plants one at a file the tools create or open for writing
and checks that a victim file outside the tool's directories is unchanged and nothing appears next to
it: the repository, publish, build-profile and overlay locks, state.json, the tree cache, the worker's
job logs, the build work directory, the post-receive hook and the SQLite queue."""

from __future__ import annotations

import io
import lzma
import marshal
import os
import shutil
import subprocess
import tarfile
import time
from datetime import date
from pathlib import Path

import pytest
from helpers import testlib
from helpers.gitobjects import bare_repo_from
from helpers.publishlib import run_publish
from helpers.servicelib import make_config
from helpers.testlib import snapshot_time, timestamp_line

from snapshotter.errors import SnapshotterError
from snapshotter.fsutil import check_private_dir
from snapshotter.git.repository import Repository
from snapshotter.lock import flocked
from snapshotter.publish.snapshots import LOCK_NAME
from snapshotter.service.jobqueue import Job, QueueError, SqliteQueue, queue_path
from snapshotter.sync import importer, state

VICTIM_TEXT = b"root:x:0:0:the victim must stay exactly like this\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    v = d / "passwd"
    v.write_bytes(VICTIM_TEXT)
    return v


def untouched(victim: Path) -> None:
    assert victim.read_bytes() == VICTIM_TEXT
    assert sorted(p.name for p in victim.parent.iterdir()) == ["passwd"], "something was created outside"


def lock_paths(tmp_path: Path) -> dict[str, Path]:
    return {"repository": Repository(tmp_path / "repo.git").lock_path, "publish": tmp_path / "www" / LOCK_NAME,
            "build profile": tmp_path / "work" / "tiny.lock", "overlay": tmp_path / "cache/overlays/ov.lock"}


@pytest.mark.parametrize("which", ["repository", "publish", "build profile", "overlay"])
def test_a_symlink_planted_at_a_lock_is_refused(tmp_path: Path, victim: Path, which: str) -> None:
    lock = lock_paths(tmp_path)[which]
    lock.parent.mkdir(parents=True)
    lock.symlink_to(victim)
    with pytest.raises(SnapshotterError, match="is a symlink; refusing to follow it"), flocked(lock, which):
        pass
    untouched(victim)
    dangling = lock_paths(tmp_path)[which].with_name("other.lock")
    dangling.symlink_to(victim.parent / "created")  # O_CREAT through a dangling link would create it
    with pytest.raises(SnapshotterError), flocked(dangling, which):
        pass
    untouched(victim)


def test_a_hard_link_or_fifo_at_a_lock_is_never_written(tmp_path: Path, victim: Path) -> None:
    lock = tmp_path / "repo.lock"
    os.link(victim, lock)  # same owner (root can link anything): our PID must not go into it
    with flocked(lock, "test"):
        pass
    untouched(victim)
    fifo = tmp_path / "fifo.lock"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(SnapshotterError, match="not a regular file"), flocked(fifo, "test"):
        pass
    assert time.monotonic() - start < 30  # did not block on the fifo (a generous bound, not a timing claim)
    mine = tmp_path / "mine.lock"
    with flocked(mine, "test"):
        assert mine.read_text() == f"{os.getpid()}\n"


def test_sync_with_a_planted_repository_lock_fails_in_one_line(tmp_path: Path, victim: Path) -> None:
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    Repository(repo).lock_path.symlink_to(victim)
    r = testlib.run_cli("sync", "--repo", str(repo), "--mirror", "http://127.0.0.1:9/", timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("snapshotter: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "symlink" in r.stderr
    untouched(victim)


def _tarball(where: Path, day: date, files: dict[str, str]) -> Path:
    buf = io.BytesIO()
    ts = snapshot_time(day)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, text in {**files, "metadata/timestamp.x": timestamp_line(ts)}.items():
            info = tarfile.TarInfo(f"gentoo/{name}")
            info.size, info.mtime = len(text.encode()), ts
            tf.addfile(info, io.BytesIO(text.encode()))
    out = where / f"gentoo-{day:%Y%m%d}.tar.xz"
    out.write_bytes(lzma.compress(buf.getvalue()))
    return out


IDENTITY = importer.Identity("Attacker Test", "attacker@localhost")


def test_state_dir_replaced_by_a_symlink(tmp_path: Path, victim: Path) -> None:
    """A pusher replaces the repository's snapshotter/ with a link to another directory: the import is kept
    (the tree cache is only a cache), state.json is refused in one line, nothing lands in the victim dir."""
    repo = Repository(tmp_path / "repo.git")
    repo.create()
    elsewhere = tmp_path / "elsewhere"  # someone else's directory, holding a file named like the cache
    elsewhere.mkdir()
    (elsewhere / "tree.cache").write_bytes(VICTIM_TEXT)
    repo.state_dir.symlink_to(elsewhere, target_is_directory=True)
    result = importer.import_tarball(repo, _tarball(tmp_path, date(2026, 11, 1), {"a": "a\n"}), IDENTITY,
                                     file_day=date(2026, 11, 1))
    assert result.tag == "2026-11-01"
    assert [p.name for p in elsewhere.iterdir()] == ["tree.cache"]  # neither replaced nor removed
    assert (elsewhere / "tree.cache").read_bytes() == VICTIM_TEXT
    repo.state_dir.unlink()
    repo.state_dir.symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(SnapshotterError, match="is a symlink or not a directory; refusing to write through it"):
        state.save(repo, state.SyncState(last_tag="2026-11-01"))
    untouched(victim)


def test_a_planted_tree_cache_is_not_trusted(tmp_path: Path) -> None:
    """A cache someone else wrote (not ours, or group/other writable) would decide what the next commit
    keeps and deletes: it is ignored, and the commit is the one a cold import gives."""
    day1, day2 = date(2026, 11, 1), date(2026, 11, 2)
    t1 = _tarball(tmp_path, day1, {"a": "a\n", "b": "b\n"})
    (tmp_path / "2").mkdir()
    t2 = _tarball(tmp_path / "2", day2, {"a": "a\n", "c": "c\n"})
    commits = []
    for name, plant in (("clean", None), ("foreign", 65534), ("writable", -1)):
        repo = Repository(tmp_path / f"{name}.git")
        importer.import_tarball(repo, t1, IDENTITY, file_day=day1)
        if plant is not None:  # a lying cache: head's commit with an empty tree (nothing would be deleted)
            cache = repo.state_dir / "tree.cache"
            cache.unlink()
            cache.write_bytes(marshal.dumps((repo.head(), {})))
            if plant > 0:
                os.chown(cache, plant, plant)
            else:
                cache.chmod(0o666)
        commits.append(importer.import_tarball(repo, t2, IDENTITY, file_day=day2).commit)
        listing = subprocess.run(["git", f"--git-dir={repo.path}", "ls-tree", "--name-only", "main"],
                                 capture_output=True, text=True, check=True).stdout.split()
        assert listing == ["a", "c", "metadata"], name
    assert len(set(commits)) == 1


def _worker_setup(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    repo = tmp_path / "gentoo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    cfg = make_config(tmp_path, repo, {"tiny": []})
    SqliteQueue(queue_path(tmp_path / "state")).enqueue(Job("tiny", "2026-11-19"))
    return cfg, dict(os.environ, SNAPSHOTTER_TEST_BUILD_COMMAND="echo built")


def test_worker_job_log_never_written_through_a_symlink(tmp_path: Path, victim: Path) -> None:
    cfg, env = _worker_setup(tmp_path)
    logs = tmp_path / "state" / "worker-logs"
    logs.mkdir(parents=True)
    (logs / "job-1-1.log").symlink_to(victim)
    (logs / "job-1-1.result.json").symlink_to(victim.parent / "result.json")
    r = testlib.run_cli("--config", str(cfg), "worker", "--once", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    untouched(victim)
    log = logs / "job-1-1.log"
    assert not log.is_symlink() and log.read_text() == "built\n"


def test_worker_log_directory_replaced_by_a_symlink(tmp_path: Path, victim: Path) -> None:
    cfg, env = _worker_setup(tmp_path)
    (tmp_path / "state" / "worker-logs").symlink_to(victim.parent, target_is_directory=True)
    r = testlib.run_cli("--config", str(cfg), "worker", "--once", env=env, timeout=120)
    assert r.returncode == 4, r.stderr  # the job failed cleanly, saying why
    assert "refusing to write through it" in r.stderr + r.stdout
    untouched(victim)


def test_work_directory_someone_else_made_is_refused(tmp_path: Path) -> None:
    """The build work directory defaults to /var/tmp/snapshotter/builds: if another user made a directory
    on that way first, they could swap what a build creates inside it for symlinks."""
    sticky = tmp_path / "vartmp"
    sticky.mkdir(mode=0o1777)
    sticky.chmod(0o1777)
    theirs = sticky / "snapshotter"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    (theirs / "builds").mkdir()
    with pytest.raises(SnapshotterError, match="belongs to uid 65534"):
        check_private_dir(theirs / "builds")
    os.chown(theirs, 0, 0)
    theirs.chmod(0o777)
    with pytest.raises(SnapshotterError, match="writable by others"):
        check_private_dir(theirs / "builds")
    theirs.chmod(0o755)
    check_private_dir(theirs / "builds")  # ours all the way up to a sticky directory: fine


def test_hooks_directory_replaced_by_a_symlink(tmp_path: Path, victim: Path) -> None:
    """`hooks install` as root into a repository whose hooks/ a pusher replaced with a link: refused."""
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    shutil.rmtree(repo / "hooks")
    (repo / "hooks").symlink_to(victim.parent, target_is_directory=True)
    (victim.parent / "post-receive").symlink_to(victim)  # --force would replace what is there
    r = testlib.run_cli("hooks", "install", str(repo), "--force", timeout=60)
    assert r.returncode == 1 and "refusing to write through it" in r.stderr, r.stderr
    assert victim.read_bytes() == VICTIM_TEXT
    assert sorted(p.name for p in victim.parent.iterdir()) == ["passwd", "post-receive"]


@pytest.mark.parametrize("name", ["queue.sqlite", "queue.sqlite-wal", "queue.sqlite-shm"])
def test_sqlite_queue_files_planted_as_symlinks(tmp_path: Path, victim: Path, name: str) -> None:
    """Hook users can write state_dir: SQLite would create or write through a link at the database or
    its -wal/-shm names."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / name).symlink_to(victim)
    with pytest.raises(QueueError, match="is a symlink or not a regular file"):
        SqliteQueue(queue_path(state_dir)).enqueue(Job("tiny", "2026-11-19"))
    untouched(victim)


@pytest.mark.parametrize("plant", ["lock", "snapshots"])
def test_publish_into_a_directory_with_planted_links(tmp_path: Path, victim: Path, gpg_key: testlib.Key,
                                                     plant: str) -> None:
    """publish.out may be writable by a web content group: a link at the publish lock, or a snapshots/
    replaced with a link to another directory, is one error line and nothing is written there."""
    repo = bare_repo_from(tmp_path, {"metadata/timestamp.x": timestamp_line(snapshot_time(date(2026, 1, 1)))})
    out = tmp_path / "www"
    out.mkdir()
    if plant == "lock":
        (out / LOCK_NAME).symlink_to(victim)
    else:
        (out / "snapshots").symlink_to(victim.parent, target_is_directory=True)
    r = run_publish(repo, out, gpg_key, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("snapshotter: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert ("lock file" if plant == "lock" else "refusing to write through it") in r.stderr, r.stderr
    untouched(victim)


def test_work_directory_behind_a_link_to_someone_elses_directory(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    (theirs / "builds").mkdir()
    link = tmp_path / "work"
    link.symlink_to(theirs / "builds", target_is_directory=True)  # our link, their directory above
    with pytest.raises(SnapshotterError, match="belongs to uid 65534"):
        check_private_dir(link)
