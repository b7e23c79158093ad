"""Reading a snapshot tarball: decompression, a streaming tar reader with the safety rules, and the dates.

The tarball is never extracted to disk. `members()` yields one `Member` per file or symlink with the single
top-level directory stripped (its name varies between producers, so nothing depends on it). Anything that
could escape the tree or is not plain data is refused with SnapshotError: absolute names, `..`
components, device files and fifos, hardlinks to outside the tree, more than one top-level entry.

The reader handles the ustar, GNU (long names) and pax (extended headers) dialects that tar and Python
write. It is hand-written rather than `tarfile` because it sits on the import's hot path (100k+ members per
snapshot) and because the rules above are easier to enforce in one place.
"""

from __future__ import annotations

import bz2
import lzma
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from snapshotter import tarformat as tar
from snapshotter.errors import SnapshotError
from snapshotter.tarformat import BLOCK

TIMESTAMP_PATH = b"metadata/timestamp.x"

MODE_FILE = b"100644"
MODE_EXEC = b"100755"
MODE_LINK = b"120000"

# The compressions emerge-webrsync knows, by magic bytes.
_FORMATS: list[tuple[bytes, str]] = [(b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2")]

# A member of the snapshot, as `members()` yields it (a plain tuple: this is the import's hot path):
# (path relative to the tree, git mode, file content or symlink target, hardlink target path or None, or
# for a file larger than STREAM_OVER a `Streamed` reader of its content, with b"" as the content).
Member = tuple[bytes, bytes, bytes, "bytes | Streamed | None"]

STREAM_OVER = 4 << 20  # files larger than this are handed over in chunks (`Streamed`), never held whole
META_MAX = 1 << 20  # a pax or GNU long-name header larger than this is not a snapshot's


@dataclass(frozen=True)
class Limits:
    """What one snapshot may unpack to, in bytes (the keys of [sync] that set them are in the messages)."""

    member: int = 512 << 20  # sync.max_member_size: any one file
    unpacked: int = 8 << 30  # sync.max_unpacked_size: the whole uncompressed tar stream


class Streamed:
    """The content of one big file, read from the tar stream in chunks as `chunks()` is iterated.

    It must be read (or left: `members()` skips what is left) before the next member is asked for; the
    memory it takes is one chunk, whatever the file's size.
    """

    def __init__(self, size: int, head: bytes, read: Callable[[int], bytes]) -> None:
        self.size = size
        self._head, self._read, self._left = head, read, size
        self.rest = b""  # what was read past the file's end, for the reader to continue with

    def chunks(self) -> Iterator[bytes]:
        data, self._head = self._head, b""
        while self._left:
            if not data:
                data = self._read(_CHUNK)
                if not data:
                    raise SnapshotError("tar archive is truncated")
            if len(data) > self._left:
                data, self.rest = data[:self._left], data[self._left:]
            self._left -= len(data)
            yield data
            data = b""

    def finish(self) -> bytes:
        """Skip what was not read; return the bytes after the file."""
        for _ in self.chunks():
            pass
        return self.rest


@contextmanager
def decompressed(tarball: Path, progress: Callable[[int, int], None] | None = None) -> Iterator[BinaryIO]:
    """Yield the uncompressed tar stream of an xz or bzip2 `tarball`.

    A thread decompresses with Python's lzma/bz2 (liblzma/libbz2, which run without the GIL) while the
    caller parses, so both cores work and nothing is copied through a pipe. Corrupt data (bad CRC,
    truncated stream) raises SnapshotError when the reader gets to it. `progress(done, total)` gets
    compressed bytes read. While it runs, the interpreter's thread switch interval is short, so the
    decompressing thread gets the GIL back at once after each block.
    """
    with open(tarball, "rb") as f:
        magic = f.read(8)
        f.seek(0)
        kind = next((k for prefix, k in _FORMATS if magic.startswith(prefix)), None)
        if kind is None:
            raise SnapshotError(f"{tarball.name}: not an xz or bzip2 compressed file")
        total = os.fstat(f.fileno()).st_size
        tick = (lambda: progress(f.tell(), total)) if progress is not None else None
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        reader = _ThreadedReader(f, kind, tick)
        try:
            yield reader  # type: ignore[misc]
            reader.drain()  # the whole input must decompress cleanly, up to its end-of-stream check
        finally:
            reader.close()
            sys.setswitchinterval(interval)


class _ThreadedReader:
    """Decompresses in a background thread, a bounded queue ahead of the reader.

    `read1()` hands over whole decompressed chunks (no copies); `read(n)` returns exactly n bytes
    unless the stream ends.
    """

    IN_BLOCK = 1 << 18  # compressed bytes per decompressor call: few, long GIL-free calls
    OUT_MAX = 1 << 22  # decompressed bytes per call: bounds memory whatever the ratio (a GiB of zeros is 150 KB of xz)
    AHEAD = 6  # chunks decompressed ahead (about 3 MB each for a Gentoo tree): bounds the memory

    def __init__(self, source: BinaryIO, kind: str, tick: Callable[[], None] | None) -> None:
        self._source, self._kind, self._tick = source, kind, tick
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(self.AHEAD)
        self._stop = threading.Event()
        self._buf = b""
        self._eof = False
        self._thread = threading.Thread(target=self._run, name=f"{kind}-decompress", daemon=True)
        self._thread.start()

    def _new(self) -> lzma.LZMADecompressor | bz2.BZ2Decompressor:
        return lzma.LZMADecompressor(lzma.FORMAT_XZ) if self._kind == "xz" else bz2.BZ2Decompressor()

    def _run(self) -> None:
        try:
            dec = self._new()
            raw = b""
            while not self._stop.is_set():
                if dec.eof:  # concatenated streams (pbzip2, xz --single-stream off); xz may pad with NULs
                    if not raw:
                        raw = self._source.read(self.IN_BLOCK)
                        if not raw:
                            break
                    raw = raw.lstrip(b"\0") if self._kind == "xz" else raw
                    if not raw:
                        continue
                    dec = self._new()
                if dec.needs_input:
                    if not raw:
                        raw = self._source.read(self.IN_BLOCK)
                        if not raw:
                            break
                    out = dec.decompress(raw, self.OUT_MAX)
                    raw = b""
                else:  # output held back by OUT_MAX: no new input until it is out
                    out = dec.decompress(b"", self.OUT_MAX)
                if dec.eof:
                    raw = dec.unused_data
                if out:
                    self._put(out)
            if not dec.eof:
                raise EOFError("compressed data ends before the end-of-stream marker")
            self._put(None)
        except (lzma.LZMAError, OSError, EOFError, ValueError) as e:
            self._put(e)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read1(self, n: int = -1) -> bytes:
        """The next decompressed chunk (any size), b"" at the end."""
        if self._buf:
            out, self._buf = self._buf, b""
            return out
        if self._eof:
            return b""
        item = self._queue.get()
        if item is None:
            self._eof = True
            return b""
        if isinstance(item, BaseException):
            self._eof = True
            raise SnapshotError(f"{self._kind} failed: corrupt or truncated data ({item})")
        if self._tick is not None:
            self._tick()
        return item

    def read(self, n: int = -1) -> bytes:
        parts = [self.read1()]
        size = len(parts[0])
        while parts[-1] and (n < 0 or size < n):
            parts.append(self.read1())
            size += len(parts[-1])
        data = b"".join(parts)
        if 0 <= n < len(data):
            data, self._buf = data[:n], data[n:]
        return data

    def drain(self) -> None:
        while self.read1():
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large values
        value = int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise SnapshotError(f"tar archive is corrupt (bad {what} field)") from None


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _pax(data: bytes) -> dict[bytes, bytes]:
    """Parse pax extended header records: `<len> <key>=<value>\\n`."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise SnapshotError("malformed pax header") from None
        if length <= 0:
            raise SnapshotError("malformed pax header")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key] = value
        pos += length
    return out


def _relative(name: bytes, what: str) -> list[bytes]:
    """Split a member name into components, refusing absolute names and `..`."""
    if name.startswith(b"/"):
        raise SnapshotError(f"unsafe {what} {name.decode(errors='replace')!r}: absolute path")
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise SnapshotError(f"unsafe {what} {name.decode(errors='replace')!r}: contains '..'")
    return parts


_CHUNK = 1 << 21  # what members() asks a plain stream for at a time (the decompressing reader hands over whole chunks)
# Type flags as the ints that indexing a header gives.
_REG, _AREG, _CONTIG, _LNK, _SYM, _DIR = (ord(t) for t in (tar.REGTYPE, tar.AREGTYPE, tar.CONTTYPE, tar.LNKTYPE,
                                                           tar.SYMTYPE, tar.DIRTYPE))
_LONGNAME, _LONGLINK, _PAX = ord(tar.GNUTYPE_LONGNAME), ord(tar.GNUTYPE_LONGLINK), ord(tar.XHDTYPE)
_SPECIAL = {ord(tar.CHRTYPE): "character device", ord(tar.BLKTYPE): "block device", ord(tar.FIFOTYPE): "fifo"}
_META = {_LONGNAME, _LONGLINK, _PAX, ord(tar.XGLTYPE)}


def members(stream: BinaryIO, limits: Limits = Limits()) -> Iterator[Member]:  # noqa: B008 (frozen)
    """Yield the files and symlinks of a tar stream with its single top-level directory stripped.

    Parses from large chunks of the stream. Header checksums are checked on the first header (to tell
    a tar from anything else) and on any header that does not parse; the compressed formats carry
    their own integrity checks (xz CRC64, bzip2 CRC32), which the decompressor verifies.

    Bounded whatever the input: a file over `limits.member` or a stream over `limits.unpacked` is refused
    (from its header, before its content is read), a file over STREAM_OVER comes as a `Streamed` reader.
    """
    buf = b""
    pos = 0
    unpacked = 0
    read = getattr(stream, "read1", stream.read)
    top: bytes | None = None
    long_name: bytes | None = None
    long_link: bytes | None = None
    pax: dict[bytes, bytes] | None = None
    while True:
        if len(buf) - pos < BLOCK:
            buf = _refill(buf[pos:], read, BLOCK)
            pos = 0
            if len(buf) < BLOCK:
                if not buf and top is not None:
                    return  # end without the zero blocks: tolerated, as GNU tar does
                raise SnapshotError("tar archive is truncated" if top is not None else "not a tar archive (empty)")
        end = pos + BLOCK
        hdr = buf[pos:end]
        if hdr[0] == 0 and hdr.count(0) == BLOCK:
            return
        if top is None:
            _check_header(hdr, first=True)
        typeflag = hdr[tar.TYPEFLAG]
        size_field = hdr[tar.SIZE]
        try:
            size = int(pax[b"size"]) if pax and b"size" in pax else (
                _octal(size_field, "size") if size_field[0] & 0x80 else int(size_field.strip(b"\0 ") or b"0", 8))
            if size < 0:
                raise ValueError(size)
        except ValueError:
            _check_header(hdr, first=False)
            raise SnapshotError("tar archive is corrupt (bad size field)") from None
        stop = end + size
        padded_stop = end + ((size + BLOCK - 1) & ~(BLOCK - 1))
        unpacked += padded_stop - pos
        if unpacked > limits.unpacked:
            raise SnapshotError(f"the snapshot unpacks to more than sync.max_unpacked_size ({limits.unpacked} bytes)")
        if typeflag in _META and size > META_MAX:
            raise SnapshotError(f"tar extended header of {size} bytes: not a snapshot's")
        streamed = size > STREAM_OVER  # its content is left in the stream, for a `Streamed` reader
        if not streamed and padded_stop > len(buf):
            buf = _refill(buf[pos:], read, padded_stop - pos)
            end -= pos
            stop -= pos
            padded_stop -= pos
            pos = 0
            if padded_stop > len(buf):
                raise SnapshotError("tar archive is truncated")
        pos = padded_stop if not streamed else end

        if typeflag in _META:
            payload = buf[end:stop]
            if typeflag == _LONGNAME:
                long_name = _cstr(payload)
            elif typeflag == _LONGLINK:
                long_link = _cstr(payload)
            elif typeflag == _PAX:
                pax = _pax(payload)
            continue

        if pax and b"path" in pax:
            name = pax[b"path"]
        elif long_name is not None:
            name = long_name
        else:
            name = hdr[tar.NAME]
            z = name.find(0)
            if z >= 0:
                name = name[:z]
            if hdr[tar.PREFIX.start] and hdr[tar.MAGIC] == tar.USTAR_MAGIC:  # POSIX ustar prefix field
                name = _cstr(hdr[tar.PREFIX]) + b"/" + name
        if typeflag in (_LNK, _SYM):
            linkname = pax[b"linkpath"] if pax and b"linkpath" in pax else (
                long_link if long_link is not None else _cstr(hdr[tar.LINKNAME]))
        long_name = long_link = pax = None

        # Split off the top-level directory; the rare names that need care take the slow path.
        if name[:1] == b"/" or b".." in name or b"./" in name or b"//" in name or name.endswith(b"/."):
            parts = _relative(name, "member")
            if not parts:
                raise SnapshotError(f"unsafe member {name.decode(errors='replace')!r}: empty name")
            first, rel = parts[0], b"/".join(parts[1:])
        else:
            first, _, rel = name.partition(b"/")
            rel = rel.rstrip(b"/")
        if top is None:
            top = first
        elif first != top:
            raise SnapshotError("snapshot must have exactly one top-level directory, found "
                                f"{top.decode(errors='replace')!r} and {first.decode(errors='replace')!r}")

        if typeflag == _REG or typeflag == _AREG or typeflag == _CONTIG:
            if not rel:
                raise SnapshotError("snapshot must have exactly one top-level directory, found file "
                                    f"{name.decode(errors='replace')!r}")
            # git's rule (`git add`): executable when the owner may execute it (0654 is not, 0744 is)
            mode = MODE_EXEC if _octal(hdr[tar.MODE], "mode") & 0o100 else MODE_FILE
            if size > limits.member:
                raise SnapshotError(f"member {name.decode(errors='replace')!r} is {size} bytes, larger than "
                                    f"sync.max_member_size ({limits.member} bytes)")
            if not streamed:
                yield rel, mode, buf[end:stop], None
                continue
            big = Streamed(size, buf[end:], read)
            buf = b""
            yield rel, mode, b"", big
            buf, pos = _refill(big.finish(), read, padded_stop - stop), padded_stop - stop
            if len(buf) < pos:
                raise SnapshotError("tar archive is truncated")
        elif streamed:
            raise SnapshotError(f"member {name.decode(errors='replace')!r}: a tar entry of type "
                                f"{chr(typeflag)!r} with {size} bytes of data")
        elif typeflag == _DIR:
            continue
        elif typeflag == _SYM:
            if not rel:
                raise SnapshotError(f"unsafe member {name.decode(errors='replace')!r}: the top-level entry is a symlink")
            if not linkname:
                raise SnapshotError(f"symlink {name.decode(errors='replace')!r} has no target")
            yield rel, MODE_LINK, linkname, None
        elif typeflag == _LNK:
            target = _relative(linkname, "hardlink target")
            if not rel or not target or target[0] != top or len(target) < 2:
                raise SnapshotError(f"unsafe hardlink {name.decode(errors='replace')!r} -> "
                                    f"{linkname.decode(errors='replace')!r}: target outside the tree")
            yield rel, MODE_FILE, b"", b"/".join(target[1:])
        elif typeflag in _SPECIAL:
            raise SnapshotError(f"unsafe member {name.decode(errors='replace')!r}: {_SPECIAL[typeflag]}")
        else:
            _check_header(hdr, first=False)
            raise SnapshotError(f"unsupported member {name.decode(errors='replace')!r} (tar type {chr(typeflag)!r})")


def _refill(rest: bytes, read: Callable[[int], bytes], need: int) -> bytes:
    """`rest` plus at least `need` bytes in all, fewer only at the end of the stream."""
    parts = [rest]
    size = len(rest)
    while size < need:
        more = read(_CHUNK)
        if not more:
            break
        parts.append(more)
        size += len(more)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _check_header(hdr: bytes, first: bool) -> None:
    try:
        chksum = int(hdr[tar.CHKSUM].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        chksum = -1
    if chksum != tar.checksum(hdr):
        raise SnapshotError("not a tar archive (header checksum mismatch)" if first
                            else "tar archive is corrupt (header checksum mismatch)")


def parse_timestamp(data: bytes) -> int:
    """The unix time in `metadata/timestamp.x`: its first field, an unsigned integer (the rest is free text).

    The time and the day before it must be dates Python can represent (years 1 to 9999), so that the tag
    and the window checks below cannot fail on them.
    """
    fields = data.split()
    if not fields or not fields[0].isdigit() or len(fields[0]) > 12:
        shown = data[:40].decode(errors="replace").strip()
        raise SnapshotError(f"metadata/timestamp.x does not start with a unix time: {shown!r}")
    value = int(fields[0])
    try:
        datetime.fromtimestamp(value, UTC)
        datetime.fromtimestamp(value - 86400, UTC)
    except (OverflowError, ValueError, OSError):
        raise SnapshotError(f"metadata/timestamp.x: the unix time {value} is out of range (not a date "
                            "between the years 1 and 9999)") from None
    return value


def tag_for(timestamp: int) -> str:
    """The seed's rule: the tag is the UTC day of timestamp.x minus 86400 s (the snapshot for a day is
    taken at 00:45 UTC on the following day)."""
    return datetime.fromtimestamp(timestamp - 86400, UTC).strftime("%Y-%m-%d")


def check_timestamp(timestamp: int, file_day: date) -> None:
    """A snapshot named for day D must carry a timestamp.x whose tag (`tag_for`) is D: a time in
    [D+1 00:00 UTC, D+2 00:00 UTC). The window and the tag rule are one rule, so a day that is accepted is
    tagged with its own date and the next sync starts after it (emerge-webrsync accepts [D, D+2 days];
    its first and last day would be tagged D-1 and D+1, which jams the catch-up on that day)."""
    start = datetime(file_day.year, file_day.month, file_day.day, tzinfo=UTC) + timedelta(days=1)
    when = datetime.fromtimestamp(timestamp, UTC)
    if not start <= when < start + timedelta(days=1):
        raise SnapshotError(f"timestamp.x says {when:%Y-%m-%d %H:%M} UTC, outside the window of the "
                            f"snapshot for {file_day:%Y-%m-%d} ([{start:%Y-%m-%d} 00:00, +1 day) UTC): its tag "
                            f"would be {tag_for(timestamp)}, not {file_day:%Y-%m-%d}")
