"""The root's Portage configuration as the builder writes it: exact, deterministic, never through symlinks;
build.json's package listing; and the documented example profile."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path

import pytest
from helpers import testlib

from chroot import manifest, portageconf
from chroot.errors import ChrootError
from snapshotter import fsutil
from snapshotter.config import parse_profile
from snapshotter.service.build import portage_settings


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    testlib.write_tree(r, {"etc/portage/make.conf": 'COMMON_FLAGS="-O2"\nCHOST="x86_64-pc-linux-gnu"',
                           "var/db/repos/gentoo/profiles/default/eapi": "8\n",
                           "etc/portage/make.profile": ("symlink", "/somewhere/else")})
    (tmp_path / "stage.tar.xz").write_bytes(b"")
    return r


def profile(tmp_path, **kw):
    return portage_settings(parse_profile("basic", {"stage": str(tmp_path / "stage.tar.xz"), **kw}, tmp_path))


def test_make_conf_appended_exactly(tmp_path, root):
    p = profile(tmp_path, make_conf={"USE": ["ssl", "-X"], "CFLAGS": '${COMMON_FLAGS} -march="x86-64"'})
    content = portageconf.write_make_conf(root, p)
    assert content == (
        'COMMON_FLAGS="-O2"\nCHOST="x86_64-pc-linux-gnu"\n'
        "# ---- written by snapshotter build (profile basic); later assignments win ----\n"
        'FEATURES="buildpkg cgroup ipc-sandbox network-sandbox parallel-fetch"\n'
        'PKGDIR="/var/cache/binpkgs"\n'
        'DISTDIR="/var/cache/distfiles"\n'
        'CFLAGS="${COMMON_FLAGS} -march=\\"x86-64\\""\n'
        'USE="ssl -X"\n')
    assert (root / "etc/portage/make.conf").read_text() == content
    # Same profile, same stage: same bytes.
    root2 = tmp_path / "root2"
    testlib.write_tree(root2, {"etc/portage/make.conf": 'COMMON_FLAGS="-O2"\nCHOST="x86_64-pc-linux-gnu"'})
    assert portageconf.write_make_conf(root2, p) == content


def test_make_conf_never_written_through_symlink(tmp_path, root):
    outside = tmp_path / "host-make.conf"
    outside.write_text("host\n")
    (root / "etc/portage/make.conf").unlink()
    (root / "etc/portage/make.conf").symlink_to(outside)
    with pytest.raises(ChrootError, match="symlink"):
        portageconf.write_make_conf(root, profile(tmp_path))
    assert outside.read_text() == "host\n"


def test_repos_conf(root):
    text = portageconf.write_repos_conf(root, ["extra", "company"])
    assert text == ("[DEFAULT]\nmain-repo = gentoo\n\n[gentoo]\nlocation = /var/db/repos/gentoo\n\n"
                    "[extra]\nlocation = /var/db/repos/extra\n\n[company]\nlocation = /var/db/repos/company\n")
    assert (root / "etc/portage/repos.conf/zz-snapshotter.conf").read_text() == text


def test_repos_conf_replaces_a_file(root):
    (root / "etc/portage/repos.conf").write_text("[gentoo]\nsync-uri = rsync://x\n")
    portageconf.write_repos_conf(root, [])
    assert (root / "etc/portage/repos.conf").is_dir()


def test_make_profile(root):
    portageconf.set_make_profile(root, "default", root / "var/db/repos/gentoo")
    link = root / "etc/portage/make.profile"
    assert link.readlink() == Path("../../var/db/repos/gentoo/profiles/default")
    assert link.resolve() == (root / "var/db/repos/gentoo/profiles/default").resolve()
    with pytest.raises(ChrootError, match="no such profile directory"):
        portageconf.set_make_profile(root, "default/linux/amd64/23.0", root / "var/db/repos/gentoo")


def test_world_and_sets(root):
    portageconf.write_world(root, ["app-misc/hello", "@company", ">=dev-libs/libfoo-1"])
    assert (root / "var/lib/portage/world").read_text() == "app-misc/hello\n>=dev-libs/libfoo-1\n"
    assert (root / "var/lib/portage/world_sets").read_text() == "@company\n"


def test_resolv_conf_replaces_symlink_without_following(tmp_path, root):
    target = tmp_path / "host-resolv"
    target.write_text("untouched\n")
    (root / "etc/resolv.conf").symlink_to(target)
    host = tmp_path / "resolv.conf"
    host.write_text("nameserver 127.0.0.1\n")
    portageconf.copy_resolv_conf(root, host)
    assert not (root / "etc/resolv.conf").is_symlink()
    assert (root / "etc/resolv.conf").read_text() == "nameserver 127.0.0.1\n"
    assert target.read_text() == "untouched\n"


def test_confdir_copy_and_hash(tmp_path, root):
    conf = tmp_path / "confdir"
    testlib.write_tree(conf, {"package.use/ssl": "dev-libs/openssl -bindist\n",
                              "env/debug.conf": "FEATURES=splitdebug\n", "make.profile": ("symlink", "x")})
    h1 = fsutil.tree_hash(conf)
    portageconf.copy_confdir(conf, root)
    assert (root / "etc/portage/package.use/ssl").read_text() == "dev-libs/openssl -bindist\n"
    assert (root / "etc/portage/make.profile").readlink() == Path("x")
    assert (root / "etc/portage/make.conf").exists()  # the stage's files not in the confdir stay
    assert fsutil.tree_hash(conf) == h1
    (conf / "env/debug.conf").chmod(0o600)
    h2 = fsutil.tree_hash(conf)
    (conf / "env/debug.conf").write_text("FEATURES=nostrip\n")
    h3 = fsutil.tree_hash(conf)
    assert len({h1, h2, h3}) == 3


def test_list_packages(tmp_path):
    pk = tmp_path / "packages"
    testlib.write_tree(pk, {"Packages": "idx\n", "Packages.gz": b"\x1f\x8b", "app-misc/a/a-1-1.gpkg.tar": "a",
                            "sys-apps/b/b-2-1.gpkg.tar": "bb"})
    pkgs, index = manifest.list_packages(pk)
    assert [p["path"] for p in pkgs] == ["Packages.gz", "app-misc/a/a-1-1.gpkg.tar", "sys-apps/b/b-2-1.gpkg.tar"]
    assert pkgs[2] == {"path": "sys-apps/b/b-2-1.gpkg.tar", "sha256": hashlib.sha256(b"bb").hexdigest(), "size": 2}
    assert index == {"sha256": hashlib.sha256(b"idx\n").hexdigest(), "size": 4}


def test_manifest_json_is_stable(tmp_path):
    m = manifest.Manifest(profile="p", tag="2026-01-01", commit="c" * 40, repo="/r", stage={"source": "s", "sha256": "x"},
                          overlays=[], portage_profile=None, make_conf={"content": "", "sha256": ""},
                          portage_confdir=None, repos_conf="", world=None, emerge_command=["emerge"])
    manifest.write(m, tmp_path / "build.json")
    text = (tmp_path / "build.json").read_text()
    assert text == m.to_json() and list(json.loads(text)) == sorted(json.loads(text))
    assert manifest.load(tmp_path / "build.json") == m  # one format, read back as written
    with pytest.raises(ValueError, match="unknown keys"):
        manifest.Manifest.from_json(text.replace('"ok"', '"okay"'))


def test_manifest_is_never_written_through_a_planted_symlink(tmp_path):
    m = manifest.Manifest(profile="p", tag="2026-01-01", commit="c" * 40, repo="/r", stage={"source": "s", "sha256": "x"},
                          overlays=[], portage_profile=None, make_conf={"content": "", "sha256": ""},
                          portage_confdir=None, repos_conf="", world=None, emerge_command=["emerge"])
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "build.json").symlink_to(victim)
    with pytest.raises(FileExistsError):
        manifest.write(m, tmp_path / "build.json")  # created exclusively in the fresh staging directory
    assert victim.read_text() == "untouched"


def test_documented_example_profile_parses(tmp_path):
    """The commented [profiles.basic] of examples/snapshotter.toml is valid once uncommented."""
    text = (testlib.REPO_ROOT / "examples/snapshotter.toml").read_text()
    start = text.index("# [profiles.basic]")
    lines = []
    for line in text[start:].splitlines():  # the commented block, up to the next non-comment line
        if not line.startswith("#"):
            break
        lines.append(re.sub(r"^# ?", "", line))
    data = tomllib.loads("\n".join(lines).replace("<64 hex digits>", "0" * 64))
    table = data["profiles"]["basic"]
    (tmp_path / "stage3.tar.xz").write_bytes(b"")
    (tmp_path / "confdir").mkdir()
    (tmp_path / "overlay").mkdir()
    table["stage"] = str(tmp_path / "stage3.tar.xz")
    table["portage_confdir"] = str(tmp_path / "confdir")
    p = parse_profile("basic", table, tmp_path)
    assert p.overlays[0].name == "company" and p.make_conf["USE"] == "ssl -X"
    assert p.emerge_args == ["--emptytree", "@world"]
