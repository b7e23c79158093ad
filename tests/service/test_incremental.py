"""Incremental builds without Portage: the service's plan (which build is the base, which of its packages are
reused, when a full build is made instead and the one log line that says why) against real git trees and
build directories made the way the builder makes them; and chroot.incremental's seed (hard links, never
following a symlink, refusing bad paths, a copy across file systems) and summary.
(The real Portage builds: tests/chroot/test_incremental_portage.py.)"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import binhostlib, ebuild_repo, testlib

from chroot import incremental as chinc
from chroot import manifest as manifestmod
from chroot import portageconf
from chroot.errors import ChrootError
from chroot.spec import PortageSettings, Reuse, Signing
from snapshotter.binhost import builds
from snapshotter.config import parse_profile
from snapshotter.service import build as buildsvc
from snapshotter.service import incremental

TAGS = ("2026-01-01", "2026-01-02", "2026-01-03", "2026-01-09")
FPR = "0123456789ABCDEF0123456789ABCDEF01234567"
PKGS = [("app-misc/hello-1.0", "gentoo"), ("dev-libs/libfoo-1.0", "gentoo"), ("sys-apps/base-1", "gentoo")]


def path_of(cpv: str) -> str:
    cat, pf = cpv.split("/")
    return f"{cat}/{incremental.split_pf(pf)[0]}/{pf}-1.gpkg.tar"


def trees() -> list[tuple[str, dict]]:
    """Tag 1; tag 2: libfoo's ebuild changed; tag 3: eclass foo changed (no md5-cache); tag 4 (8 days after
    tag 1): as tag 1 plus an md5-cache that says hello inherits foo, and foo changed."""
    one = ebuild_repo.tree_files()
    one["eclass/foo.eclass"] = "# foo 1\n"
    two = dict(one)
    two["dev-libs/libfoo/libfoo-1.0.ebuild"] += "# changed\n"
    three = dict(two)
    three["eclass/foo.eclass"] = "# foo 2\n"
    return [(TAGS[0], one), (TAGS[1], two), (TAGS[2], three), (TAGS[3], dict(one))]


@pytest.fixture
def site(tmp_path):
    tags = ebuild_repo.git_repo_with_tags(tmp_path / "gentoo.git", trees())
    return {"base": tmp_path, "repo": tmp_path / "gentoo.git", "tags": tags, "output": tmp_path / "out"}


def profile(site, **table):
    (site["base"] / "stage3.tar.xz").touch()
    t = {"stage": str(site["base"] / "stage3.tar.xz"), "make_conf": {"USE": "ssl -X"}, "mode": "incremental", **table}
    return parse_profile("basic", t, site["base"])


def make_build(site, tag: str, *, pkgs=PKGS, ok: bool = True, mode: str = "full", base: str | None = None,
               **kw) -> builds.Build:
    """A finished build (binhostlib.write_build) with a Packages index as Portage writes it (CPV, REPO,
    PATH) and, for an incremental one, build.json's mode and incremental."""
    files = {path_of(cpv): binhostlib.gpkg(cpv, tag) for cpv, _ in pkgs}
    b = binhostlib.write_build(site["output"], "basic", tag, site["tags"][tag], ok=ok, packages=files,
                               repo=site["repo"], **kw)
    deps = {"app-misc/hello-1.0": "DEPEND: >=dev-libs/libfoo-1.0:0=[ssl?] !!app-misc/old\n"}
    index = f"PACKAGES: {len(pkgs)}\nVERSION: 0\n\n" + "".join(
        f"BUILD_ID: 1\nCPV: {cpv}\n{deps.get(cpv, '')}PATH: {path_of(cpv)}\nREPO: {repo}\nSIZE: 1\n\n"
        for cpv, repo in pkgs)
    (b.packages_dir / "Packages").write_text(index)
    if mode != "full" or kw.get("signing_key"):
        man = manifestmod.load(b.path / "build.json")
        if mode != "full":
            man.mode, man.incremental = mode, {"base": base, "reused": [], "rebuilt": []}
        if kw.get("signing_key"):  # the block as the builder writes it when it signs
            signing = Signing(gnupghome=site["base"], fingerprint=kw["signing_key"], public_key="")
            mc = binhostlib.STAGE_MAKE_CONF + portageconf.make_conf_block(
                PortageSettings(name="basic", make_conf={"USE": "ssl -X"}), signing)
            man.make_conf = {"content": mc, "sha256": manifestmod.sha256_text(mc)}
        (b.path / "build.json").unlink()
        manifestmod.write(man, b.path / "build.json")
    return builds.read_build(b.path)


def plan(site, prof, tag: str, *, incremental_: bool | None = None, signing: Signing | None = None,
         overlays: dict[str, str] | None = None, overlay_repos: dict[str, Path] | None = None,
         reverse_deps: bool = False):
    return incremental.plan(prof, buildsvc.portage_settings(prof), incremental=incremental_, output=site["output"],
                            repo=site["repo"], commit=site["tags"][tag], overlays=overlays or {}, signing=signing,
                            tag=tag, overlay_repos=overlay_repos, reverse_deps=reverse_deps)


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == incremental.__name__]


def test_full_mode_plans_full_builds_without_a_word(site, caplog):
    caplog.set_level(logging.INFO)
    make_build(site, TAGS[0])
    prof = profile(site, mode="full")
    settings, reuse = plan(site, prof, TAGS[1])
    assert reuse is None and settings == buildsvc.portage_settings(prof)
    assert lines(caplog) == []
    # --incremental overrides the profile's mode, --full an incremental profile's.
    assert plan(site, prof, TAGS[1], incremental_=True)[1] is not None
    assert plan(site, profile(site), TAGS[1], incremental_=False)[1] is None


def test_no_good_build_yet_is_a_full_build(site, caplog):
    caplog.set_level(logging.INFO)
    prof = profile(site)
    assert plan(site, prof, TAGS[0])[1] is None
    make_build(site, TAGS[0], ok=False)  # a failed build is never a base
    assert plan(site, prof, TAGS[1])[1] is None
    assert lines(caplog) == ["incremental: no good build yet; full build"] * 2


@pytest.mark.parametrize("change, key", [
    ({"make_conf": {"USE": "ssl"}}, "make_conf"),
    ({"make_conf": {"USE": "ssl -X", "CFLAGS": "-O3"}}, "make_conf"),
    ({"world": ["app-misc/hello"]}, "world"),
    ({"portage_profile": "default/linux/amd64/23.0"}, "portage_profile"),
    ({"stage_sha256": "1" * 64}, "stage"),
])
def test_changed_settings_make_a_full_build_naming_them(site, caplog, change, key):
    caplog.set_level(logging.INFO)
    make_build(site, TAGS[0])
    assert plan(site, profile(site, **change), TAGS[1])[1] is None
    assert lines(caplog) == [f"incremental: settings changed since {TAGS[0]}.1 ({key}); full build"]


def test_changed_confdir_and_signing_key_make_a_full_build(site, caplog):
    caplog.set_level(logging.INFO)
    confdir = site["base"] / "confdir"
    testlib.write_tree(confdir, {"package.use/x": "app-misc/hello -doc\n"})
    make_build(site, TAGS[0], confdir=confdir)
    prof = profile(site, portage_confdir=str(confdir))
    assert plan(site, prof, TAGS[1])[1] is not None  # the same confdir: incremental
    (confdir / "package.use/x").write_text("app-misc/hello doc\n")
    assert plan(site, prof, TAGS[1])[1] is None
    signing = Signing(gnupghome=site["base"], fingerprint=FPR, public_key="")
    (confdir / "package.use/x").write_text("app-misc/hello -doc\n")
    assert plan(site, prof, TAGS[1], signing=signing)[1] is None  # reused packages carry the base's signatures
    assert lines(caplog)[1:] == [f"incremental: settings changed since {TAGS[0]}.1 (portage_confdir); full build",
                                 f"incremental: settings changed since {TAGS[0]}.1 (make_conf, signing_key); full build"]


def test_signed_base_with_the_same_key_is_reused(site):
    make_build(site, TAGS[0], signing_key=FPR)
    signing = Signing(gnupghome=site["base"], fingerprint=FPR, public_key="")
    assert plan(site, profile(site), TAGS[1], signing=signing)[1] is not None


def test_the_changed_ebuild_is_built_and_the_rest_reused(site, caplog):
    caplog.set_level(logging.INFO)
    first = make_build(site, TAGS[0])
    prof = profile(site)
    settings, reuse = plan(site, prof, TAGS[1])
    assert reuse == Reuse(base_build=first.id, base_packages=first.packages_dir,
                          paths=[path_of("app-misc/hello-1.0"), path_of("sys-apps/base-1")])
    assert settings.emerge_args == ["--usepkg", "--binpkg-respect-use=y", "--binpkg-changed-deps=y",
                                    "--emptytree", "@world"]
    assert lines(caplog) == [f"incremental: on build {first.id}: reusing 2 of 3 packages; building again: "
                             "dev-libs/libfoo-1.0::gentoo (ebuild changed)"]
    # Reverse dependencies on request; options the profile already gives are not doubled.
    settings, _ = plan(site, profile(site, emerge_args=["--usepkg", "--emptytree", "@world"]), TAGS[1],
                       reverse_deps=True)
    assert settings.emerge_args == ["--binpkg-respect-use=y", "--binpkg-changed-deps=y", "--rebuild-if-unbuilt=y",
                                    "--usepkg", "--emptytree", "@world"]


def test_reverse_build_dependencies_are_built_too_when_asked(site, caplog):
    caplog.set_level(logging.INFO)
    make_build(site, TAGS[0])
    settings, reuse = plan(site, profile(site), TAGS[1], reverse_deps=True)
    assert reuse is not None and reuse.paths == [path_of("sys-apps/base-1")]
    assert "--rebuild-if-unbuilt=y" in settings.emerge_args
    assert lines(caplog)[-1].endswith("building again: app-misc/hello-1.0::gentoo (build-depends on dev-libs/libfoo), "
                                      "dev-libs/libfoo-1.0::gentoo (ebuild changed)")
    assert incremental.dep_names("|| ( >=a/b-1 c/d ) ssl? ( ~e/f-2:0/1[x] ) !!g/h::r =i/j-1* k/l:=") == \
        {"a/b", "c/d", "e/f", "g/h", "i/j", "k/l"}


def test_a_package_gone_from_the_tree_or_from_an_unknown_repository_is_not_reused(site, caplog):
    caplog.set_level(logging.INFO)
    make_build(site, TAGS[0], pkgs=[*PKGS, ("app-misc/hello-0.9", "gentoo"), ("app-misc/other-1", "elsewhere")])
    _, reuse = plan(site, profile(site), TAGS[0])
    assert reuse is not None and reuse.paths == sorted(path_of(c) for c, _ in PKGS)
    assert lines(caplog)[-1].endswith("reusing 3 of 5 packages; building again: app-misc/hello-0.9::gentoo (ebuild "
                                      "gone), app-misc/other-1::elsewhere (repository elsewhere not in this build)")


def test_an_eclass_change_without_md5_cache_is_a_full_build(site, caplog):
    caplog.set_level(logging.INFO)
    make_build(site, TAGS[1])
    assert plan(site, profile(site), TAGS[2])[1] is None
    assert lines(caplog) == ["incremental: eclass foo changed and gentoo has no metadata/md5-cache to tell which "
                             "packages inherit it; full build"]


def test_an_eclass_change_rebuilds_its_inheritors_per_md5_cache(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    one = ebuild_repo.tree_files()
    one["eclass/foo.eclass"] = "# foo 1\n"
    one["eclass/bar.eclass"] = "# bar\n"
    one["metadata/md5-cache/app-misc/hello-1.0"] = "EAPI=8\n_eclasses_=bar\t" + "1" * 32 + "\tfoo\t" + "2" * 32 + \
        "\n_md5_=" + "3" * 32 + "\n"
    one["metadata/md5-cache/dev-libs/libfoo-1.0"] = "EAPI=8\n_eclasses_=bar\t" + "1" * 32 + "\n_md5_=" + "4" * 32 + "\n"
    one["metadata/md5-cache/sys-apps/base-1"] = "EAPI=8\n_md5_=" + "5" * 32 + "\n"
    two = dict(one)
    two["eclass/foo.eclass"] = "# foo 2\n"
    tags = ebuild_repo.git_repo_with_tags(tmp_path / "gentoo.git", [(TAGS[0], one), (TAGS[1], two)])
    site = {"base": tmp_path, "repo": tmp_path / "gentoo.git", "tags": tags, "output": tmp_path / "out"}
    make_build(site, TAGS[0])
    _, reuse = plan(site, profile(site), TAGS[1])
    assert reuse is not None and reuse.paths == [path_of("dev-libs/libfoo-1.0"), path_of("sys-apps/base-1")]
    assert lines(caplog)[-1].endswith("building again: app-misc/hello-1.0::gentoo (eclass changed)")


def test_the_weekly_full_build(site, caplog):
    caplog.set_level(logging.INFO)
    first = make_build(site, TAGS[0])
    second = make_build(site, TAGS[1], mode="incremental", base=first.id)
    # Tag 4 is 8 days after the full build the chain started from (tag 2's build is incremental).
    assert plan(site, profile(site), TAGS[3])[1] is None
    assert lines(caplog) == [f"incremental: last full build {first.id} is 8 days old; full build"]
    _, reuse = plan(site, profile(site, full_every_days=9), TAGS[3])
    assert reuse is not None and reuse.base_build == second.id
    assert plan(site, profile(site, full_every_days=0), TAGS[3])[1] is not None  # 0: never
    # A chain whose full build was purged: its age is unknown, so full.
    shutil.rmtree(first.path)
    caplog.clear()
    assert plan(site, profile(site), TAGS[2])[1] is None
    assert lines(caplog) == [f"incremental: the full build that {second.id} goes back to is gone (purged); full build"]


def test_an_overlay_change_rebuilds_its_packages(site, caplog):
    caplog.set_level(logging.INFO)
    ov = site["base"] / "overlay.git"
    ov_tags = ebuild_repo.git_repo_with_tags(ov, [("v1", ebuild_repo.overlay_files("1.0")),
                                                  ("v2", ebuild_repo.overlay_files("1.0") | {
                                                      "app-misc/extra/files/patch": "x\n"})])
    pkgs = [*PKGS, ("app-misc/extra-1.0", "extra")]
    make_build(site, TAGS[0], pkgs=pkgs, overlays=[{"name": "extra", "url": "u", "ref": "v1", "commit": ov_tags["v1"]}])
    _, reuse = plan(site, profile(site), TAGS[0], overlays={"extra": ov_tags["v1"]}, overlay_repos={"extra": ov})
    assert reuse is not None and reuse.paths == sorted(path_of(c) for c, _ in pkgs)  # nothing changed
    _, reuse = plan(site, profile(site), TAGS[0], overlays={"extra": ov_tags["v2"]}, overlay_repos={"extra": ov})
    assert reuse is not None and reuse.paths == sorted(path_of(c) for c, _ in PKGS)
    assert lines(caplog)[-1].endswith("building again: app-misc/extra-1.0::extra (ebuild changed)")
    # A base commit the overlay's repository no longer has: full.
    assert plan(site, profile(site), TAGS[0], overlays={"extra": ov_tags["v2"]},
                overlay_repos={"extra": site["repo"]})[1] is None
    assert lines(caplog)[-1] == (f"incremental: the base build's commit {ov_tags['v1'][:12]} of overlay extra is not "
                                 f"in {site['repo']}; full build")


def test_split_pf():
    assert incremental.split_pf("hello-1.0-r1") == ("hello", "1.0-r1")
    assert incremental.split_pf("foo-bar-2.3a_p1_rc2") == ("foo-bar", "2.3a_p1_rc2")
    assert incremental.split_pf("libfoo-1.0") == ("libfoo", "1.0")
    for bad in ("hello", "1.0", "hello-x"):
        with pytest.raises(ValueError):
            incremental.split_pf(bad)


# ---- chroot.incremental: seed and summary ----

def base_packages(tmp_path: Path) -> Path:
    base = tmp_path / "base" / "packages"
    index = "PACKAGES: 3\nVERSION: 0\n\n" + "".join(
        f"CPV: {cpv}\nPATH: {path}\n\n" for cpv, path in (
            ("app-misc/hello-1.0", "app-misc/hello/hello-1.0-1.gpkg.tar"), ("app-misc/gone-1", "app-misc/gone/gone-1-1.gpkg.tar"),
            ("sys-apps/b-1", "sys-apps/b/b-1-1.gpkg.tar")))
    testlib.write_tree(base, {"app-misc/hello/hello-1.0-1.gpkg.tar": "hello\n", "sys-apps/b/b-1-1.gpkg.tar": "b\n",
                              "Packages": index, "Packages.gz": b"gz"})
    return base


def test_seed_hard_links_and_summary_tells_reused_from_rebuilt(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    base = base_packages(tmp_path)
    new = tmp_path / "new" / "packages"
    new.mkdir(parents=True)
    reuse = Reuse("2026-01-01.1", base, ["app-misc/hello/hello-1.0-1.gpkg.tar", "sys-apps/b/b-1-1.gpkg.tar",
                                         "app-misc/gone/gone-1-1.gpkg.tar"])
    chinc.seed(reuse, new)
    for rel in ("app-misc/hello/hello-1.0-1.gpkg.tar", "sys-apps/b/b-1-1.gpkg.tar"):
        assert os.stat(new / rel).st_ino == os.stat(base / rel).st_ino
    assert not (new / "app-misc/gone").exists()
    # The index Portage trusts: the base's, with the entries of the linked files only.
    assert (new / "Packages").read_text() == (
        "PACKAGES: 2\nVERSION: 0\n\nCPV: app-misc/hello-1.0\nPATH: app-misc/hello/hello-1.0-1.gpkg.tar\n\n"
        "CPV: sys-apps/b-1\nPATH: sys-apps/b/b-1-1.gpkg.tar\n\n")
    assert gzip.decompress((new / "Packages.gz").read_bytes()) == (new / "Packages").read_bytes()
    assert any("gone or not regular files and are built instead: app-misc/gone/gone-1-1.gpkg.tar" in m
               for m in caplog.messages)
    # Portage built b again (a new file in its place) and a new package; a copy with the same bytes counts as reused.
    (new / "sys-apps/b/b-1-1.gpkg.tar").unlink()
    (new / "sys-apps/b/b-1-1.gpkg.tar").write_text("b rebuilt\n")
    (new / "app-misc/new").mkdir()
    (new / "app-misc/new/new-1-1.gpkg.tar").write_text("new\n")
    (new / "Packages").write_text("PACKAGES: 3\n\n")  # as emerge rewrites it
    assert chinc.summary(reuse, new) == {"base": "2026-01-01.1", "reused": ["app-misc/hello/hello-1.0-1.gpkg.tar"],
                                         "rebuilt": ["app-misc/new/new-1-1.gpkg.tar", "sys-apps/b/b-1-1.gpkg.tar"]}
    (new / "sys-apps/b/b-1-1.gpkg.tar").unlink()
    (new / "sys-apps/b/b-1-1.gpkg.tar").write_text("b\n")
    assert chinc.summary(reuse, new)["reused"] == ["app-misc/hello/hello-1.0-1.gpkg.tar", "sys-apps/b/b-1-1.gpkg.tar"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../base/packages/x", "a/../../x", "a//b", "Packages", "Packages.gz", ""])
def test_seed_refuses_absolute_dotdot_and_the_index(tmp_path, bad):
    base = base_packages(tmp_path)
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(ChrootError, match="incremental build"):
        chinc.seed(Reuse("2026-01-01.1", base, [bad]), new)
    assert list(new.iterdir()) == []


def test_seed_never_follows_a_symlink(tmp_path):
    base = base_packages(tmp_path)
    secret = tmp_path / "secret"
    testlib.write_tree(secret, {"key": "secret\n"})
    (base / "evil").symlink_to(secret)  # a directory link
    (base / "app-misc/hello/link-1-1.gpkg.tar").symlink_to(secret / "key")  # a file link
    new = tmp_path / "new"
    new.mkdir()
    (new / "app-misc").symlink_to(secret)  # a link planted on the new side
    chinc.seed(Reuse("2026-01-01.1", base, ["evil/key", "app-misc/hello/link-1-1.gpkg.tar", "sys-apps/b/b-1-1.gpkg.tar"]),
               new)
    assert sorted(p.name for p in secret.iterdir()) == ["key"]
    assert not (new / "evil").exists() and (new / "sys-apps/b/b-1-1.gpkg.tar").is_file()
    with pytest.raises(OSError):  # the planted link is not followed: nothing is linked into `secret`
        chinc.seed(Reuse("2026-01-01.1", base, ["app-misc/hello/hello-1.0-1.gpkg.tar"]), new)
    assert sorted(p.name for p in secret.iterdir()) == ["key"]


def test_seed_copies_across_file_systems_and_says_so(tmp_path, caplog):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    caplog.set_level(logging.INFO)
    base = base_packages(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(other)], check=True)
    try:
        new = other / "packages"
        new.mkdir()
        reuse = Reuse("2026-01-01.1", base, ["app-misc/hello/hello-1.0-1.gpkg.tar"])
        chinc.seed(reuse, new)
        copy, orig = new / "app-misc/hello/hello-1.0-1.gpkg.tar", base / "app-misc/hello/hello-1.0-1.gpkg.tar"
        assert copy.read_bytes() == orig.read_bytes() and os.stat(copy).st_ino != os.stat(orig).st_ino
        assert os.stat(copy).st_mtime_ns == os.stat(orig).st_mtime_ns
        assert any("on another file system" in m and "copied, not hard-linked" in m for m in caplog.messages)
        assert chinc.summary(reuse, new)["reused"] == ["app-misc/hello/hello-1.0-1.gpkg.tar"]
    finally:
        subprocess.run(["umount", str(other)], check=True)


def test_build_json_records_the_mode(tmp_path):
    """The `incremental` summary round-trips through build.json (chroot.manifest)."""
    man = manifestmod.Manifest(profile="p", tag="2026-01-01", commit="c" * 40, repo="/r", stage={}, overlays=[],
                               portage_profile=None, make_conf=None, portage_confdir=None, repos_conf="", world=None,
                               emerge_command=["emerge"], mode="incremental",
                               incremental={"base": "2025-12-31.1", "reused": ["a"], "rebuilt": []})
    manifestmod.write(man, tmp_path / "build.json")
    data = json.loads((tmp_path / "build.json").read_text())
    assert data["mode"] == "incremental" and data["incremental"]["base"] == "2025-12-31.1"


def test_cli_refuses_reverse_deps_with_a_full_build(site):
    r = testlib.run_cli("build", "--profile", "basic", "--full", "--rebuild-reverse-deps")
    testlib.one_error(r, "--rebuild-reverse-deps", "--full")
    r = testlib.run_cli("build", "--help")
    assert "--incremental / --full" in r.stdout and "--rebuild-reverse-deps" in r.stdout
