"""`snapshotter publish`: reproducible, signed, atomic webrsync snapshots from a mirror built by the real
`snapshotter sync` (real git, gpg, tar, xz, HTTP on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
import threading
import time
from datetime import date
from pathlib import Path

import pytest
from helpers import testlib
from helpers.gitobjects import bare_repo_from, blob, commit_tag, raw_tree
from helpers.publishlib import DAYS, build_synced, expected_listing, run_publish, tag_of, tree_listing

from snapshotter import tarformat
from snapshotter.git.export import export_tree
from snapshotter.lock import flocked
from snapshotter.publish import snapshots as pub

# sha256 of the tar stream in test_tar_stream_is_pinned (tar format version 1)
PINNED_SIZE, PINNED_SHA256 = 61440, "90352a7eb696d712edc341b34879e2d861494b13a78bd34464f08c46255dc9bb"


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory, gpg_key: testlib.Key) -> Path:
    return build_synced(tmp_path_factory, gpg_key)


def snapdir_listing(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "snapshots").iterdir()) if p.is_file()}


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "r:xz") as tf:
        return tf.getmembers()


def test_publish_all_content_headers_and_side_files(synced: Path, gpg_key: testlib.Key, tmp_path: Path) -> None:
    out = tmp_path / "www"
    r = run_publish(synced, out, gpg_key, "--all")
    assert r.returncode == 0, r.stderr
    snap = out / "snapshots"
    names = sorted(p.name for p in snap.iterdir())
    expected = []
    for stem in ["gentoo-20260110", "gentoo-20260111", "gentoo-20260112", "gentoo-latest"]:
        expected += [f"{stem}.tar.xz", f"{stem}.tar.xz.gpgsig", f"{stem}.tar.xz.md5sum"]
    assert names == expected  # no temporary files left behind either
    assert (snap / "gentoo-latest.tar.xz").read_bytes() == (snap / "gentoo-20260112.tar.xz").read_bytes()
    for day in DAYS:
        name = pub.snapshot_name(day)
        tarball = snap / name
        data = tarball.read_bytes()
        assert (snap / f"{name}.md5sum").read_text() == f"{hashlib.md5(data).hexdigest()}  {name}\n"
        testlib.gpg(gpg_key, "--verify", str(snap / f"{name}.gpgsig"), str(tarball))
        commit_time = int(subprocess.run(["git", f"--git-dir={synced}", "log", "-1", "--format=%ct",
                                          tag_of(day)], capture_output=True, text=True, check=True).stdout)
        members = tar_members(tarball)
        top = f"gentoo-{day:%Y%m%d}"
        assert members[0].name == top and members[0].isdir()
        assert all(m.name == top or m.name.startswith(top + "/") for m in members)
        assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(250, 250, "portage", "portage")}
        assert {m.mtime for m in members} == {commit_time}
        files = [m.name for m in members if not m.isdir()]
        assert len(files) == len(set(files))
        # Extract with GNU tar (what emerge-webrsync uses) and compare with the tag's own tree.
        extracted, exported = tmp_path / f"x-{day}", tmp_path / f"e-{day}"
        extracted.mkdir()
        subprocess.run(["tar", "--strip-components=1", "-C", str(extracted), "-xJf", str(tarball)], check=True)
        export_tree(synced, tag_of(day), exported)
        assert tree_listing(extracted) == tree_listing(exported)
        assert (extracted / "metadata/timestamp.x").read_text() == testlib.timestamp_line(testlib.snapshot_time(day))
        assert tree_listing(extracted) == expected_listing(DAYS[day], day)


def test_reproducible_bytes_any_thread_count(synced: Path, gpg_key: testlib.Key, tmp_path: Path) -> None:
    """Same tag -> byte-identical .tar.xz: another run, another output dir, other xz thread counts."""
    outs = []
    for i, threads in enumerate(["1", "2", "3"]):
        out = tmp_path / f"www{i}"
        r = run_publish(synced, out, gpg_key, "2026-01-11", "--xz-threads", threads)
        assert r.returncode == 0, r.stderr
        outs.append((out / "snapshots/gentoo-20260111.tar.xz").read_bytes())
    # --force publishes the same tag again in place: still the same bytes.
    r = run_publish(synced, tmp_path / "www0", gpg_key, "2026-01-11", "--force")
    assert r.returncode == 0, r.stderr
    outs.append((tmp_path / "www0/snapshots/gentoo-20260111.tar.xz").read_bytes())
    assert len(set(outs)) == 1
    # Another level gives other bytes (the comparison above can fail).
    r = run_publish(synced, tmp_path / "www9", gpg_key, "2026-01-11", "--xz-level", "1")
    assert (tmp_path / "www9/snapshots/gentoo-20260111.tar.xz").read_bytes() != outs[0]


def test_default_newest_skip_keep_and_latest(synced: Path, gpg_key: testlib.Key, tmp_path: Path) -> None:
    out = tmp_path / "www"
    r = run_publish(synced, out, gpg_key)
    assert r.returncode == 0, r.stderr
    assert sorted(pub.published_days(out / "snapshots")) == [date(2026, 1, 12)]
    r = run_publish(synced, out, gpg_key)
    assert r.returncode == 0 and "already published 2026-01-12" in r.stdout
    # An older day published explicitly does not move latest.
    r = run_publish(synced, out, gpg_key, "2026-01-10", "2026-01-11")
    assert r.returncode == 0, r.stderr
    snap = out / "snapshots"
    assert pub.latest_day(snap) == date(2026, 1, 12)
    assert "latest 2026-01-12" in r.stdout
    # --keep 1 prunes the two older days (tarballs and side files), never latest's.
    r = run_publish(synced, out, gpg_key, "--keep", "1")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in snap.iterdir()) == sorted(
        f"{stem}.tar.xz{s}" for stem in ("gentoo-20260112", "gentoo-latest") for s in ("", ".md5sum", ".gpgsig"))
    assert "pruned gentoo-20260110.tar.xz" in r.stdout


def test_keep_never_prunes_latest(synced: Path, gpg_key: testlib.Key, tmp_path: Path) -> None:
    snap = tmp_path / "www/snapshots"
    opts = pub.PublishOptions(out=tmp_path / "www", signing_key=gpg_key.fingerprint, gnupghome=gpg_key.home,
                              xz_level=1)
    pub.publish(synced, opts, ["2026-01-10", "2026-01-11"])
    assert pub.latest_day(snap) == date(2026, 1, 11)
    # A newer day appears without latest moving (e.g. copied in by hand): pruning to 1 keeps latest's day.
    pub.publish(synced, pub.PublishOptions(out=tmp_path / "other", signing_key=gpg_key.fingerprint,
                                           gnupghome=gpg_key.home, xz_level=1), ["2026-01-12"])
    for s in ("", ".md5sum", ".gpgsig"):
        (snap / f"gentoo-20260112.tar.xz{s}").write_bytes((tmp_path / f"other/snapshots/gentoo-20260112.tar.xz{s}").read_bytes())
    removed = pub.prune(snap, 1)
    assert removed == ["gentoo-20260110.tar.xz", "gentoo-20260110.tar.xz.md5sum", "gentoo-20260110.tar.xz.gpgsig"]
    assert pub.published_days(snap) == [date(2026, 1, 11), date(2026, 1, 12)]


def test_errors_are_one_line_and_leave_nothing(synced: Path, gpg_key: testlib.Key, other_key: testlib.Key,
                                               tmp_path: Path) -> None:
    out = tmp_path / "www"
    assert run_publish(synced, out, gpg_key, "2026-01-10").returncode == 0
    before = snapdir_listing(out)
    cases = [
        (["2026-01-09"], "no tag 2026-01-09"),
        (["20260110"], "not a snapshot tag"),
        (["--all", "2026-01-10"], "tags or --all"),
        (["--repo", str(tmp_path / "nope"), "2026-01-11"], "not a snapshot repository"),
    ]
    for args, msg in cases:
        r = run_publish(synced, out, gpg_key, *args)
        assert r.returncode == 1, (args, r.stdout)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("snapshotter: error: ") and msg in r.stderr
    # Signing fails (a key whose secret is not in that GNUPGHOME; a bad fingerprint): nothing new appears.
    for key_args, msg in (([ "--signing-key", other_key.fingerprint], "no secret key"),
                          (["--signing-key", "1234"], "40-hex-digit")):
        r = testlib.run_cli("publish", "--repo", str(synced), "--out", str(out), "--gnupghome", str(gpg_key.home),
                            *key_args, "2026-01-11")
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr
    assert snapdir_listing(out) == before


def test_failed_signing_after_compression_leaves_nothing(synced: Path, gpg_key: testlib.Key,
                                                         tmp_path: Path) -> None:
    """The key is there but gpg refuses to sign with it (expired) after the tarball is compressed."""
    home = tmp_path / "gnupg"
    key = testlib.make_key(home)
    out = tmp_path / "www"
    opts = pub.PublishOptions(out=out, signing_key=key.fingerprint, gnupghome=home, xz_level=1)
    pub.publish(synced, opts, ["2026-01-10"])
    before = snapdir_listing(out)
    # Let the key expire: gpg refuses to sign, after the tarball has been written.
    testlib.gpg(key, "--quick-set-expire", key.fingerprint, "seconds=1")
    time.sleep(2)
    with pytest.raises(pub.SnapshotterError, match="signing gentoo-20260111.tar.xz with .* failed: the key is expired"):
        pub.publish(synced, opts, ["2026-01-11"])
    assert snapdir_listing(out) == before
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == sorted(before)


def test_publish_during_sync_reads_a_consistent_tag(synced: Path, gpg_key: testlib.Key, tmp_path: Path,
                                                    http_mirror: testlib.HttpMirror) -> None:
    """While the real sync imports a new day (holding the repository lock), publish keeps working on the
    tags that exist and never sees a half-imported one; the new day publishes once the sync is done."""
    repo = tmp_path / "gentoo.git"
    subprocess.run(["git", "clone", "-q", "--mirror", str(synced), str(repo)], check=True)
    new_day = date(2026, 1, 13)
    big = {**DAYS[date(2026, 1, 12)], **{f"big/f{i:05d}": f"{i}\n" * 50 for i in range(4000)}}
    DAYS[new_day] = big
    try:
        testlib.build_snapshot(http_mirror.root, new_day, big, key=gpg_key)
        env = {"SNAPSHOTTER_NOW": str(testlib.snapshot_time(new_day) + 3600)}
        out = tmp_path / "www"
        sync_proc = subprocess.Popen(
            ["snapshotter", "sync", "--repo", str(repo), "--mirror", http_mirror.url, "--keyring", str(gpg_key.public),
             "--fingerprint", gpg_key.fingerprint, "--date", "20260113", "--no-push",
             "--cache-dir", str(tmp_path / "cache")], env={**os.environ, **env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results = []
        while sync_proc.poll() is None:
            r = run_publish(repo, out, gpg_key, "--xz-level", "0")
            results.append(r)
            assert r.returncode == 0, r.stderr
        assert sync_proc.returncode == 0, sync_proc.stderr.read()  # type: ignore[union-attr]
        r = run_publish(repo, out, gpg_key, "--xz-level", "0")
        assert r.returncode == 0, r.stderr
        assert results, "the sync finished before publish could run"
        for day in pub.published_days(out / "snapshots"):
            extracted = tmp_path / f"x-{day}"
            extracted.mkdir()
            subprocess.run(["tar", "--strip-components=1", "-C", str(extracted), "-xJf",
                            str(out / "snapshots" / pub.snapshot_name(day))], check=True)
            assert tree_listing(extracted) == expected_listing(DAYS[day], day)
        assert date(2026, 1, 13) in pub.published_days(out / "snapshots")
    finally:
        DAYS.pop(new_day)


def test_publish_waits_for_out_lock(synced: Path, gpg_key: testlib.Key, tmp_path: Path) -> None:
    """Two publishers on one output directory: the second exits 75 at once, or waits with --wait."""
    out = tmp_path / "www"
    out.mkdir()
    release = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with flocked(out / pub.LOCK_NAME, "test"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    try:
        r = run_publish(synced, out, gpg_key, "--xz-level", "0")
        assert r.returncode == 75 and "locked" in r.stderr
        threading.Timer(1.0, release.set).start()
        r = run_publish(synced, out, gpg_key, "--xz-level", "0", "--wait", "20")
        assert r.returncode == 0, r.stderr
    finally:
        release.set()
        t.join()
    assert pub.published_days(out / "snapshots") == [date(2026, 1, 12)]


def test_tar_writer_long_names_roundtrip(tmp_path: Path) -> None:
    """ustar prefix split and pax headers for names/link targets GNU tar must read back exactly."""
    chunks: list[bytes] = []
    w = pub.TarWriter(chunks.append, 1700000000)
    names = ["top", "top/" + "d" * 150 + "/" + "f" * 99, "top/" + "g" * 230, "top/ü-ñ"]
    w.add_dir("top")
    for n in names[1:]:
        w.begin_file(n, 3, executable=n.endswith("ñ"))
        w.data(b"abc")
        w.end_file(3)
    w.add_symlink("top/l", (("x" * 90 + "/") * 2 + "t").encode())
    w.close()
    data = b"".join(chunks)
    assert len(data) % tarformat.RECORD == 0
    (tmp_path / "t.tar").write_bytes(data)
    listing = subprocess.run(["tar", "-tvf", str(tmp_path / "t.tar")], capture_output=True, text=True,
                             check=True, env={**os.environ, "LC_ALL": "C.UTF-8"}).stdout.splitlines()
    assert [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing] == \
        ["top/", *names[1:], "top/l"]
    subprocess.run(["tar", "-C", str(tmp_path), "-xf", str(tmp_path / "t.tar")], check=True)
    assert (tmp_path / names[2]).read_bytes() == b"abc"
    assert os.readlink(tmp_path / "top/l") == ("x" * 90 + "/") * 2 + "t"
    assert (tmp_path / "top/ü-ñ").stat().st_mode & 0o777 == 0o755


def test_config_file_and_flag_override(synced: Path, gpg_key: testlib.Key, tmp_path: Path) -> None:
    cfg = tmp_path / "snapshotter.toml"
    cfg.write_text(f'repo = "{synced}"\n[publish]\nout = "www"\nsigning_key = "{gpg_key.fingerprint.lower()}"\n'
                   f'gnupghome = "{gpg_key.home}"\nkeep = 1\nxz_level = 0\nxz_threads = 2\n')
    r = testlib.run_cli("--config", str(cfg), "publish", "--all")
    assert r.returncode == 0, r.stderr
    # keep = 1: --all only compresses the day that survives pruning.
    assert pub.published_days(tmp_path / "www/snapshots") == [date(2026, 1, 12)]
    assert r.stdout.count("published ") == 1
    r = testlib.run_cli("--config", str(cfg), "publish", "--out", str(tmp_path / "flag"), "--keep", "0", "--all")
    assert r.returncode == 0, r.stderr
    assert len(pub.published_days(tmp_path / "flag/snapshots")) == 3
    cfg.write_text(cfg.read_text().replace(gpg_key.fingerprint.lower(), "not-a-key"))
    r = testlib.run_cli("--config", str(cfg), "publish")
    assert r.returncode == 1 and "publish.signing_key: expected a 40-hex-digit" in r.stderr
    assert r.stderr.count("\n") == 1


def test_unsafe_tree_is_not_published(tmp_path: Path, gpg_key: testlib.Key) -> None:
    """A tag whose tree holds a symlink out of the tree (crafted import) fails cleanly, leaving nothing."""
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    files = [("100644", f"f{i:04d}", blob(repo, f"{i}\n".encode())) for i in range(50)]
    tree = raw_tree(repo, [("120000", "a", blob(repo, b"../../etc/shadow")), *files])
    commit_tag(repo, tree, "2026-01-01")
    out = tmp_path / "www"
    r = run_publish(repo, out, gpg_key, timeout=60)
    assert r.returncode == 1 and "points outside the tree" in r.stderr
    assert [p.name for p in (out / "snapshots").iterdir()] == []


def test_tar_stream_is_pinned(tmp_path: Path) -> None:
    """The uncompressed tar of a fixed tree and commit time is pinned: any change to the format (order,
    headers, padding) changes every published tarball, so it must be deliberate (update this hash and
    say so in docs/publish.md)."""
    repo = bare_repo_from(tmp_path, {**DAYS[date(2026, 1, 10)], "metadata/timestamp.x": "1767228300 x\n"})
    commit = subprocess.run(["git", f"--git-dir={repo}", "rev-parse", "2026-01-01^{commit}"], check=True,
                            capture_output=True, text=True).stdout.strip()
    h = hashlib.sha256()
    size = pub.write_tar(repo, commit, 1767228300, "gentoo-20260101", h.update)
    assert (size, h.hexdigest()) == (PINNED_SIZE, PINNED_SHA256)


def test_kill_9_mid_publish_leaves_nothing_visible(tmp_path: Path, gpg_key: testlib.Key) -> None:
    """SIGKILL while the tarball is being compressed: clients see nothing new; the next run cleans up."""
    repo = bare_repo_from(tmp_path, {"metadata/timestamp.x": "1767228300 x\n", "big.bin": os.urandom(16 << 20)})
    out = tmp_path / "www"
    snap = out / "snapshots"
    cmd = ["snapshotter", "publish", "--repo", str(repo), "--out", str(out), "--signing-key", gpg_key.fingerprint,
           "--gnupghome", str(gpg_key.home), "--xz-level", "9", "--xz-threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (snap.is_dir() and any(".tmp." in p.name for p in snap.iterdir())):
        assert time.monotonic() < deadline and proc.poll() is None, "publish finished before it could be killed"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    time.sleep(0.5)
    assert [p.name for p in snap.iterdir() if not p.name.startswith(".")] == []
    r = subprocess.run(cmd[:-4] + ["--xz-level", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in snap.iterdir()) == sorted(
        f"gentoo-{stem}.tar.xz{s}" for stem in ("20260101", "latest") for s in ("", ".md5sum", ".gpgsig"))


def _tree_bytes(repo: Path, entries: list[tuple[bytes, bytes, str]]) -> str:
    """A tree written byte for byte: (mode, name, oid), names that need not be UTF-8."""
    body = b"".join(mode + b" " + name + b"\0" + bytes.fromhex(oid) for mode, name, oid in entries)
    return subprocess.run(["git", f"--git-dir={repo}", "hash-object", "-t", "tree", "-w", "--literally", "--stdin"],
                          input=body, check=True, capture_output=True).stdout.decode().strip()


def test_publish_all_skips_tags_it_cannot_publish(tmp_path: Path, gpg_key: testlib.Key) -> None:
    """Tags an older version imported before the importer refused such trees (a symlink out of the tree, a
    name that is not UTF-8) do not block the later days: --all skips each with a warning naming it,
    publishes the rest, points gentoo-latest at the newest published day and exits 1 with a summary; a
    publish of the bad tag alone fails with one line and writes nothing."""
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    good = blob(repo, b"ok\n")
    for day, extra in [("2026-01-01", []),
                       ("2026-01-02", [(b"120000", b"esc", blob(repo, b"../etc/passwd"))]),
                       ("2026-01-03", [(b"100644", b"caf\xe9", good)]),
                       ("2026-01-04", [])]:
        commit_tag(repo, _tree_bytes(repo, sorted([(b"100644", b"file", blob(repo, day.encode())), *extra],
                                                  key=lambda e: e[1])), day)
    out = tmp_path / "www"
    r = run_publish(repo, out, gpg_key, "--all", "--xz-level", "0")
    line = testlib.one_error(r, "published 2, skipped 2: 2026-01-02 (symlink 'esc' points outside the tree",
                             "; 2026-01-03 (path in tree is not UTF-8")
    warnings = [x for x in r.stderr.splitlines() if "skipping" in x]
    assert warnings == ["skipping 2026-01-02: cannot publish it: symlink 'esc' points outside the tree: "
                        "'../etc/passwd'", "skipping 2026-01-03: cannot publish it: path in tree is not UTF-8: "
                        "b'caf\\xe9'"], r.stderr
    assert "\n" not in line
    assert pub.published_days(out / "snapshots") == [date(2026, 1, 1), date(2026, 1, 4)]
    assert "latest 2026-01-04" in r.stdout and r.stdout.count("published ") == 2, r.stdout
    snap = out / "snapshots"
    assert (snap / "gentoo-latest.tar.xz").read_bytes() == (snap / "gentoo-20260104.tar.xz").read_bytes()
    assert not [p for p in snap.iterdir() if "20260102" in p.name or "20260103" in p.name]
    listing = sorted(p.name for p in snap.iterdir())
    # Again: nothing new; the bad tags are still named (they stay unpublished), the good ones are not redone.
    r = run_publish(repo, out, gpg_key, "--all", "--xz-level", "0")
    testlib.one_error(r, "published 0, skipped 2: 2026-01-02")
    assert sorted(p.name for p in snap.iterdir()) == listing
    for day, why in [("2026-01-02", "cannot publish 2026-01-02: symlink 'esc' points outside the tree"),
                     ("2026-01-03", "cannot publish 2026-01-03: path in tree is not UTF-8")]:
        r = run_publish(repo, out, gpg_key, day, "--xz-level", "0")
        testlib.one_error(r, why)
        assert sorted(p.name for p in snap.iterdir()) == listing
