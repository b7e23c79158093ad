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
    big = bytes(range(256)) * (snapshot.STREAM_OVER // 256 - 1)  # just under the streaming threshold
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("gentoo/big")
        info.size = len(big)
        tf.addfile(info, io.BytesIO(big))
    path = tmp_path / "t.tar.xz"
    path.write_bytes(lzma.compress(buf.getvalue(), preset=0))
    (member,) = _members(path)  # small members come whole
    assert member[0] == b"big" and member[2] == big


def _tar_xz(path: Path, files: list[tuple[str, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(lzma.compress(buf.getvalue(), preset=0))


@pytest.mark.parametrize("read", ["all", "half", "none"])
def test_big_members_are_streamed_in_bounded_chunks(tmp_path: Path, read: str) -> None:
    """Over STREAM_OVER a file comes as a `Streamed` reader; whatever the consumer reads of it, the next
    member follows intact."""
    big = bytes(range(256)) * (3 * snapshot.STREAM_OVER // 256) + b"odd"
    path = tmp_path / "t.tar.xz"
    _tar_xz(path, [("gentoo/big", big), ("gentoo/after", b"next\n")])
    got: list[tuple[bytes, bytes]] = []
    with snapshot.decompressed(path) as stream:
        for rel, _mode, data, extra in snapshot.members(stream):
            if isinstance(extra, snapshot.Streamed):
                assert data == b"" and extra.size == len(big)
                parts = []
                for chunk in extra.chunks():
                    assert len(chunk) <= 1 << 23
                    parts.append(chunk)
                    if read == "none" or (read == "half" and sum(map(len, parts)) > len(big) // 2):
                        break
                got.append((rel, b"".join(parts)))
            else:
                got.append((rel, data))
    assert got[1] == (b"after", b"next\n")
    assert got[0][0] == b"big" and big.startswith(got[0][1])
    if read == "all":
        assert got[0][1] == big


def test_member_and_unpacked_limits_are_checked_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "t.tar.xz"
    _tar_xz(path, [("gentoo/a", b"x" * 5000), ("gentoo/b", b"y" * 5000)])
    with pytest.raises(SnapshotError, match=r"'gentoo/a' is 5000 bytes, larger than sync.max_member_size \(4096"):
        with snapshot.decompressed(path) as stream:
            list(snapshot.members(stream, snapshot.Limits(member=4096)))
    with pytest.raises(SnapshotError, match=r"sync.max_unpacked_size \(8192 bytes\)"):
        with snapshot.decompressed(path) as stream:
            list(snapshot.members(stream, snapshot.Limits(unpacked=8192)))


def test_a_gigabyte_of_zeros_decompresses_in_bounded_pieces(tmp_path: Path) -> None:
    """A tiny xz (a GiB of zeros is about 150 KB) is handed over in pieces of at most OUT_MAX bytes."""
    path = tmp_path / "z.xz"
    comp = lzma.LZMACompressor(preset=0)
    with open(path, "wb") as f:
        block = bytes(1 << 20)
        for _ in range(256):
            f.write(comp.compress(block))
        f.write(comp.flush())
    biggest = total = 0
    with snapshot.decompressed(path) as stream:
        while chunk := stream.read1():
            biggest, total = max(biggest, len(chunk)), total + len(chunk)
    assert total == 256 << 20
    assert biggest <= snapshot._ThreadedReader.OUT_MAX
