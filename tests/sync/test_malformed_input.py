"""Malformed input and durable state (issue 12, points 8, 10 and 12): a crafted timestamp.x or tar header,
a full disk, a corrupt state.json, a snapshot whose time disagrees with its name, a signature from the
future. Each is one `snapshotter: error:` line (or a warning and a rebuild), nothing is tagged, and the
next run is not stuck. Real CLI, git, gpg, xz and an HTTP mirror on 127.0.0.1; the full disk is a small
tmpfs mounted under the test's directory (root only)."""

from __future__ import annotations

import io
import json
import lzma
import os
import subprocess
import tarfile
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from helpers import testlib

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)  # the newest possible snapshot is 2026-11-20
D19, D20 = date(2026, 11, 19), date(2026, 11, 20)


def sync(tmp: Path, mirror: testlib.HttpMirror, key: testlib.Key, *args: str, repo: Path | None = None,
         now: datetime = NOW) -> subprocess.CompletedProcess[str]:
    cfg = tmp / "snapshotter.toml"
    cfg.write_text(f'state_dir = "{tmp / "state"}"\n[sync]\nretries = 0\ntimeout = 10\n')
    return testlib.run_cli("--config", str(cfg), "sync", "--repo", str(repo or tmp / "gentoo.git"),
                           "--keyring", str(key.public), "--fingerprint", key.fingerprint,
                           "--mirror", mirror.url, "--cache-dir", str(tmp / "cache"), *args,
                           env={"SNAPSHOTTER_NOW": str(int(now.timestamp()))})




def refs(repo: Path) -> str:
    if not repo.exists():
        return ""
    return subprocess.run(["git", f"--git-dir={repo}", "for-each-ref"], capture_output=True, text=True,
                          check=True).stdout


def crafted_snapshot(mirror: testlib.HttpMirror, key: testlib.Key, day: date,
                     members: list[tuple[str, bytes]], patch: dict[int, tuple[int, bytes]] | None = None) -> Path:
    """gentoo-DAY.tar.xz from `members` (name, content), with header fields overwritten byte for byte:
    `patch[i] = (offset in the header, bytes)` for member i; the checksum is recomputed, so only the field
    is wrong."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    offset = 0
    headers = []
    for _, data in members:
        headers.append(offset)
        offset += 512 + (len(data) + 511) // 512 * 512
    for i, (field, value) in (patch or {}).items():
        h = headers[i]
        raw[h + field:h + field + len(value)] = value
        raw[h + 148:h + 156] = b" " * 8
        raw[h + 148:h + 156] = b"%06o\0 " % sum(raw[h:h + 512])
    snapdir = mirror.root / "snapshots"
    snapdir.mkdir(parents=True, exist_ok=True)
    tarball = snapdir / f"gentoo-{day:%Y%m%d}.tar.xz"
    tarball.write_bytes(lzma.compress(bytes(raw), format=lzma.FORMAT_XZ))
    testlib.write_side_files(tarball, key)
    return tarball


def stamp(day: date) -> bytes:
    return testlib.timestamp_line(testlib.snapshot_time(day)).encode()


# --- point 8: every malformed field is one line ---------------------------------------------------

@pytest.mark.parametrize("value", [b"999999999999", b"99999999999", b"0"])
def test_timestamp_out_of_range_is_one_line(tmp_path: Path, http_mirror: testlib.HttpMirror,
                                            gpg_key: testlib.Key, value: bytes) -> None:
    testlib.build_snapshot(http_mirror.root, D20, {**testlib.BASE_TREE, "metadata/timestamp.x": value + b" x\n"},
                           key=gpg_key)
    line = testlib.one_error(sync(tmp_path, http_mirror, gpg_key), "timestamp.x")
    assert ("out of range" in line) == (value == b"999999999999"), line
    assert refs(tmp_path / "gentoo.git") == ""


def test_bad_mode_field_is_one_line(tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key) -> None:
    crafted_snapshot(http_mirror, gpg_key, D20, [("gentoo/metadata/timestamp.x", stamp(D20)), ("gentoo/a", b"a\n")],
                     patch={1: (100, b"zzzzzzz")})
    testlib.one_error(sync(tmp_path, http_mirror, gpg_key), "gentoo-20261120.tar.xz", "bad mode field")
    assert refs(tmp_path / "gentoo.git") == ""


def test_negative_pax_size_is_one_line(tmp_path: Path, http_mirror: testlib.HttpMirror,
                                       gpg_key: testlib.Key) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("gentoo/metadata/timestamp.x", stamp(D20)), ("gentoo/b", b"b\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name.endswith("/b"):
                info.pax_headers = {"size": "-1024"}
            tf.addfile(info, io.BytesIO(data))
    tarball = http_mirror.root / "snapshots" / "gentoo-20261120.tar.xz"
    tarball.parent.mkdir(parents=True, exist_ok=True)
    tarball.write_bytes(lzma.compress(buf.getvalue()))
    testlib.write_side_files(tarball, gpg_key)
    testlib.one_error(sync(tmp_path, http_mirror, gpg_key), "size field")
    assert refs(tmp_path / "gentoo.git") == ""


@pytest.mark.parametrize("content", [b"[]\n", b"\xff\xfe not utf-8 {", b'{"pushed": ["x"]}', b'{"last_tag": 5}'])
def test_corrupt_state_is_reported_and_rebuilt(tmp_path: Path, http_mirror: testlib.HttpMirror,
                                               gpg_key: testlib.Key, content: bytes) -> None:
    repo = tmp_path / "gentoo.git"
    testlib.build_snapshot(http_mirror.root, D19, key=gpg_key)
    assert sync(tmp_path, http_mirror, gpg_key, "--date", "20261119").returncode == 0
    state = repo / "snapshotter" / "state.json"
    state.write_bytes(content)
    # `status` says so, without changing anything
    cfg = tmp_path / "status.toml"
    cfg.write_text(f'repo = "{repo}"\nstate_dir = "{tmp_path / "state"}"\n[service]\nqueue_builds = false\n')
    st = testlib.run_cli("--config", str(cfg), "status")
    assert st.returncode == 0 and "Traceback" not in st.stderr, st
    assert "state.json is unreadable" in st.stdout and state.read_bytes() == content
    # The next sync works, warns once and writes a good state from the repository.
    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)
    proc = sync(tmp_path, http_mirror, gpg_key)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("2026-11-20 ")
    assert proc.stderr.count("rebuilt from the repository") == 1, proc.stderr
    data = json.loads(state.read_text())
    assert data["last_tag"] == "2026-11-20" and data["queued_through"] == "2026-11-20"
    assert "rebuilt" not in data
    again = sync(tmp_path, http_mirror, gpg_key)
    assert again.returncode == 0 and "rebuilt" not in again.stderr and "already up to date" in again.stdout


def _tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.decode().strip()}")


def test_disk_full_during_import_says_why_and_leaves_no_temporary_pack(
        tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key) -> None:
    disk = tmp_path / "disk"
    _tmpfs(disk, "3m")
    try:
        repo = disk / "gentoo.git"
        files = {**testlib.BASE_TREE, **{f"distfiles/blob{i}": os.urandom(512 * 1024) for i in range(8)}}
        testlib.build_snapshot(http_mirror.root, D20, files, key=gpg_key)
        proc = sync(tmp_path, http_mirror, gpg_key, repo=repo)
        line = testlib.one_error(proc, "git fast-import failed", "write error")
        assert "Broken pipe" not in line and "disk corruption" not in line
        packs = os.listdir(repo / "objects" / "pack")
        assert not [n for n in packs if n.startswith(("tmp_pack_", "tmp_idx_"))], packs
        assert not [n for n in os.listdir(repo) if n.startswith("fast_import_crash_")]
        assert "refs/tags" not in refs(repo)
        # Room again: the retry imports the day (nothing left behind kept it failing).
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = sync(tmp_path, http_mirror, gpg_key, repo=repo)
        assert again.returncode == 0, again.stderr
        assert again.stdout.startswith("2026-11-20 ")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# --- point 10: the window is the tag rule --------------------------------------------------------

def test_timestamp_whose_tag_is_not_the_file_day_is_refused(tmp_path: Path, http_mirror: testlib.HttpMirror,
                                                            gpg_key: testlib.Key) -> None:
    # gentoo-20261120 taken at 2026-11-20 00:30: inside emerge-webrsync's [D, D+2] but tagged 2026-11-19.
    early = int(datetime(2026, 11, 20, 0, 30, tzinfo=UTC).timestamp())
    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key, timestamp=early)
    testlib.one_error(sync(tmp_path, http_mirror, gpg_key), "outside the window", "would be 2026-11-19, not 2026-11-20")
    assert refs(tmp_path / "gentoo.git") == ""
    # The edges of the window: D+1 00:00 and D+1 23:59:59 are the day's; D+2 00:00 is not.
    for ts, ok in ((datetime(2026, 11, 21, 0, 0), True), (datetime(2026, 11, 21, 23, 59, 59), True),
                   (datetime(2026, 11, 22, 0, 0), False)):
        repo = tmp_path / f"r{int(ts.timestamp())}.git"
        testlib.build_snapshot(http_mirror.root, D20, key=gpg_key, timestamp=int(ts.replace(tzinfo=UTC).timestamp()))
        proc = sync(tmp_path, http_mirror, gpg_key, "--date", "20261120", repo=repo)
        if ok:
            assert proc.returncode == 0 and proc.stdout.startswith("2026-11-20 "), proc.stderr
        else:
            testlib.one_error(proc, "would be 2026-11-21, not 2026-11-20")


# --- point 12: signatures from the future ---------------------------------------------------------

def test_signature_dated_in_the_future_is_refused(tmp_path: Path, http_mirror: testlib.HttpMirror,
                                                  gpg_key: testlib.Key) -> None:
    tarball = testlib.build_snapshot(http_mirror.root, D20, key=None)
    sig = tarball.with_name(tarball.name + ".gpgsig")
    subprocess.run(["gpg", "--homedir", str(gpg_key.home), "--batch", "--pinentry-mode", "loopback",
                    "--passphrase", "", "--faked-system-time", "20990101T000000", "--local-user",
                    gpg_key.fingerprint, "--armor", "--detach-sign", "--output", str(sig), str(tarball)],
                   check=True, capture_output=True)
    testlib.one_error(sync(tmp_path, http_mirror, gpg_key), "signature is dated 2099-01-01", "after this machine's clock")
    assert refs(tmp_path / "gentoo.git") == ""
    # Signed now (a few hours of skew are fine): accepted.
    sig.unlink()
    gpg_key.sign(tarball)
    assert sync(tmp_path, http_mirror, gpg_key).returncode == 0
