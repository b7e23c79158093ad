"""Publish date tags as signed emerge-webrsync snapshots (`DIR/snapshots/gentoo-YYYYMMDD.tar.xz`).

The tree of a tag is streamed from the snapshot repository (`git ls-tree` + `git cat-file --batch`) through a
small deterministic tar writer into `xz`, with no temporary tree on disk. The tar bytes depend on the
tree and the commit time only: one top-level directory `gentoo-YYYYMMDD/`, owner/group portage:portage
(250) numeric and by name, git's sorted order, every mtime the commit's, modes 0644/0755/0777, no pax
global header. xz always runs in multi-threaded mode with a block size fixed by the level, whose output
does not depend on the number of threads, so the `.tar.xz` is byte-identical on any machine with the same xz.

Publication is atomic: the tarball is written under a temporary name in the same directory and
fsynced, signed, then its `.md5sum` and `.gpgsig` are renamed into place and only then the tarball
itself; a failure at any step removes the temporary files and leaves what was published untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from snapshotter import tarformat as tar
from snapshotter.config import Config
from snapshotter.errors import SnapshotError, SnapshotterError, child_failure
from snapshotter.fsutil import create_temp, file_digest, fsync_dir, is_temp, open_dir, temp_name, write_temp
from snapshotter.git.export import (
    BlobReader,
    check_links,
    check_symlink,
    copy_exact,
    read_links,
    resolve,
    tree_entries,
)
from snapshotter.git.repository import Repository, Tag, tag_date
from snapshotter.lock import flocked
from snapshotter.openpgp import SigningError, detach_sign, signing_fingerprint

log = logging.getLogger(__name__)

FAMILY = "gentoo"
# Multi-threaded xz output depends on the block size, never on the thread count, so the block size is a
# fixed function of the level: xz's own default (3x the preset's dictionary), capped at 32 MiB so that
# -7..-9 still give a real-sized tree enough blocks for every core (the default at -9 is 192 MiB).
_XZ_DICT_KIB = {0: 256, 1: 1024, 2: 2048, 3: 4096, 4: 4096, 5: 8192, 6: 8192, 7: 16384, 8: 32768, 9: 65536}
XZ_MAX_BLOCK_KIB = 32 * 1024


LATEST = f"{FAMILY}-latest.tar.xz"
SIDE_SUFFIXES = (".md5sum", ".gpgsig")
LOCK_NAME = ".snapshotter-publish.lock"


def xz_block_size(level: int) -> str:
    return f"{min(3 * _XZ_DICT_KIB[level], XZ_MAX_BLOCK_KIB)}KiB"


# ---- deterministic tar stream ------------------------------------------------------------------------

PORTAGE_ID = 250
PORTAGE_NAME = b"portage"


def _octal(value: int, field: slice) -> bytes:
    """A NUL-terminated, zero-padded octal header field."""
    width = field.stop - field.start
    digits = f"{value:o}".encode()
    if len(digits) > width - 1:
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    return digits.rjust(width - 1, b"0") + b"\0"


def _field(value: bytes, field: slice) -> bytes:
    return value.ljust(field.stop - field.start, b"\0")


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) fitting ustar's prefix and name fields, split at a slash; None when impossible."""
    if len(name) <= tar.NAME_LEN:
        return b"", name
    for i in range(len(name) - 1, 0, -1):
        if name[i:i + 1] == b"/" and i <= tar.PREFIX_LEN and 0 < len(name) - i - 1 <= tar.NAME_LEN:
            return name[:i], name[i + 1:]
    return None


_IDS = _octal(PORTAGE_ID, tar.UID) + _octal(PORTAGE_ID, tar.GID)
_MAGIC_OWNERS_DEVICES = (tar.USTAR_MAGIC + tar.USTAR_VERSION + _field(PORTAGE_NAME, tar.UNAME)
                         + _field(PORTAGE_NAME, tar.GNAME) + _octal(0, tar.DEVMAJOR) + _octal(0, tar.DEVMINOR))
_CHKSUM_PLACEHOLDER = b" " * (tar.CHKSUM.stop - tar.CHKSUM.start)
_TAIL_PAD = b"\0" * (tar.BLOCK - tar.PREFIX.stop)


def header(name: bytes, *, mode: int, size: int, mtime: int, typeflag: bytes, linkname: bytes = b"",
           prefix: bytes = b"") -> bytes:
    """One 512-byte ustar header block with its checksum (fields: name, mode, uid, gid, size, mtime,
    checksum, type, linkname, magic, version, uname, gname, devmajor, devminor, prefix)."""
    if len(name) > tar.NAME_LEN or len(linkname) > tar.LINKNAME_LEN or len(prefix) > tar.PREFIX_LEN \
            or not 0 <= size <= tar.MAX_OCTAL_11 or not 0 <= mtime <= tar.MAX_OCTAL_11 or not 0 <= mode <= 0o7777777:
        raise ValueError(f"tar header field out of range for {name!r}")
    block = b"".join((
        name.ljust(tar.NAME_LEN, b"\0"), b"%07o\0" % mode, _IDS, b"%011o\0" % size, b"%011o\0" % mtime,
        _CHKSUM_PLACEHOLDER, typeflag, linkname.ljust(tar.LINKNAME_LEN, b"\0"), _MAGIC_OWNERS_DEVICES,
        prefix.ljust(tar.PREFIX_LEN, b"\0"), _TAIL_PAD,
    ))  # the %-formats are the widths of the MODE (8), SIZE and MTIME (12) fields
    return b"%s%06o\0 %s" % (block[:tar.CHKSUM.start], tar.checksum(block), block[tar.CHKSUM.stop:])


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length = len(str(length).encode()) + len(body)
    return str(length).encode() + body


def padding(size: int) -> bytes:
    return b"\0" * (-size % tar.BLOCK)


class TarWriter:
    """Writes tar members to `write` (a callable taking bytes); call `close()` for the end blocks."""

    def __init__(self, write: Callable[[bytes], object], mtime: int) -> None:
        self._write = write
        self.mtime = mtime
        self.written = 0

    def _emit(self, data: bytes) -> None:
        self._write(data)
        self.written += len(data)

    def _member_header(self, name: bytes, *, mode: int, size: int, typeflag: bytes,
                       linkname: bytes = b"") -> None:
        pax: list[bytes] = []
        split = _split_ustar(name)
        if split is None:
            pax.append(_pax_record("path", name))
            short = name.rstrip(b"/").rsplit(b"/", 1)[-1][:99]
            split = (b"", short + (b"/" if name.endswith(b"/") else b""))
        if len(linkname) > tar.LINKNAME_LEN:
            pax.append(_pax_record("linkpath", linkname))
            linkname = linkname[:tar.LINKNAME_LEN]
        ustar_size = size
        if size > tar.MAX_OCTAL_11:
            pax.append(_pax_record("size", str(size).encode()))
            ustar_size = 0
        if pax:
            records = b"".join(pax)
            pax_name = b"PaxHeaders/" + split[1].rstrip(b"/")[:80]
            self._emit(header(pax_name, mode=0o644, size=len(records), mtime=self.mtime, typeflag=tar.XHDTYPE))
            self._emit(records + padding(len(records)))
        prefix, short = split
        self._emit(header(short, mode=mode, size=ustar_size, mtime=self.mtime, typeflag=typeflag,
                          linkname=linkname, prefix=prefix))

    def add_dir(self, name: str) -> None:
        self._member_header(name.rstrip("/").encode() + b"/", mode=0o755, size=0, typeflag=tar.DIRTYPE)

    def add_symlink(self, name: str, target: bytes) -> None:
        self._member_header(name.encode(), mode=0o777, size=0, typeflag=tar.SYMTYPE, linkname=target)

    def begin_file(self, name: str, size: int, executable: bool) -> None:
        """Header of a regular file; then send exactly `size` bytes with `data()` and call `end_file`."""
        self._member_header(name.encode(), mode=0o755 if executable else 0o644, size=size, typeflag=tar.REGTYPE)

    def data(self, chunk: bytes) -> None:
        self._emit(chunk)

    def end_file(self, size: int) -> None:
        self._emit(padding(size))

    def close(self) -> None:
        self._emit(b"\0" * (2 * tar.BLOCK))
        self._emit(b"\0" * (-self.written % tar.RECORD))


# ---- tree -> tar -> xz -------------------------------------------------------------------------------
class _Buffered:
    """Collects small writes into ~1 MiB chunks for the pipe to xz."""

    def __init__(self, write: Callable[[bytes], object], size: int = 1 << 20) -> None:
        self._write = write
        self._size = size
        self._buf = bytearray()

    def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= self._size:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._write(bytes(self._buf))
            self._buf.clear()


def write_tar(repo: Path, commit: str, mtime: int, topdir: str, write: Callable[[bytes], object]) -> int:
    """Stream the tree of `commit` as a tar (under `topdir/`) into `write`; returns the bytes written."""
    entries = tree_entries(repo, commit)
    check_links(read_links(repo, entries))
    tar = TarWriter(write, mtime)
    tar.add_dir(topdir)
    with BlobReader(repo, [e.oid for e in entries if e.kind != "dir"]) as blobs:
        for e in entries:
            name = f"{topdir}/{e.path}"
            if e.kind == "dir":
                tar.add_dir(name)
            elif e.kind == "symlink":
                target = blobs.read_blob(e.oid)
                check_symlink(e.path, target.decode(errors="replace"))
                tar.add_symlink(name, target)
            else:
                size, stream = blobs.next_blob(e.oid)
                tar.begin_file(name, size, e.kind == "exec")
                copy_exact(stream, size, tar.data)
                tar.end_file(size)
    tar.close()
    return tar.written


def xz_command(level: int, threads: int) -> list[str]:
    """xz in multi-threaded mode (`-T+N` even for one thread), block size fixed by the level: reproducible."""
    n = threads if threads > 0 else (os.cpu_count() or 1)
    return ["xz", "--compress", "--stdout", "--format=xz", "--check=crc64", f"-{level}",
            f"--threads=+{n}" if n == 1 else f"--threads={n}", f"--block-size={xz_block_size(level)}",
            "--no-adjust", "--quiet"]


def write_tarball(repo: Path, commit: str, mtime: int, topdir: str, out_fd: int, *,
                  xz_level: int = 9, xz_threads: int = 0) -> int:
    """Compress the tar of `commit` with xz into the open file `out_fd`; returns the uncompressed size."""
    if shutil.which("xz") is None:
        raise SnapshotterError("xz is not installed (needed to publish snapshots)")
    proc = subprocess.Popen(xz_command(xz_level, xz_threads), stdin=subprocess.PIPE, stdout=out_fd,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    errors: list[bytes] = []
    drain = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    drain.start()
    size = 0
    try:
        buf = _Buffered(proc.stdin.write)
        size = write_tar(repo, commit, mtime, topdir, buf.write)
        buf.flush()
        proc.stdin.close()
    except BrokenPipeError:
        pass  # xz died: its status and message below say why
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if not proc.stdin.closed:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
    rc = proc.wait()
    drain.join()
    if rc != 0:
        raise SnapshotterError(f"xz failed: {child_failure(b''.join(errors), rc)}")
    return size


# ---- publication -------------------------------------------------------------------------------------
def snapshot_name(day: date) -> str:
    return f"{FAMILY}-{day:%Y%m%d}.tar.xz"


def topdir_name(day: date) -> str:
    return f"{FAMILY}-{day:%Y%m%d}"


def _day_of(name: str) -> date | None:
    """The day of a published `gentoo-YYYYMMDD.tar.xz` name, else None."""
    stem = name.removeprefix(f"{FAMILY}-").removesuffix(".tar.xz")
    if len(stem) != 8 or not stem.isdigit() or not name.startswith(f"{FAMILY}-") or not name.endswith(".tar.xz"):
        return None
    return tag_date(f"{stem[:4]}-{stem[4:6]}-{stem[6:]}")


def published_days(snapdir: Path) -> list[date]:
    """Days whose tarball and both side files are in `snapdir`, oldest first."""
    days = []
    if snapdir.is_dir():
        for p in snapdir.iterdir():
            day = _day_of(p.name)
            if day is not None and all(p.with_name(p.name + s).is_file() for s in SIDE_SUFFIXES):
                days.append(day)
    return sorted(days)


@dataclass
class Published:
    tag: str
    path: Path
    md5: str
    size: int  # compressed bytes
    tar_size: int  # uncompressed bytes


@dataclass
class PublishReport:
    published: list[Published] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # tags already published (no --force)
    pruned: list[str] = field(default_factory=list)  # file names removed by --keep
    latest: str | None = None  # the tag gentoo-latest.tar.xz stands for
    refused: list[tuple[str, str]] = field(default_factory=list)  # (tag, why) of tags --all could not publish


class PublishIncomplete(SnapshotterError):
    """`--all` published what it could and skipped tags whose trees cannot be published; `report` says
    what was done (the caller prints it before this one error line)."""

    def __init__(self, report: PublishReport) -> None:
        refused = "; ".join(f"{tag} ({why})" for tag, why in report.refused)
        super().__init__(f"published {len(report.published)}, skipped {len(report.refused)}: {refused}")
        self.report = report


@dataclass
class PublishOptions:
    out: Path
    signing_key: str
    gnupghome: Path | None = None
    keep: int = 0
    xz_level: int = 9
    xz_threads: int = 0
    passphrase_file: Path | None = None  # for a passphrase-protected signing key (binhost builds)


def publish_tag(repo: Path, tag: Tag, opts: PublishOptions) -> Published:
    """Write, sign and atomically publish the snapshot of one tag."""
    snapdir = opts.out / "snapshots"
    name = snapshot_name(tag.day)
    commit, mtime = resolve(repo, tag.commit)
    fd, tmp = create_temp(snapdir / name)
    temps = {"": tmp}
    try:
        try:
            tar_size = write_tarball(repo, commit, mtime, topdir_name(tag.day), fd,
                                     xz_level=opts.xz_level, xz_threads=opts.xz_threads)
            os.fsync(fd)
        finally:
            os.close(fd)
        md5 = file_digest(tmp, "md5")
        signature = detach_sign(tmp, opts.signing_key, opts.gnupghome, name=name,
                                passphrase_file=opts.passphrase_file)
        side = {
            ".md5sum": f"{md5}  {name}\n".encode(),
            ".gpgsig": signature,
        }
        for suffix, data in side.items():
            temps[suffix] = write_temp(snapdir / (name + suffix), data, durable=True)
        _rename_side_files_first(temps, snapdir / name)
    finally:
        for t in temps.values():
            t.unlink(missing_ok=True)
    size = (snapdir / name).stat().st_size
    log.debug("published %s (%s, %d bytes, md5 %s)", name, tag.name, size, md5)  # the caller reports it
    return Published(tag.name, snapdir / name, md5, size, tar_size)


def _rename_side_files_first(temps: dict[str, Path], target: Path) -> None:
    """Rename the fsynced temporary files {suffix: temp} over `target` + suffix, the side files first and
    the tarball ("" suffix) last, then fsync the directory: a client never sees a tarball without its
    checksum and signature. The parts of fsutil.atomic_write, in an order that spans files."""
    for suffix in (*SIDE_SUFFIXES, ""):
        os.rename(temps[suffix], target.with_name(target.name + suffix))
    fsync_dir(target.parent)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def latest_day(snapdir: Path) -> date | None:
    """The day gentoo-latest.tar.xz currently stands for (same inode, else same md5), or None."""
    latest = snapdir / LATEST
    if not latest.exists():
        return None
    md5_line = (snapdir / (LATEST + ".md5sum"))
    latest_md5 = md5_line.read_text().split()[0] if md5_line.is_file() else None
    for day in published_days(snapdir):
        p = snapdir / snapshot_name(day)
        if _same_file(p, latest):
            return day
        side = p.with_name(p.name + ".md5sum")
        if latest_md5 and side.read_text().split()[:1] == [latest_md5]:
            return day
    return None


def update_latest(snapdir: Path, day: date) -> None:
    """Point gentoo-latest.tar.xz (+ side files) at the snapshot of `day`, side files first."""
    src = snapdir / snapshot_name(day)
    latest = snapdir / LATEST
    if _same_file(src, latest):
        return
    md5 = (src.with_name(src.name + ".md5sum")).read_text().split()[0]
    temps: dict[str, Path] = {}
    try:
        temps[".md5sum"] = write_temp(snapdir / (LATEST + ".md5sum"), f"{md5}  {LATEST}\n".encode(), durable=True)
        temps[".gpgsig"] = write_temp(snapdir / (LATEST + ".gpgsig"),
                                      src.with_name(src.name + ".gpgsig").read_bytes(), durable=True)
        temps[""] = _link_or_copy_temp(src, latest)
        _rename_side_files_first(temps, latest)
    finally:
        for t in temps.values():
            t.unlink(missing_ok=True)


def _link_or_copy_temp(src: Path, target: Path) -> Path:
    """A temporary name next to `target` for the content of `src`: a hard link (link() never follows or
    replaces what is at the new name), else a fsynced copy in a file from fsutil.create_temp."""
    tmp = temp_name(target)
    try:
        os.link(src, tmp)
        return tmp
    except OSError:
        pass
    fd, tmp = create_temp(target)
    try:
        with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def prune(snapdir: Path, keep: int) -> list[str]:
    """Remove all but the newest `keep` published days (never the one latest stands for)."""
    if keep <= 0:
        return []
    days = published_days(snapdir)
    protected = latest_day(snapdir)
    removed = []
    for day in days[:-keep]:
        if day == protected:
            continue
        name = snapshot_name(day)
        # The tarball goes first, so a client never finds it without its side files.
        for suffix in ("", *SIDE_SUFFIXES):
            p = snapdir / (name + suffix)
            if p.exists():
                p.unlink()
                removed.append(p.name)
        log.debug("pruned %s", name)  # the caller reports it
    if removed:
        fsync_dir(snapdir)
    return removed


def _clean_stale_temps(snapdir: Path) -> None:
    """Remove temporary files left by a publisher that died (we hold the lock: nobody else writes)."""
    for p in snapdir.iterdir():
        if is_temp(p.name) and p.is_file():
            log.debug("removing stale %s", p)
            p.unlink(missing_ok=True)


def select_tags(repository: Repository, names: list[str], *, all_tags: bool, published: set[date],
                keep: int, force: bool) -> tuple[list[Tag], list[str]]:
    """(tags to publish, tags skipped as already published)."""
    tags = repository.tags()
    if not tags:
        raise SnapshotterError(f"no snapshot tags in {repository.path}; run `snapshotter sync` first")
    if names and all_tags:
        raise SnapshotterError("give tags or --all, not both")
    if names:
        wanted = []
        for n in names:
            t = repository.find_tag(n)
            if t not in wanted:
                wanted.append(t)
    elif all_tags:
        wanted = list(tags)
        if keep > 0:  # only what survives pruning is worth compressing
            survivors = sorted({t.day for t in tags} | published)[-keep:]
            wanted = [t for t in tags if t.day in survivors]
    else:
        wanted = [tags[-1]]
    todo = [t for t in wanted if force or t.day not in published]
    skipped = [t.name for t in wanted if t not in todo]
    return sorted(todo, key=lambda t: t.day), skipped


def publish(repo: Path, opts: PublishOptions, tags: list[str] | None = None, *, all_tags: bool = False,
            force: bool = False, lock_wait: float = 0.0) -> PublishReport:
    """Publish `tags` (default: the newest; `all_tags`: every one not yet published) into `opts.out`.

    A tag whose tree cannot be published (SnapshotError: a name that is not UTF-8, a symlink out of the
    tree; tags that came from elsewhere or from an older version's import) fails a publish of that tag;
    with `all_tags` it is skipped with a warning, the other tags are published, gentoo-latest and pruning
    proceed, and PublishIncomplete (carrying the report) is raised at the end. Any other error (signing,
    xz, the disk) stops at once.

    Read-only on the repository: tags are resolved once, and refs move atomically in the importer, so a
    concurrent sync never shows a partial tree. Only one publisher works on an output directory at a
    time (flock; LockedError when busy).
    """
    if not opts.signing_key:
        raise SigningError("no signing key: set publish.signing_key or pass --signing-key FPR")
    opts.signing_key = signing_fingerprint(opts.signing_key)
    if not 0 <= opts.xz_level <= 9:
        raise SnapshotterError(f"xz level must be 0..9, got {opts.xz_level}")
    if opts.keep < 0 or opts.xz_threads < 0:
        raise SnapshotterError("keep and xz threads must not be negative")
    repository = Repository(repo).require()
    snapdir = opts.out / "snapshots"
    try:
        snapdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SnapshotterError(f"cannot create {snapdir}: {e.strerror}") from None
    os.close(open_dir(snapdir))  # a snapshots/ someone replaced with a symlink is refused (docs/security.md)
    report = PublishReport()
    with flocked(opts.out / LOCK_NAME, f"publishing into {opts.out}", wait=lock_wait):
        _clean_stale_temps(snapdir)
        todo, report.skipped = select_tags(repository, list(tags or []), all_tags=all_tags,
                                           published=set(published_days(snapdir)), keep=opts.keep, force=force)
        for tag in todo:
            try:
                report.published.append(publish_tag(repo, tag, opts))
            except SnapshotError as e:  # the tag's tree (a bad name, a link out of it): nothing was written
                if not all_tags:
                    raise SnapshotError(f"cannot publish {tag.name}: {e}") from None
                log.warning("skipping %s: cannot publish it: %s", tag.name, e)
                report.refused.append((tag.name, str(e)))
        days = published_days(snapdir)
        if days:
            update_latest(snapdir, days[-1])
            report.latest = f"{days[-1]:%Y-%m-%d}"
        report.pruned = prune(snapdir, opts.keep)
    if report.refused:
        raise PublishIncomplete(report)
    return report


def options_from_config(cfg: Config, **overrides: object) -> PublishOptions:
    """PublishOptions from `[publish]`, with non-None `overrides` (command-line flags) winning."""
    p = cfg.publish
    values: dict[str, object] = {
        "out": p.out, "signing_key": p.signing_key, "gnupghome": p.gnupghome, "keep": p.keep,
        "xz_level": p.xz_level, "xz_threads": p.xz_threads,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["out"] is None:
        raise SnapshotterError("no output directory: set publish.out or pass --out DIR")
    return PublishOptions(**values)  # type: ignore[arg-type]


def run_publish(cfg: Config, tags: list[str] | None = None, *, all_tags: bool = False, force: bool = False,
                **overrides: object) -> PublishReport:
    """Publish with the configuration's repository and [publish] settings (used by the service)."""
    return publish(cfg.repo, options_from_config(cfg, **overrides), tags, all_tags=all_tags, force=force)
