"""chroot.stage4: the same root gives the same bytes; owners by number, modes, xattrs and ACLs kept; none of
the excluded paths; a stage4 is never written through a symlink or over an existing file."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from chroot.errors import ChrootError
from chroot.stage import extract_stage
from chroot.stage4 import STAGE4_NAME, pack_root

MTIME = 1767225600  # 2026-01-01T00:00:00Z
# A POSIX access ACL (what setfacl -m u:1234:r- writes): version 2, then (tag, perm, id) entries.
_NOID = 0xFFFFFFFF
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, uid) for tag, perm, uid in (
    (0x01, 6, _NOID), (0x02, 4, 1234), (0x04, 4, _NOID), (0x10, 4, _NOID), (0x20, 4, _NOID)))

EXCLUDED = ["var/db/repos/gentoo/profiles/x", "var/db/repos/extra/metadata/layout.conf",
            "var/cache/binpkgs/app-misc/hello-1.gpkg.tar", "var/cache/distfiles/src.tar.gz", "etc/resolv.conf",
            "var/log/emerge.log", "var/log/emerge-fetch.log", "var/log/portage/build.log",
            "var/tmp/portage/app-misc/hello-1/temp/environment", "tmp/leftover", "proc/1/status",
            "dev/null-ish", "sys/kernel", "run/snapshotter-signing/gnupg/private-keys-v1.d/k.key"]
KEPT = ["etc/portage/make.conf", "etc/portage/gnupg/pubring.kbx", "usr/bin/hello", "var/db/pkg/app-misc/hello-1/CONTENTS",
        "var/lib/portage/world", "var/log/other.log", "var/tmp/keep"]


def make_root(root: Path) -> None:
    for rel in EXCLUDED + KEPT:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"{rel}\n")
    os.chown(root / "usr/bin/hello", 1234, 5678)
    (root / "usr/bin/hello").chmod(0o4755)  # after chown, which clears set-uid
    os.chown(root / "var/lib/portage", 250, 250)
    os.setxattr(root / "usr/bin/hello", "user.pax.flags", b"em")
    os.setxattr(root / "var/lib/portage/world", "system.posix_acl_access", ACL)
    os.symlink("hello", root / "usr/bin/hi")
    os.link(root / "usr/bin/hello", root / "usr/bin/hello-hardlink")


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path, "r:*") if not path.name.endswith(".zst") else _zst(path) as tf:
        return {m.name.removeprefix("./").rstrip("/"): m for m in tf.getmembers()}


def _zst(path: Path) -> tarfile.TarFile:
    raw = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    plain = path.with_name(path.name + ".tar")
    plain.write_bytes(raw)
    return tarfile.open(plain)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("owners by number need root")
    r = tmp_path / "root"
    r.mkdir()
    make_root(r)
    return r


def test_same_root_same_bytes_and_nothing_excluded(root: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    sha_a, size_a = pack_root(root, a / STAGE4_NAME, MTIME)
    # Reading the root changed atimes; touch mtimes and ctimes too: none of them may reach the bytes.
    time.sleep(0.01)
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                os.utime(p, (time.time(), time.time() + 3600))
                p.chmod(p.stat().st_mode)
    sha_b, size_b = pack_root(root, b / STAGE4_NAME, MTIME)
    assert (a / STAGE4_NAME).read_bytes() == (b / STAGE4_NAME).read_bytes()
    assert sha_a == sha_b == hashlib.sha256((a / STAGE4_NAME).read_bytes()).hexdigest()
    assert size_a == size_b == (a / STAGE4_NAME).stat().st_size
    # Another fixed time gives other bytes (the time is really in the archive).
    c = tmp_path / "c"
    c.mkdir()
    assert pack_root(root, c / STAGE4_NAME, MTIME + 1)[0] != sha_a

    names = members(a / STAGE4_NAME)
    for rel in EXCLUDED:
        assert rel not in names, rel
    assert not [n for n in names if n.startswith(("var/db/repos/", "var/cache/binpkgs/", "var/cache/distfiles/",
                                                  "var/log/portage", "var/tmp/portage", "run/snapshotter-signing",
                                                  "proc/", "dev/", "sys/", "tmp/"))], sorted(names)
    for rel in KEPT + ["proc", "dev", "sys", "tmp", "var/db/repos", "var/cache/binpkgs", "var/cache/distfiles"]:
        assert rel in names, rel
    assert all(m.mtime == MTIME for m in names.values())
    assert all(not m.uname and not m.gname for m in names.values())
    assert not [m.name for m in names.values() if "PaxHeaders." in m.name]
    hello = names["usr/bin/hello"]
    assert (hello.uid, hello.gid, hello.mode) == (1234, 5678, 0o4755)
    assert names["var/lib/portage"].uid == 250
    assert names["usr/bin/hi"].issym() and names["usr/bin/hi"].linkname == "hello"
    assert names["usr/bin/hello-hardlink"].islnk()
    assert hello.pax_headers.get("SCHILY.xattr.user.pax.flags") == "em"
    assert "user:1234:r--" in names["var/lib/portage/world"].pax_headers.get("SCHILY.acl.access", "")
    assert not [m.name for m in names.values() if {"atime", "ctime"} & set(m.pax_headers)]


def test_extracts_back_with_owners_and_xattrs(root: Path, tmp_path: Path) -> None:
    dest = tmp_path / STAGE4_NAME
    pack_root(root, dest, MTIME)
    back = tmp_path / "back"
    extract_stage(dest, back)  # the builder's own extraction: a stage4 seeds the next build
    st = os.lstat(back / "usr/bin/hello")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o4755)
    assert os.getxattr(back / "usr/bin/hello", "user.pax.flags") == b"em"
    assert os.getxattr(back / "var/lib/portage/world", "system.posix_acl_access") == ACL
    assert (back / "var/lib/portage/world").read_text() == "var/lib/portage/world\n"
    assert not (back / "etc/resolv.conf").exists() and not any((back / "var/db/repos").iterdir())


def test_never_replaces_or_follows_a_symlink(root: Path, tmp_path: Path) -> None:
    dest = tmp_path / STAGE4_NAME
    dest.write_text("someone else's\n")
    with pytest.raises(FileExistsError):
        pack_root(root, dest, MTIME)
    assert dest.read_text() == "someone else's\n"
    victim = tmp_path / "victim"
    victim.write_text("victim\n")
    link = tmp_path / "other" / STAGE4_NAME
    link.parent.mkdir()
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        pack_root(root, link, MTIME)
    assert victim.read_text() == "victim\n"
    assert sorted(p.name for p in link.parent.iterdir()) == [STAGE4_NAME]  # no temporary file left


def test_a_root_tar_cannot_read_fails_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(ChrootError, match="packing the stage4 of .* failed: tar exit 2"):
        pack_root(tmp_path / "missing", tmp_path / STAGE4_NAME, MTIME)
    assert not list(tmp_path.iterdir())
