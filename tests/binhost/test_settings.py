"""The client settings tarball: make.conf without builder-only settings, package.* and env/ from
portage_confdir, repos.conf and binrepos.conf; deterministic bytes; refused when portage_confdir changed."""

from __future__ import annotations

import io
import lzma
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import binhostlib, testlib

from snapshotter.binhost import settings
from snapshotter.errors import SnapshotterError

COMMIT = "b" * 40
MTIME = 1768000000


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))) as tar:
        return {m.name: m for m in tar.getmembers()}


def content(data: bytes, name: str) -> str:
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))) as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read().decode()


def test_make_conf_loses_exactly_the_builder_only_settings() -> None:
    text = (
        '# comment kept\nCOMMON_FLAGS="-O2 -pipe"\nFEATURES="buildpkg\n  binpkg-signing"\n'
        "export PKGDIR=/var/cache/binpkgs\nDISTDIR='/var/cache/distfiles' # trailing comment\n"
        'PORTAGE_TMPDIR="/var/tmp"\nPORTAGE_ELOG_CLASSES="warn error"\nBINPKG_FORMAT="gpkg"\n'
        'BINPKG_GPG_SIGNING_KEY="ABC"\nPORTDIR="/var/db/repos/gentoo"\nUSE="ssl \\\n  -X"\n'
        'CFLAGS="${COMMON_FLAGS} \\"quoted\\" FEATURES=x"\nMAKEOPTS=-j4\n'
    )
    assert settings.client_make_conf(text) == (
        '# comment kept\nCOMMON_FLAGS="-O2 -pipe"\nPORTAGE_ELOG_CLASSES="warn error"\n'
        'USE="ssl \\\n  -X"\nCFLAGS="${COMMON_FLAGS} \\"quoted\\" FEATURES=x"\nMAKEOPTS=-j4\n')


def test_same_build_same_bytes_and_the_content(tmp_path: Path) -> None:
    site_confdir = tmp_path / "confdir"
    testlib.write_tree(site_confdir, {"package.use/b": "b/b x\n", "package.use/a": "a/a y", "package.mask": "x/y\n",
                                      "env/debug.conf": "CFLAGS=-g\n", "make.conf": "NOT=shipped\n",
                                      "package.use/link": ("symlink", "a")})
    build = binhostlib.write_build(tmp_path / "out", "basic", "2026-01-10", COMMIT, confdir=site_confdir,
                                   signing_key="C" * 40)
    first = settings.settings_tarball(build, MTIME)
    os.utime(site_confdir / "package.mask", (1, 1))  # times of the sources do not matter
    second = settings.settings_tarball(build, MTIME)
    assert first.data == second.data
    assert first.name == "portage_settings-20260110.tar.xz"
    m = members(first.data)
    assert list(m) == ["binrepos.conf", "binrepos.conf/snapshotter.conf", "env", "env/debug.conf", "make.conf",
                       "package.mask", "package.mask/snapshotter", "package.use", "package.use/snapshotter",
                       "repos.conf", "repos.conf/snapshotter.conf"]
    for info in m.values():
        assert (info.uid, info.gid, info.uname, info.gname, info.mtime) == (0, 0, "root", "root", MTIME)
        assert info.mode == (0o755 if info.isdir() else 0o644)
    mc = content(first.data, "make.conf")
    assert mc.endswith("\nsource /etc/portage/make.conf.local\n")
    assert 'USE="ssl -X"' in mc and 'COMMON_FLAGS="-O2 -pipe"' in mc and "LC_MESSAGES=C.utf8" in mc
    for var in ("FEATURES", "PKGDIR", "DISTDIR", "PORTAGE_TMPDIR", "BINPKG_FORMAT", "BINPKG_GPG_SIGNING_KEY",
                "BINPKG_GPG_SIGNING_GPG_HOME"):
        assert f"{var}=" not in mc, var
    pu = content(first.data, "package.use/snapshotter")
    assert pu.index("a/a y\n") < pu.index("b/b x\n")  # sorted, each file ends with a newline
    assert "# ---- package.use/a (portage_confdir) ----" in pu and "link" not in pu
    assert content(first.data, "env/debug.conf") == "CFLAGS=-g\n"
    binrepos = content(first.data, "binrepos.conf/snapshotter.conf")
    assert f"sync-uri = @SNAPSHOTTER_URL@/b/{build.id}/packages\n" in binrepos
    assert "verify-signature = true" in binrepos
    repos = content(first.data, "repos.conf/snapshotter.conf")
    assert "sync-type = webrsync" in repos and "sync-webrsync-verify-signature = yes" in repos
    assert "auto-sync = no" in repos and f"sync-openpgp-key-path = {settings.CLIENT_KEY_PATH}" in repos
    # Real tar reads it, as the client's update script will.
    out = tmp_path / "etc-portage"
    out.mkdir()
    (tmp_path / "s.tar.xz").write_bytes(first.data)
    subprocess.run(["tar", "-xJf", str(tmp_path / "s.tar.xz"), "-C", str(out)], check=True)
    assert (out / "package.mask" / "snapshotter").read_text().endswith("x/y\n")


def test_the_builds_portage_profile_is_the_clients_make_profile(tmp_path: Path) -> None:
    build = binhostlib.write_build(tmp_path / "out", "basic", "2026-01-10", COMMIT, portage_profile="default/x")
    data = settings.settings_tarball(build, MTIME).data
    link = members(data)["make.profile"]
    assert link.issym() and link.linkname == "../../var/db/repos/gentoo/profiles/default/x"
    assert (link.uid, link.mtime) == (0, MTIME)
    plain = binhostlib.write_build(tmp_path / "out", "basic", "2026-01-10", COMMIT)
    assert "make.profile" not in members(settings.settings_tarball(plain, MTIME).data)  # the stage's own stays


def test_a_build_of_another_tag_differs(tmp_path: Path) -> None:
    a = binhostlib.write_build(tmp_path / "out", "basic", "2026-01-10", COMMIT)
    b = binhostlib.write_build(tmp_path / "out", "basic", "2026-01-10", COMMIT)
    assert settings.settings_tarball(a, MTIME).data != settings.settings_tarball(b, MTIME).data  # the id is in it
    assert settings.settings_tarball(a, MTIME).data != settings.settings_tarball(a, MTIME + 1).data


def test_a_changed_confdir_is_refused(tmp_path: Path) -> None:
    confdir = tmp_path / "confdir"
    testlib.write_tree(confdir, {"package.use/a": "a/a y\n"})
    build = binhostlib.write_build(tmp_path / "out", "basic", "2026-01-10", COMMIT, confdir=confdir)
    (confdir / "package.use" / "a").write_text("a/a -y\n")
    with pytest.raises(SnapshotterError, match=r"portage_confdir .* changed since the build"):
        settings.settings_tarball(build, MTIME)
    (confdir / "package.use" / "a").unlink()
    (confdir / "package.use").rmdir()
    confdir.rmdir()
    with pytest.raises(SnapshotterError, match="no longer exists"):
        settings.settings_tarball(build, MTIME)
