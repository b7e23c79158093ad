"""Is a rebuild the same as its original? Compare two builds' packages by content (docs/build.md,
"Reproducibility check").

Two package directories are compared package by package. A package is named by its path below
`packages/` without the build number Portage gives each binary (`app-misc/hello/hello-1.0-1.gpkg.tar`
is `app-misc/hello/hello-1.0`): it is `identical`, `differs` (the differing files named), `missing` (in
the original only) or `extra` (in the rebuild only).

The rule (RULE, also written into every report): a gpkg is compared by what it installs and what it
says about itself, never by the bytes Portage makes fresh on every build:

  * the image (`image.tar.zst`) by its entries: path, kind, permission bits, owner (uid:gid), size and
    sha256 of a file's content, the target of a symlink or hard link; not by mtimes (the time of the
    build) nor by the compressed bytes;
  * the metadata (`metadata.tar.zst`) by the content of each entry (`environment.bz2` decompressed),
    except BUILD_TIME and BUILD_ID, which Portage sets on every build;
  * the gpkg's own members: `gpkg-1` by content; the signatures (`*.sig`) and the clearsigned `Manifest`
    (a signature and the digests of the compressed members, which change with them) are ignored; the
    top directory's name carries the build number and is ignored;
  * the `Packages` index is ignored (it repeats the metadata with the file's size, checksums and mtime);
  * any other file (an xpak `.tbz2`, say) is compared by its sha256.

This module reads archives as streams (tarfile, `zstd -dc`): nothing is extracted to disk.
"""

from __future__ import annotations

import bz2
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from snapshotter.errors import SnapshotterError

IDENTICAL = "identical"
DIFFERS = "differs"
MISSING = "missing"
EXTRA = "extra"

VOLATILE_METADATA = ("BUILD_TIME", "BUILD_ID")
IGNORED_MEMBERS = ("*.sig", "Manifest")
RULE = [
    "image.tar.zst: compared by entry (path, kind, permission bits, uid:gid, size, sha256 of content, "
    "link target); mtimes and the compressed bytes ignored",
    "metadata.tar.zst: compared by the content of each entry (environment.bz2 decompressed); "
    f"{' and '.join(VOLATILE_METADATA)} ignored",
    "gpkg members: gpkg-1 compared; signatures (*.sig) and the clearsigned Manifest ignored; the top "
    "directory's name (it carries the build number) ignored",
    "Packages index ignored (it repeats the metadata with the file's size, checksums and mtime)",
    "any other file: compared by sha256",
]
REPORT_FORMAT = 1
ZSTD_TIMEOUT = 600.0

_GPKG_RE = re.compile(r"^(?P<name>.+)-(?P<n>[0-9]+)\.gpkg\.tar$")


@dataclass
class PackageResult:
    package: str  # cat/pkg/pf (the path without the build number)
    status: str  # identical | differs | missing | extra
    original: str | None = None  # path below packages/
    rebuild: str | None = None
    differences: list[str] = field(default_factory=list)  # "usr/share/x: sha256 a -> b", "metadata/USE: ..."
    diffoscope: str | None = None  # the diffoscope output file, when it ran

    def to_dict(self) -> dict[str, Any]:
        return {"package": self.package, "status": self.status, "original": self.original,
                "rebuild": self.rebuild, "differences": self.differences, "diffoscope": self.diffoscope}


@dataclass
class Comparison:
    original: Path  # packages/ of the original build
    rebuild: Path
    packages: list[PackageResult]

    def count(self, status: str) -> int:
        return sum(1 for p in self.packages if p.status == status)

    @property
    def identical(self) -> bool:
        return all(p.status == IDENTICAL for p in self.packages)

    @property
    def exit_status(self) -> int:
        return 0 if self.identical else 1

    def summary(self) -> str:
        counts = ", ".join(f"{self.count(s)} {s}" for s in (IDENTICAL, DIFFERS, MISSING, EXTRA))
        return f"{len(self.packages)} packages: {counts}"

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "original": str(self.original), "rebuild": str(self.rebuild),
                "rule": RULE, "reproducible": self.identical,
                "summary": {s: self.count(s) for s in (IDENTICAL, DIFFERS, MISSING, EXTRA)},
                "packages": [p.to_dict() for p in self.packages]}

    def text(self) -> list[str]:
        """The report for a terminal: one line per package, then its differences indented."""
        lines = []
        for p in self.packages:
            lines.append(f"{p.status:9} {p.package}")
            lines += [f"          {d}" for d in p.differences]
            if p.diffoscope:
                lines.append(f"          diffoscope: {p.diffoscope}")
        return lines


def package_key(rel: str) -> str:
    """The package a file below packages/ is: its path without the gpkg's build number."""
    m = _GPKG_RE.match(rel)
    return m["name"] if m else rel


def package_files(pkgdir: Path) -> dict[str, str]:
    """package key -> path below `pkgdir` of every file except the Packages index (symlinks skipped)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(pkgdir):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(pkgdir).as_posix()
            if rel == "Packages" or rel == "Packages.gz" or full.is_symlink():
                continue
            key = package_key(rel)
            out[rel if key in out else key] = rel
    return out


def compare_dirs(original: Path, rebuild: Path, *, diffoscope_dir: Path | None = None) -> Comparison:
    """Compare two package directories (a build's packages/) by the rule above.

    With `diffoscope_dir` and diffoscope installed, each differing package's detail is written there
    (`<cat>_<pf>.diffoscope.txt`) and named in its result."""
    for d in (original, rebuild):
        if not d.is_dir():
            raise SnapshotterError(f"{d}: not a package directory")
    old, new = package_files(original), package_files(rebuild)
    results = []
    for key in sorted(old.keys() | new.keys()):
        if key not in new:
            results.append(PackageResult(key, MISSING, original=old[key]))
        elif key not in old:
            results.append(PackageResult(key, EXTRA, rebuild=new[key]))
        else:
            diffs = compare_files(original / old[key], rebuild / new[key])
            res = PackageResult(key, DIFFERS if diffs else IDENTICAL, old[key], new[key], diffs)
            if diffs and diffoscope_dir is not None:
                res.diffoscope = run_diffoscope(original / old[key], rebuild / new[key], diffoscope_dir, key)
            results.append(res)
    return Comparison(original, rebuild, results)


def compare_files(a: Path, b: Path) -> list[str]:
    """What differs between two files of a package directory, by the rule; [] when nothing does."""
    if a.name.endswith(".gpkg.tar") and b.name.endswith(".gpkg.tar"):
        return compare_gpkgs(a, b)
    sa, sb = _sha256_file(a), _sha256_file(b)
    return [] if sa == sb else [f"(whole file): sha256 {sa[:16]} -> {sb[:16]}"]


def compare_gpkgs(a: Path, b: Path) -> list[str]:
    try:
        ea, eb = gpkg_entries(a), gpkg_entries(b)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SnapshotterError(f"cannot read a package: {e}") from None
    return diff_entries(ea, eb)


def diff_entries(a: dict[str, str], b: dict[str, str]) -> list[str]:
    out = []
    for name in sorted(a.keys() | b.keys()):
        if name not in b:
            out.append(f"{name}: only in the original")
        elif name not in a:
            out.append(f"{name}: only in the rebuild")
        elif a[name] != b[name]:
            out.append(f"{name}: {a[name]} -> {b[name]}")
    return out


def gpkg_entries(path: Path) -> dict[str, str]:
    """A gpkg as the rule sees it: "metadata/NAME" and "image/PATH" (plus "gpkg-1") -> a description."""
    out: dict[str, str] = {}
    with tarfile.open(path, "r:") as outer, tempfile.TemporaryDirectory(prefix="snapshotter-compare-") as tmp:
        for member in outer.getmembers():
            if not member.isfile():
                continue
            base = member.name.split("/", 1)[-1]  # without the top directory (it carries the build number)
            if base.endswith(".sig") or base == "Manifest":
                continue
            src = outer.extractfile(member)
            if src is None:
                continue
            if base in ("metadata.tar.zst", "image.tar.zst"):
                part = base.split(".", 1)[0]
                tmpfile = Path(tmp) / base
                with open(tmpfile, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
                for name, desc in _zstd_tar_entries(tmpfile, metadata=part == "metadata"):
                    out[f"{part}/{name}"] = desc
                tmpfile.unlink()
            else:
                out[base] = f"sha256 {_sha256_stream(src)}"
    return out


def _zstd_tar_entries(path: Path, *, metadata: bool) -> Iterator[tuple[str, str]]:
    proc = subprocess.Popen(["zstd", "-dcq", "--", str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for m in tar:
                # Below the archive's top directory (metadata/, image/): "." for that directory itself.
                name = m.name.removeprefix("./").rstrip("/")
                name = name.split("/", 1)[1] if "/" in name else "."
                if metadata:
                    if not m.isfile():
                        continue
                    if name in VOLATILE_METADATA:
                        continue
                    f = tar.extractfile(m)
                    assert f is not None
                    if name.endswith(".bz2"):
                        yield name, f"sha256 {_sha256_stream(bz2.BZ2File(f))} (decompressed)"
                    else:
                        yield name, f"sha256 {_sha256_stream(f)}"
                else:
                    yield name, _describe_image_entry(tar, m)
    finally:
        proc.stdout.close()
        try:
            _, err = proc.communicate(timeout=ZSTD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SnapshotterError(f"zstd took longer than {ZSTD_TIMEOUT:.0f} s on {path.name}") from None
    if proc.returncode != 0:
        raise SnapshotterError(f"zstd cannot read {path.name}: {err.decode(errors='replace').strip()}")


def _describe_image_entry(tar: tarfile.TarFile, m: tarfile.TarInfo) -> str:
    owner = f"{m.uid}:{m.gid}"
    mode = f"{m.mode & 0o7777:04o}"
    if m.issym():
        return f"symlink -> {m.linkname} {owner}"
    if m.islnk():
        return f"hardlink -> {m.linkname.removeprefix('./')} {mode} {owner}"
    if m.isdir():
        return f"dir {mode} {owner}"
    if m.isfile():
        f = tar.extractfile(m)
        assert f is not None
        return f"file {mode} {owner} size {m.size} sha256 {_sha256_stream(f)}"
    return f"{'device' if m.isdev() else 'special'} type {m.type!r} {mode} {owner} {m.devmajor},{m.devminor}"


def _sha256_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(f)


DIFFOSCOPE_TIMEOUT = 600.0


def diffoscope_hint(a: Path, b: Path) -> str:
    """How to see a differing package's detail."""
    return f"diffoscope {a} {b}"


def run_diffoscope(a: Path, b: Path, out_dir: Path, key: str) -> str | None:
    """Run diffoscope on two packages when it is installed, its text into `out_dir`; the file's path, or
    None when diffoscope is not installed (or failed: its detail is optional)."""
    exe = shutil.which("diffoscope")
    if exe is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (key.replace("/", "_") + ".diffoscope.txt")
    try:
        proc = subprocess.run([exe, "--text", str(out), "--", str(a), str(b)], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=DIFFOSCOPE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None
    # diffoscope exits 1 when the files differ, 0 when they are the same: either way it wrote its text.
    return str(out) if proc.returncode in (0, 1) and out.exists() else None
