"""The streaming tar reader on the dialects real tools write: GNU long names, pax headers, and
compressed files made of several streams (pbzip2, concatenated xz)."""

from __future__ import annotations

import bz2
import io
import lzma
import tarfile
from pathlib import Path

import pytest

from snapshotter.errors import SnapshotError
from snapshotter.sync import tarstream as snapshot

LONG = "gentoo/" + "/".join(f"very-long-directory-name-{i:02d}" for i in range(6)) + "/file.ebuild"
USTAR_LONG = "gentoo/" + "d" * 90 + "/" + "f" * 90  # ustar: split into its 155-byte prefix + 100-byte name


def _tar(fmt: int, long: str = LONG) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in (("gentoo/short", b"s\n"), (long, b"long\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name == long else 0o644
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("gentoo/link")
        link.type = tarfile.SYMTYPE
        link.linkname = long.removeprefix("gentoo/") if fmt != tarfile.USTAR_FORMAT else "short"
        tf.addfile(link)
    return buf.getvalue()


def _members(path: Path) -> list[snapshot.Member]:
    with snapshot.decompressed(path) as stream:
        return list(snapshot.members(stream))


@pytest.mark.parametrize("fmt,long", [(tarfile.GNU_FORMAT, LONG), (tarfile.PAX_FORMAT, LONG),
                                      (tarfile.USTAR_FORMAT, USTAR_LONG)])
def test_long_names_in_every_dialect(tmp_path: Path, fmt: int, long: str) -> None:
    path = tmp_path / "t.tar.xz"
    path.write_bytes(lzma.compress(_tar(fmt, long)))
    got = {m[0]: m for m in _members(path)}
    rel = long.removeprefix("gentoo/").encode()
    assert got[rel][1:3] == (snapshot.MODE_EXEC, b"long\n")
    assert got[b"short"][1:3] == (snapshot.MODE_FILE, b"s\n")
    target = rel if fmt != tarfile.USTAR_FORMAT else b"short"
    assert got[b"link"][1:3] == (snapshot.MODE_LINK, target)


def test_concatenated_streams_are_read_whole(tmp_path: Path) -> None:
    data = _tar(tarfile.GNU_FORMAT)
    half = len(data) // 2
    path = tmp_path / "t.tar.bz2"
    path.write_bytes(bz2.compress(data[:half]) + bz2.compress(data[half:]))  # as pbzip2 writes
    assert len(_members(path)) == 3
    path = tmp_path / "t.tar.xz"
    path.write_bytes(lzma.compress(data[:half]) + lzma.compress(data[half:]) + b"\0" * 8)  # xz padding
    assert len(_members(path)) == 3


def test_truncated_compressed_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t.tar.xz"
    path.write_bytes(lzma.compress(_tar(tarfile.GNU_FORMAT) * 50)[:-40])
    with pytest.raises(SnapshotError, match="xz failed"):
        _members(path)


def test_big_member_spanning_many_chunks(tmp_path: Path) -> None:
    buf = io.BytesIO()
    big = bytes(range(256)) * (3 * (1 << 20) // 256 * 3)  # ~9 MiB: several reader chunks
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("gentoo/big")
        info.size = len(big)
        tf.addfile(info, io.BytesIO(big))
    path = tmp_path / "t.tar.xz"
    path.write_bytes(lzma.compress(buf.getvalue(), preset=0))
    (member,) = _members(path)
    assert member[0] == b"big" and member[2] == big
