"""Incremental builds: an earlier good build's packages reused by hard links.

The caller (the service) chose which package files of the base build to reuse (`Reuse.paths`); `seed`
puts them into the new build's empty packages/ before emerge runs, so that `emerge --usepkg` merges them
instead of building, and `summary` tells build.json afterwards which files were reused and which were built.

Every name is walked one directory at a time with O_NOFOLLOW: a symlink in the base build's packages/ (or
in the new one) is never followed, and a path that is absolute or has `..` is refused. A hard link keeps the
base's file as it is (same inode, no copy); where link(2) fails with EXDEV (the two builds on different file
systems) the file is copied instead, and the log says so once.

Portage trusts PKGDIR's `Packages` index (FEATURES=pkgdir-index-trusted, on by default since Portage 3.0.5x):
package files without an entry are not seen at all, so `--usepkg` would build everything again. `seed`
therefore also writes the new build's index: the base's, with the entries of the reused files only (the
same files, so their sizes, hashes and metadata are still right). emerge adds the packages it builds.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import Any

from chroot.errors import ChrootError
from chroot.spec import Reuse

log = logging.getLogger(__name__)

INDEX = "Packages"  # the index of PKGDIR: written anew for the reused packages, never linked
INDEX_GZ = "Packages.gz"  # its compressed copy (FEATURES=compress-index)


def check_path(rel: str) -> list[str]:
    """The components of a package path relative to a packages/ directory; ChrootError for an absolute
    path, `..`, `.`, an empty component or the `Packages` index."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in rel:
        raise ChrootError(f"incremental build: refusing package path {rel!r} (absolute, '..' or empty part)")
    if rel in (INDEX, INDEX_GZ):
        raise ChrootError("incremental build: the Packages index is never reused (Portage writes a new one)")
    return parts


def _open_dir(parent: int, name: str, *, create: bool = False) -> int:
    if create:
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:
            pass
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)


def _walk(top: Path, dirs: list[str], *, create: bool = False) -> int:
    """An fd of `top`/dirs..., each component opened without following a symlink."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for d in dirs:
            nxt = _open_dir(fd, d, create=create)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy(src_dir: int, dst_dir: int, name: str) -> None:
    """A copy of the regular file `name` (mode and mtime kept), for when it cannot be hard-linked."""
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise ChrootError(f"incremental build: {name} of the base build is not a regular file")
        dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      stat.S_IMODE(st.st_mode), dir_fd=dst_dir)
        try:
            while chunk := os.read(src, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view):]
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dst)
    finally:
        os.close(src)


def seed(reuse: Reuse, pkgdir: Path) -> None:
    """Hard-link `reuse.paths` from `reuse.base_packages` into the new build's (empty) `pkgdir`.

    A path that is missing in the base build now (purged meanwhile) or is not a regular file there is
    skipped with a warning: that package is built instead. A bad path (absolute, `..`) raises ChrootError.
    """
    linked = copied = 0
    skipped: list[str] = []
    for rel in sorted(set(reuse.paths)):
        *dirs, name = check_path(rel)
        try:
            src = _walk(reuse.base_packages, dirs)
        except (FileNotFoundError, NotADirectoryError):
            skipped.append(rel)
            continue
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink where a directory should be
                skipped.append(rel)
                continue
            raise
        try:
            try:
                st = os.stat(name, dir_fd=src, follow_symlinks=False)
            except FileNotFoundError:
                skipped.append(rel)
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped.append(rel)
                continue
            dst = _walk(pkgdir, dirs, create=True)
            try:
                try:
                    os.link(name, name, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
                    linked += 1
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    if not copied:
                        log.warning("incremental build: %s is on another file system than %s; the reused "
                                    "packages are copied, not hard-linked", pkgdir, reuse.base_packages)
                    _copy(src, dst, name)
                    copied += 1
            finally:
                os.close(dst)
        finally:
            os.close(src)
    write_index(reuse, pkgdir, set(reuse.paths) - set(skipped))
    if skipped:
        log.warning("incremental build: %d package file(s) of build %s are gone or not regular files and are "
                    "built instead: %s", len(skipped), reuse.base_build, ", ".join(skipped))
    log.info("incremental build: %d package file(s) of build %s reused (%d hard-linked, %d copied)",
             linked + copied, reuse.base_build, linked, copied)


def _entry_path(block: str) -> str | None:
    """The file of one entry of a Packages index: PATH, else CPV with the suffix Portage assumes (.tbz2)."""
    fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
    if "PATH" in fields:
        return fields["PATH"]
    return fields["CPV"] + ".tbz2" if "CPV" in fields else None


def filter_index(text: str, keep: set[str]) -> str:
    """The Packages index `text` with only the entries whose file is in `keep`, and its PACKAGES count set."""
    header, *blocks = text.split("\n\n")
    entries = [b.strip("\n") for b in blocks if b.strip("\n")]
    kept = [b for b in entries if _entry_path(b) in keep]
    head = [f"PACKAGES: {len(kept)}" if line.startswith("PACKAGES: ") else line for line in header.splitlines()]
    return "\n".join(head) + "\n\n" + "".join(b + "\n\n" for b in kept)


def _read_regular(top: Path, name: str) -> bytes | None:
    try:
        fd = os.open(top / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, OSError):
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read()


def _create(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_index(reuse: Reuse, pkgdir: Path, linked: set[str]) -> None:
    """`pkgdir`/Packages (and Packages.gz where the base has one): the base's index with only the entries of
    the `linked` files. Without a base index (nothing Portage would trust) nothing is written."""
    base = _read_regular(reuse.base_packages, INDEX)
    if base is None:
        log.warning("incremental build: build %s has no Packages index; Portage will not see the reused files",
                    reuse.base_build)
        return
    text = filter_index(base.decode("utf-8", errors="surrogateescape"), linked).encode("utf-8", "surrogateescape")
    _create(pkgdir / INDEX, text)
    if _read_regular(reuse.base_packages, INDEX_GZ) is not None:
        _create(pkgdir / INDEX_GZ, gzip.compress(text, mtime=0))


def _package_files(pkgdir: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(pkgdir):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            rel = Path(dirpath, name).relative_to(pkgdir).as_posix()
            if rel not in (INDEX, INDEX_GZ) and stat.S_ISREG(os.lstat(os.path.join(dirpath, name)).st_mode):
                out.append(rel)
    return sorted(out)


def _sha256(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _same(new: Path, old: Path) -> bool:
    try:
        a, b = os.lstat(new), os.lstat(old)
    except OSError:
        return False
    if not (stat.S_ISREG(a.st_mode) and stat.S_ISREG(b.st_mode)):
        return False
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    return a.st_size == b.st_size and _sha256(new) == _sha256(old)


def summary(reuse: Reuse, pkgdir: Path) -> dict[str, Any]:
    """build.json's `incremental`: {"base", "reused", "rebuilt"} for the finished `pkgdir`: each package file
    (the Packages index and Packages.gz aside) is reused when the base build has the same path with the same inode (a hard
    link) or the same sha256 (a copy), else rebuilt. Lists of paths relative to packages/, sorted."""
    reused, rebuilt = [], []
    base = reuse.base_packages
    for rel in _package_files(pkgdir):
        parts = rel.split("/")
        # The base's side is looked up without following symlinks in its directories either.
        old = base.joinpath(*parts)
        if all(not base.joinpath(*parts[:i]).is_symlink() for i in range(1, len(parts))) and _same(pkgdir / rel, old):
            reused.append(rel)
        else:
            rebuilt.append(rel)
    return {"base": reuse.base_build, "reused": reused, "rebuilt": rebuilt}
