"""`snapshotter sync` / `tags` end to end: the real CLI, real git, real gpg, a real HTTP mirror on 127.0.0.1."""

from __future__ import annotations

import fcntl
import io
import os
import subprocess
import tarfile
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from helpers import testlib

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)  # so "yesterday" is 2026-11-20
D18, D19, D20 = date(2026, 11, 18), date(2026, 11, 19), date(2026, 11, 20)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={repo}", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def refs(repo: Path) -> str:
    if not repo.exists():
        return ""
    return subprocess.run(["git", f"--git-dir={repo}", "for-each-ref"], capture_output=True, text=True).stdout


@dataclass
class Env:
    tmp: Path
    mirror: testlib.HttpMirror
    key: testlib.Key
    repo: Path

    def build(self, day: date, files: dict | None = None, **kw) -> Path:
        kw.setdefault("key", self.key)
        return testlib.build_snapshot(self.mirror.root, day, files, **kw)

    def sync(self, *args: str, now: datetime = NOW, mirrors: list[str] | None = None,
             repo: Path | None = None, keyring: Path | None = None, fingerprint: str | None = None,
             config: str = "", left_behind: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real `snapshotter sync` against this mirror; `config` is extra TOML for the file;
        `left_behind` collects the processes the sync leaves running (testlib.run_cli)."""
        path = self.tmp / f"snapshotter-{abs(hash(config))}.toml"
        # One retry, short backoff: the fault tests stay quick.
        path.write_text(config + "\n[sync]\nretries = 1\ntimeout = 10\n")
        argv = ["--config", str(path), "sync", "--repo", str(repo or self.repo),
                "--keyring", str(keyring or self.key.public),
                "--fingerprint", fingerprint or self.key.fingerprint, "--cache-dir", str(self.tmp / "cache")]
        for m in mirrors or [self.mirror.url]:
            argv += ["--mirror", m]
        return testlib.run_cli(*argv, *args, env={"SNAPSHOTTER_NOW": str(int(now.timestamp()))},
                               left_behind=left_behind)


@pytest.fixture
def env(tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key) -> Env:
    return Env(tmp_path, http_mirror, gpg_key, tmp_path / "gentoo.git")


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode not in (0, None), proc
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("snapshotter: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in errors[0], errors[0]


# --- the happy paths ---------------------------------------------------------------------------

def test_first_import_commit_tag_and_identity(env: Env) -> None:
    env.build(D19)
    env.build(D20)
    proc = env.sync()
    assert proc.returncode == 0, proc.stderr
    # An empty repository gets the newest snapshot only.
    commit = git(env.repo, "rev-parse", "main")
    assert proc.stdout == f"2026-11-20 {commit} {len(testlib.BASE_TREE) + 1}\n"
    assert git(env.repo, "log", "--format=%s", "main") == "Update portage tree to 2026-11-20"
    ts = testlib.snapshot_time(D20)
    assert git(env.repo, "log", "-1", "--format=%at %ct %an <%ae>", "main") == \
        f"{ts} {ts} Portage Snapshotter <snapshotter@localhost>"
    assert git(env.repo, "cat-file", "-t", "2026-11-20") == "tag"
    tag = git(env.repo, "cat-file", "-p", "2026-11-20")
    assert f"object {commit}" in tag and tag.endswith("Tagging 2026-11-20")
    assert f"> {ts} +0000" in tag
    # The tree is the snapshot's content, exec bit kept, top-level directory stripped.
    tree = git(env.repo, "ls-tree", "-r", "main")
    assert "100755 blob" in next(line for line in tree.splitlines() if line.endswith("files/run.sh"))
    assert git(env.repo, "show", "main:metadata/timestamp.x").split()[0] == str(ts)
    assert git(env.repo, "show", "main:profiles/repo_name") == "gentoo"
    tags = testlib.run_cli("tags", "--repo", str(env.repo))
    assert tags.stdout == f"2026-11-20 {commit}\n"
    subprocess.run(["git", f"--git-dir={env.repo}", "fsck", "--strict"], check=True, capture_output=True)


def test_second_day_additions_changes_deletions_modes_symlinks(env: Env) -> None:
    env.build(D19)
    assert env.sync("--date", "20261119").returncode == 0
    files = dict(testlib.BASE_TREE)
    del files["eclass/foo.eclass"]  # deletion
    files["app-misc/hello/hello-1.1.ebuild"] = "EAPI=8\n"  # addition
    files["licenses/MIT"] = "MIT license, changed\n"  # change
    files["sys-apps/tool/files/run.sh"] = "#!/bin/sh\necho run\n"  # exec bit dropped, content same
    files["app-misc/hello/files/README"] = ("exec", "now executable\n")
    files["licenses/MIT-link"] = ("symlink", "MIT")  # symlink
    env.build(D20, files)
    proc = env.sync()
    assert proc.returncode == 0, proc.stderr
    tag, commit, changed = proc.stdout.split()
    assert tag == "2026-11-20" and commit == git(env.repo, "rev-parse", "main")
    # timestamp.x + 6 changes
    assert changed == "7"
    diff = git(env.repo, "diff", "--raw", "2026-11-19", "2026-11-20")
    lines = {line.split("\t")[-1]: line.split("\t")[0].split() for line in diff.splitlines()}
    assert lines["eclass/foo.eclass"][-1] == "D"
    assert lines["app-misc/hello/hello-1.1.ebuild"][-1] == "A"
    assert lines["licenses/MIT"][-1] == "M"
    assert lines["sys-apps/tool/files/run.sh"][:2] == [":100755", "100644"]
    assert lines["app-misc/hello/files/README"][1] == "100755"
    assert lines["licenses/MIT-link"][1] == "120000"
    assert git(env.repo, "cat-file", "-p", "main:licenses/MIT-link") == "MIT"
    assert git(env.repo, "rev-parse", "main^") == git(env.repo, "rev-parse", "2026-11-19^{commit}")


def test_catch_up_three_missing_days_oldest_first_then_up_to_date(env: Env) -> None:
    env.build(date(2026, 11, 17))
    assert env.sync("--date", "20261117").returncode == 0
    for i, d in enumerate((D18, D19, D20)):
        env.build(d, {**testlib.BASE_TREE, f"app-misc/day/day-{i}.ebuild": "EAPI=8\n"})
    proc = env.sync()
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["2026-11-18", "2026-11-19", "2026-11-20"]
    log = git(env.repo, "log", "--format=%s", "main").splitlines()
    assert log == [f"Update portage tree to 2026-11-{d}" for d in (20, 19, 18, 17)]
    before = refs(env.repo)
    again = env.sync()
    assert again.returncode == 0
    assert again.stdout == "already up to date (newest tag 2026-11-20)\n"
    assert refs(env.repo) == before


def test_a_sync_leaves_no_process_behind_and_runs_git_gc_itself(env: Env) -> None:
    """A detached `git gc --auto` (git's default) would outlive the sync's lock, and systemd kills what a
    oneshot unit leaves behind; so the sync repacks in the foreground and exits with nothing left running."""
    env.build(D18)
    left: list[str] = []
    assert env.sync("--date", "20261118", left_behind=left).returncode == 0
    git(env.repo, "config", "fastimport.unpackLimit", "1")  # keep the imports' packs (small: loose by default)
    git(env.repo, "config", "gc.autoPackLimit", "1")  # the second pack makes `git gc --auto` repack
    for d in (D19, D20):
        env.build(d, {**testlib.BASE_TREE, f"app-misc/day/day-{d.day}.ebuild": "EAPI=8\n"})
        proc = env.sync("--date", f"{d:%Y%m%d}", left_behind=left)
        assert proc.returncode == 0, proc.stderr
    assert left == []
    assert len(list((env.repo / "objects" / "pack").glob("*.pack"))) == 1  # the repack did run
    assert git(env.repo, "fsck", "--no-dangling") == ""


def test_catch_up_is_bounded_and_skips_days_not_on_the_mirror(env: Env) -> None:
    env.build(date(2026, 11, 10))
    assert env.sync("--date", "20261110").returncode == 0
    for d in (date(2026, 11, 12), date(2026, 11, 15), D20):  # 11, 13, 14, 16..19 missing
        env.build(d)
    proc = env.sync("--max-catchup-days", "7")
    assert proc.returncode == 0, proc.stderr
    # 7 days back from the 20th starts at the 14th: the 12th is out of reach.
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["2026-11-15", "2026-11-20"]


def test_before_0100_utc_the_newest_possible_day_is_two_days_back(env: Env) -> None:
    env.build(D18)
    assert env.sync("--date", "20261118").returncode == 0
    env.build(D19)
    env.build(D20)
    proc = env.sync(now=datetime(2026, 11, 21, 0, 30, tzinfo=UTC))
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["2026-11-19"]


def test_date_imports_exactly_that_day(env: Env) -> None:
    env.build(D18)
    env.build(D19)
    env.build(D20)
    proc = env.sync("--date", "20261119")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "2026-11-19"
    assert git(env.repo, "tag") == "2026-11-19"


@pytest.mark.parametrize("family,compression", [("gentoo", "bz2"), ("portage", "xz"), ("portage", "bz2")])
def test_name_families_and_compressions(env: Env, family: str, compression: str) -> None:
    env.build(D20, family=family, compression=compression, topdir=f"{family}-odd-top")
    proc = env.sync()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("2026-11-20 ")
    assert f"/snapshots/{family}-20261120.tar.{compression}" in env.mirror.requests
    assert git(env.repo, "show", "main:profiles/repo_name") == "gentoo"


def test_xz_name_is_preferred_over_bz2(env: Env) -> None:
    env.build(D20, compression="bz2", files={**testlib.BASE_TREE, "which": "bz2"})
    env.build(D20, compression="xz", files={**testlib.BASE_TREE, "which": "xz"})
    assert env.sync().returncode == 0
    assert git(env.repo, "show", "main:which") == "xz"


def test_mirror_failover_404_and_down(env: Env, tmp_path: Path) -> None:
    env.build(D20)
    empty = testlib.serve(tmp_path / "empty-mirror")
    down = f"http://127.0.0.1:{_closed_port()}"
    try:
        proc = env.sync("--date", "20261120", mirrors=[down, empty.url, env.mirror.url])
    finally:
        empty.server.shutdown()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("2026-11-20 ")
    assert "/snapshots/gentoo-20261120.tar.xz.md5sum" in empty.requests  # asked, 404, moved on
    assert "connection refused" in proc.stderr


def test_all_mirrors_down_is_an_error(env: Env) -> None:
    proc = env.sync(mirrors=[f"http://127.0.0.1:{_closed_port()}"])
    assert_one_line_error(proc, "no mirror could be reached")


def test_a_partial_download_without_its_mirror_and_validator_is_not_resumed(env: Env) -> None:
    """A `.part` belongs to the URL and the version (ETag/Last-Modified) it came from (recorded next to it;
    resuming is tested in test_download.py): one found without that record is downloaded afresh."""
    tarball = env.build(D20)
    cache = env.tmp / "cache"
    cache.mkdir()
    (cache / (tarball.name + ".part")).write_bytes(tarball.read_bytes()[:100])
    proc = env.sync()
    assert proc.returncode == 0, proc.stderr
    assert env.mirror.ranges() == []
    assert [p.name for p in cache.iterdir()] == [".snapshotter-downloads.lock"]  # nothing else left behind


def test_identical_commit_ids_from_two_fresh_repositories(env: Env) -> None:
    env.build(D19)
    env.build(D20, {**testlib.BASE_TREE, "x/y": "z\n"})
    for repo in (env.tmp / "a.git", env.tmp / "b.git"):
        assert env.sync("--date", "20261119", repo=repo).returncode == 0
        assert env.sync(repo=repo).returncode == 0
    assert refs(env.tmp / "a.git") == refs(env.tmp / "b.git")
    assert len(refs(env.tmp / "a.git").splitlines()) == 3


# --- bad input: non-zero exit, one line, no ref moved ---------------------------------------------

def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], preset: int = 6) -> None:
    with tarfile.open(path, "w:xz", preset=preset) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)


def _info(name: str, type_: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    info.mode = 0o644
    return info


def _hostile(env: Env, extra: list[tuple[tarfile.TarInfo, bytes | None]], day: date = D20) -> None:
    snapdir = env.mirror.root / "snapshots"
    snapdir.mkdir(parents=True, exist_ok=True)
    tarball = snapdir / f"gentoo-{day:%Y%m%d}.tar.xz"
    ts = testlib.timestamp_line(testlib.snapshot_time(day)).encode()
    _tar_with(tarball, [(_info("gentoo/metadata/timestamp.x"), ts), (_info("gentoo/a"), b"a\n"), *extra])
    testlib.write_side_files(tarball, env.key)


HOSTILE = {
    "absolute": ([(_info("/etc/evil"), b"x")], "absolute path"),
    "dotdot": ([(_info("gentoo/../../evil"), b"x")], "contains '..'"),
    "chardev": ([(_info("gentoo/dev/null", tarfile.CHRTYPE), None)], "character device"),
    "blockdev": ([(_info("gentoo/dev/sda", tarfile.BLKTYPE), None)], "block device"),
    "fifo": ([(_info("gentoo/fifo", tarfile.FIFOTYPE), None)], "fifo"),
    "hardlink-outside": ([(_info("gentoo/passwd", tarfile.LNKTYPE, "/etc/passwd"), None)], "hardlink"),
    "hardlink-dotdot": ([(_info("gentoo/passwd", tarfile.LNKTYPE, "gentoo/../../etc/passwd"), None)], ".."),
    "two-top-dirs": ([(_info("other/file"), b"x")], "exactly one top-level directory"),
    "top-level-file": ([(_info("README"), b"x")], "exactly one top-level directory"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_unsafe_members_are_rejected(env: Env, case: str) -> None:
    env.build(D19)
    assert env.sync("--date", "20261119").returncode == 0
    before = refs(env.repo)
    members, words = HOSTILE[case]
    _hostile(env, members)
    proc = env.sync()
    assert_one_line_error(proc, words)
    assert refs(env.repo) == before


def test_hardlink_inside_the_tree_is_fine(env: Env) -> None:
    _hostile(env, [(_info("gentoo/b", tarfile.LNKTYPE, "gentoo/a"), None)])
    proc = env.sync()
    assert proc.returncode == 0, proc.stderr
    assert git(env.repo, "show", "main:b") == "a"


def _tamper(env: Env, day: date, how: str) -> None:
    tarball = env.build(day)
    if how == "md5":
        tarball.with_name(tarball.name + ".md5sum").write_text(f"{'0' * 32}  {tarball.name}\n")
    elif how == "altered":  # content changed after signing, md5 updated to match
        tarball.write_bytes(tarball.read_bytes()[:-64] + b"\0" * 64)
        md5 = subprocess.run(["md5sum", str(tarball)], capture_output=True, text=True).stdout.split()[0]
        tarball.with_name(tarball.name + ".md5sum").write_text(f"{md5}  {tarball.name}\n")
    elif how == "nosig":
        tarball.with_name(tarball.name + ".gpgsig").unlink()
    elif how == "garbage":
        tarball.write_bytes(b"\xfd7zXZ\x00" + os.urandom(4000))
        testlib.write_side_files(tarball, env.key)
    elif how == "not-compressed":
        tarball.write_bytes(b"hello world, not a tarball\n" * 50)
        testlib.write_side_files(tarball, env.key)


@pytest.mark.parametrize("how,words", [
    ("md5", "md5 mismatch"),
    ("altered", "signature verification failed"),
    ("nosig", "no good copy"),
    ("garbage", "xz failed"),
    ("not-compressed", "not an xz or bzip2"),
])
def test_bad_downloads_are_rejected(env: Env, how: str, words: str) -> None:
    env.build(D19)
    assert env.sync("--date", "20261119").returncode == 0
    before = refs(env.repo)
    _tamper(env, D20, how)
    proc = env.sync()
    assert_one_line_error(proc, words)
    assert refs(env.repo) == before


@pytest.mark.parametrize("fault,words", [("html", "HTML page"), ("reset", "no good copy"),
                                         ("short", "no good copy"), ("500", "HTTP 500")])
def test_http_faults_never_reach_a_tag(env: Env, fault: str, words: str) -> None:
    env.build(D20)
    env.mirror.faults["/snapshots/gentoo-20261120.tar.xz"] = fault
    proc = env.sync()
    assert_one_line_error(proc, words)
    assert refs(env.repo) == ""


def test_signature_by_another_key_stops_the_run_without_trying_other_mirrors(
        env: Env, other_key: testlib.Key, tmp_path: Path) -> None:
    env.build(D20, key=other_key)
    good = testlib.serve(tmp_path / "good-mirror")
    try:
        testlib.build_snapshot(good.root, D20, key=env.key)
        # The other key is in the keyring, but it is not pinned.
        keyring = tmp_path / "both.asc"
        keyring.write_bytes(env.key.public.read_bytes() + other_key.public.read_bytes())
        proc = env.sync(mirrors=[env.mirror.url, good.url], keyring=keyring)
    finally:
        good.server.shutdown()
    assert_one_line_error(proc, "signature verification failed", "not a pinned fingerprint")
    assert good.requests == []
    assert refs(env.repo) == ""


def test_signature_by_a_key_not_in_the_keyring(env: Env, other_key: testlib.Key) -> None:
    env.build(D20, key=other_key)
    assert_one_line_error(env.sync(), "signature verification failed", "not in the configured keyring")


def test_expired_key_is_rejected(env: Env, tmp_path: Path) -> None:
    home = tmp_path / "expired"
    home.mkdir(mode=0o700)
    testlib.HOMES.append(home)
    past = ["--faked-system-time", "20200101T000000!"]
    gpg = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*gpg, *past, "--quick-gen-key", "Old <infrastructure@gentoo.org>", "ed25519", "sign", "2d"],
                   check=True, capture_output=True)
    fpr = next(line.split(":")[9] for line in subprocess.run([*gpg, "--with-colons", "-K"], capture_output=True,
               text=True).stdout.splitlines() if line.startswith("fpr:"))
    public = tmp_path / "expired.asc"
    public.write_bytes(subprocess.run([*gpg, "--armor", "--export", fpr], capture_output=True).stdout)
    tarball = testlib.build_snapshot(env.mirror.root, D20, key=None)
    subprocess.run([*gpg, *past, "--armor", "--detach-sign", "-u", fpr, "-o", str(tarball) + ".gpgsig",
                    str(tarball)], check=True, capture_output=True)
    assert_one_line_error(env.sync(keyring=public, fingerprint=fpr), "expired key")
    assert refs(env.repo) == ""


def test_revoked_key_is_rejected(env: Env, tmp_path: Path) -> None:
    key = testlib.make_key(tmp_path / "revoked")
    tarball = env.build(D20, key=key)
    assert tarball.exists()
    rev = (key.home / "openpgp-revocs.d" / f"{key.fingerprint}.rev").read_text()
    rev = rev.replace(":-----BEGIN PGP PUBLIC KEY BLOCK-----", "-----BEGIN PGP PUBLIC KEY BLOCK-----")
    subprocess.run(["gpg", "--homedir", str(key.home), "--batch", "--import"], input=rev.encode(), check=True,
                   capture_output=True)
    public = tmp_path / "revoked.asc"
    public.write_bytes(subprocess.run(["gpg", "--homedir", str(key.home), "--armor", "--export", key.fingerprint],
                                      capture_output=True, check=True).stdout)
    assert_one_line_error(env.sync(keyring=public, fingerprint=key.fingerprint), "revoked key")
    assert refs(env.repo) == ""


@pytest.mark.parametrize("timestamp,words", [
    (b"", "no metadata/timestamp.x"),
    (b"yesterday\n", "does not start with a unix time"),
    (b"-5 x\n", "does not start with a unix time"),
    (str(testlib.snapshot_time(D20) + 3 * 86400).encode() + b" later\n", "outside the window"),
    (str(testlib.snapshot_time(D20) - 2 * 86400).encode() + b" earlier\n", "outside the window"),
])
def test_bad_timestamps_are_rejected(env: Env, timestamp: bytes, words: str) -> None:
    if timestamp:
        env.build(D20, {**testlib.BASE_TREE, "metadata/timestamp.x": timestamp})
    else:  # build_snapshot always adds a timestamp.x: write this one by hand
        _hostile_without_timestamp(env)
    proc = env.sync()
    assert_one_line_error(proc, words)
    assert refs(env.repo) == ""


def _hostile_without_timestamp(env: Env) -> None:
    snapdir = env.mirror.root / "snapshots"
    snapdir.mkdir(parents=True, exist_ok=True)
    tarball = snapdir / "gentoo-20261120.tar.xz"
    _tar_with(tarball, [(_info("gentoo/profiles/repo_name"), b"gentoo\n")])
    testlib.write_side_files(tarball, env.key)


def test_older_or_equal_snapshot_is_refused(env: Env) -> None:
    env.build(D19)
    env.build(D20)
    assert env.sync().returncode == 0
    before = refs(env.repo)
    for day in ("20261119", "20261120"):
        proc = env.sync("--date", day)
        assert_one_line_error(proc, "not newer than the newest tag 2026-11-20")
    assert refs(env.repo) == before


def test_snapshot_whose_timestamp_is_older_than_the_newest_tag_is_refused(env: Env) -> None:
    env.build(D20)
    assert env.sync().returncode == 0
    before = refs(env.repo)
    # Named for the 21st, but carrying the 20th's timestamp: its tag would be 2026-11-20 again. The
    # window is the tag rule, so it is refused there, before it could meet the newest tag.
    day21 = date(2026, 11, 21)
    env.build(day21, timestamp=testlib.snapshot_time(D20) + 3600 * 22)
    proc = env.sync(now=NOW + timedelta(days=1))
    assert_one_line_error(proc, "outside the window", "would be 2026-11-20, not 2026-11-21")
    assert refs(env.repo) == before


def test_missing_keyring_file_is_a_clear_error(env: Env) -> None:
    env.build(D20)
    proc = env.sync(keyring=env.tmp / "nope.asc")
    assert_one_line_error(proc, "sync.keyring[0]", "not found")


def test_bad_date_option_is_a_usage_error(env: Env) -> None:
    proc = env.sync("--date", "2026-11-20")
    assert proc.returncode == 2 and "YYYYMMDD" in proc.stderr


def test_bad_fingerprint_option(env: Env) -> None:
    proc = testlib.run_cli("sync", "--repo", str(env.repo), "--fingerprint", "abc")
    assert proc.returncode == 2 and "sync.fingerprints[0]" in proc.stderr


# --- locking, push, crash safety ----------------------------------------------------------------

def test_second_sync_exits_75_while_the_lock_is_held(env: Env) -> None:
    env.build(D20)
    env.repo.mkdir()
    fd = os.open(env.repo / "snapshotter.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = env.sync()
    finally:
        os.close(fd)
    assert proc.returncode == 75
    assert_one_line_error(proc, "locked by another process")
    assert env.sync().returncode == 0  # the lock is gone with its holder


def test_push_to_a_second_bare_repo_and_to_an_unreachable_one(env: Env, tmp_path: Path) -> None:
    remote = tmp_path / "public.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    push = f'[git]\npush = ["{remote}", "{tmp_path / "missing" / "gone.git"}"]\n'
    env.build(D19)
    proc = env.sync(config=push)
    assert proc.returncode == 3, proc.stderr
    assert "push to" in proc.stderr and "gone.git failed" in proc.stderr
    # The import is kept locally and the reachable remote got main and the tag.
    assert git(env.repo, "rev-parse", "main") == git(remote, "rev-parse", "main")
    assert git(remote, "tag") == "2026-11-19"
    # The unreachable remote stays pending: once it exists, the next run (with nothing new) pushes it.
    gone = tmp_path / "missing" / "gone.git"
    subprocess.run(["git", "init", "-q", "--bare", str(gone)], check=True)
    proc = env.sync(config=push)
    assert proc.returncode == 0, proc.stderr
    assert git(gone, "rev-parse", "main") == git(env.repo, "rev-parse", "main")
    assert git(gone, "tag") == "2026-11-19"


def test_no_push_flag_keeps_everything_local(env: Env, tmp_path: Path) -> None:
    remote = tmp_path / "public.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    env.build(D20)
    proc = env.sync("--no-push", config=f'[git]\npush = ["{remote}"]\n')
    assert proc.returncode == 0, proc.stderr
    assert git(remote, "tag") == ""


def test_kill_9_during_import_leaves_a_sound_repository(env: Env) -> None:
    env.build(D19)
    assert env.sync("--date", "20261119").returncode == 0
    before = refs(env.repo)
    # A snapshot big enough that the import takes a while (written with tarfile: no files on disk).
    ts = testlib.timestamp_line(testlib.snapshot_time(D20)).encode()
    many = [(_info(f"gentoo/cat-{i % 97}/pkg-{i % 3001}/pkg-{i}.ebuild"), b"EAPI=8\n# %d\n" % i * 8)
            for i in range(80000)]
    snapdir = env.mirror.root / "snapshots"
    tarball = snapdir / "gentoo-20261120.tar.xz"
    _tar_with(tarball, [(_info("gentoo/metadata/timestamp.x"), ts), *many], preset=1)
    testlib.write_side_files(tarball, env.key)
    argv = ["snapshotter", "sync", "--repo", str(env.repo), "--keyring", str(env.key.public),
            "--fingerprint", env.key.fingerprint, "--mirror", env.mirror.url, "--cache-dir",
            str(env.tmp / "cache")]
    proc = subprocess.Popen(argv, env={**os.environ, "SNAPSHOTTER_NOW": str(int(NOW.timestamp()))},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Wait until git fast-import runs under it, then kill -9 the snapshotter mid-import.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _has_child(proc.pid, b"fast-import"):
        time.sleep(0.02)
    assert _has_child(proc.pid, b"fast-import"), "the import never started"
    time.sleep(0.2)
    assert proc.poll() is None, "the import finished before it could be killed: make the snapshot bigger"
    proc.kill()
    proc.wait()
    time.sleep(0.5)  # let the orphaned children notice the closed pipes
    assert refs(env.repo) == before  # nothing moved
    fsck = subprocess.run(["git", f"--git-dir={env.repo}", "fsck", "--strict"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr
    again = env.sync()
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("2026-11-20 ")
    assert git(env.repo, "ls-tree", "-r", "main", "--name-only").count("\n") + 1 == len(many) + 1
    fsck = subprocess.run(["git", f"--git-dir={env.repo}", "fsck", "--strict"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr


def _has_child(pid: int, needle: bytes) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and needle in cmdline:
            return True
    return False


def _closed_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
