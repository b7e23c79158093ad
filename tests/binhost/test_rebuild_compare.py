"""The reproducibility check without Portage: binhost.compare on gpkgs made with the real tar and zstd (the
layout Portage writes: gpkg-1, metadata.tar.zst, image.tar.zst, their .sig files and a Manifest), and
`snapshotter rebuild` refusing what it cannot pin (one line, nothing built). The real rebuild of a real
build is in tests/chroot/test_rebuild_portage.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import binhostlib, testlib

from snapshotter.binhost import compare

BASE_META = {"CATEGORY": "app-misc\n", "PF": "hello-1.0\n", "USE": "amd64\n", "SLOT": "0\n",
             "BUILD_ID": "1\n", "BUILD_TIME": "1767225600\n", "SIZE": "25\n"}
BASE_IMAGE = {"usr/bin/hello": ("#!/bin/sh\necho hello\n", 0o755), "usr/share/hello/data": ("data\n", 0o644)}


def _tar_zst(src: Path, top: str, dest: Path, mtime: str) -> None:
    subprocess.run(["tar", "--zstd", "-C", str(src), "--mtime", mtime, "--owner=0", "--group=0", "--numeric-owner",
                    "-cf", str(dest), top], check=True, capture_output=True)


def make_gpkg(dest: Path, *, pf: str = "hello-1.0", n: int = 1, meta: dict[str, str] | None = None,
              image: dict[str, tuple[str, int]] | None = None, links: dict[str, str] | None = None,
              stamp: str = "2026-01-01 00:00:00", sig: bytes = b"signature 1") -> Path:
    """A gpkg as Portage lays it out, built with tar and zstd. `stamp` is every member's mtime (a build's
    time); `sig` the content of the signatures and of the Manifest (what a new signature changes)."""
    work = dest.parent / f".work-{dest.name}"
    top = work / f"{pf}-{n}"
    (top).mkdir(parents=True)
    md = work / "m" / "metadata"
    md.mkdir(parents=True)
    for name, text in (meta or BASE_META).items():
        (md / name).write_text(text)
    im = work / "i" / "image"
    im.mkdir(parents=True)
    for rel, (text, mode) in (image or BASE_IMAGE).items():
        (im / rel).parent.mkdir(parents=True, exist_ok=True)
        (im / rel).write_text(text)
        (im / rel).chmod(mode)
    for rel, target in (links or {}).items():
        (im / rel).parent.mkdir(parents=True, exist_ok=True)
        (im / rel).symlink_to(target)
    (top / "gpkg-1").write_bytes(b"")
    _tar_zst(work / "m", "metadata", top / "metadata.tar.zst", stamp)
    _tar_zst(work / "i", "image", top / "image.tar.zst", stamp)
    for name in ("metadata.tar.zst.sig", "image.tar.zst.sig", "Manifest"):
        (top / name).write_bytes(sig + name.encode())
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(work), "--mtime", stamp, "-cf", str(dest), top.name], check=True)
    subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=True)
    return dest


def later(meta: dict[str, str] | None = None, **changes: str) -> dict[str, str]:
    return {**(meta or BASE_META), "BUILD_TIME": "1767229999\n", **changes}


def two_dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "a" / "packages", tmp_path / "b" / "packages"


def test_same_content_built_at_another_time_with_new_signatures_is_identical(tmp_path):
    a, b = two_dirs(tmp_path)
    make_gpkg(a / "app-misc/hello/hello-1.0-1.gpkg.tar")
    # Another build: another BUILD_TIME, BUILD_ID (and file name number), mtimes, signatures and Manifest.
    make_gpkg(b / "app-misc/hello/hello-1.0-2.gpkg.tar", n=2, meta=later(BUILD_ID="2\n"),
              stamp="2026-03-04 05:06:07", sig=b"another signature")
    (a / "Packages").write_text("BUILD_TIME: 1\n")
    (b / "Packages").write_text("BUILD_TIME: 2\n")
    assert (a / "app-misc/hello/hello-1.0-1.gpkg.tar").read_bytes() != (b / "app-misc/hello/hello-1.0-2.gpkg.tar").read_bytes()
    c = compare.compare_dirs(a, b)
    assert [(p.package, p.status, p.differences) for p in c.packages] == [
        ("app-misc/hello/hello-1.0", "identical", [])]
    assert c.identical and c.exit_status == 0
    assert c.summary() == "1 packages: 1 identical, 0 differs, 0 missing, 0 extra"
    data = c.to_dict()
    assert data["reproducible"] is True and data["rule"] == compare.RULE
    assert any("BUILD_TIME" in r for r in data["rule"]) and any("*.sig" in r for r in data["rule"])


def test_a_changed_file_a_mode_a_link_and_metadata_are_named(tmp_path):
    a, b = two_dirs(tmp_path)
    make_gpkg(a / "app-misc/hello/hello-1.0-1.gpkg.tar", links={"usr/lib/hello.so": "hello.so.1"})
    image = {"usr/bin/hello": ("#!/bin/sh\necho hello\n", 0o700),  # mode changed
             "usr/share/hello/data": ("data built at 12:00\n", 0o644),  # content changed
             "usr/share/hello/new": ("new\n", 0o644)}  # only in the rebuild
    make_gpkg(b / "app-misc/hello/hello-1.0-1.gpkg.tar", meta=later(USE="amd64 ssl\n"), image=image,
              links={"usr/lib/hello.so": "hello.so.2"})
    c = compare.compare_dirs(a, b)
    assert [(p.package, p.status) for p in c.packages] == [("app-misc/hello/hello-1.0", "differs")]
    diffs = c.packages[0].differences
    named = [d.split(":", 1)[0] for d in diffs]
    assert named == ["image/usr/bin/hello", "image/usr/lib/hello.so", "image/usr/share/hello/data",
                     "image/usr/share/hello/new", "metadata/USE"], diffs
    assert "0755" in diffs[0] and "0700" in diffs[0]
    assert "hello.so.1" in diffs[1] and "hello.so.2" in diffs[1]
    assert diffs[3].endswith("only in the rebuild")
    assert not c.identical and c.exit_status == 1
    text = "\n".join(c.text())
    assert "differs   app-misc/hello/hello-1.0" in text and "image/usr/share/hello/data" in text


def test_missing_and_extra_packages_and_other_files(tmp_path):
    a, b = two_dirs(tmp_path)
    make_gpkg(a / "app-misc/hello/hello-1.0-1.gpkg.tar")
    make_gpkg(b / "app-misc/hello/hello-1.0-1.gpkg.tar", meta=later())
    make_gpkg(a / "app-misc/gone/gone-1-1.gpkg.tar", pf="gone-1")
    make_gpkg(b / "app-misc/new/new-2-1.gpkg.tar", pf="new-2")
    (a / "dev-libs/old").mkdir(parents=True)
    (a / "dev-libs/old/old-1.tbz2").write_bytes(b"xpak one")
    (b / "dev-libs/old").mkdir(parents=True)
    (b / "dev-libs/old/old-1.tbz2").write_bytes(b"xpak two")
    c = compare.compare_dirs(a, b)
    assert [(p.package, p.status) for p in c.packages] == [
        ("app-misc/gone/gone-1", "missing"), ("app-misc/hello/hello-1.0", "identical"),
        ("app-misc/new/new-2", "extra"), ("dev-libs/old/old-1.tbz2", "differs")]
    assert c.packages[0].original == "app-misc/gone/gone-1-1.gpkg.tar" and c.packages[0].rebuild is None
    assert c.packages[3].differences[0].startswith("(whole file): sha256")
    assert c.summary() == "4 packages: 1 identical, 1 differs, 1 missing, 1 extra"
    assert c.exit_status == 1


def test_a_package_that_is_not_a_gpkg_is_one_error_line(tmp_path):
    a, b = two_dirs(tmp_path)
    make_gpkg(a / "app-misc/hello/hello-1.0-1.gpkg.tar")
    (b / "app-misc/hello").mkdir(parents=True)
    (b / "app-misc/hello/hello-1.0-1.gpkg.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(compare.SnapshotterError, match="cannot read a package"):
        compare.compare_dirs(a, b)


# `snapshotter rebuild` refuses, in one line and before anything is built, what it cannot pin.

@pytest.fixture
def site(tmp_path):
    repo, commits = binhostlib.snapshot_repo(tmp_path)
    stage = tmp_path / "stage3.tar.xz"
    stage.write_bytes(b"stage")
    confdir = tmp_path / "confdir"
    testlib.write_tree(confdir, {"package.use/x": "app-misc/hello ssl\n"})
    out = tmp_path / "out"
    cfg = tmp_path / "snapshotter.toml"
    cfg.write_text(f'repo = "{repo}"\nstate_dir = "{tmp_path}/state"\n[build]\nwork_dir = "{tmp_path}/work"\n'
                   f'output = "{out}"\ncache_dir = "{tmp_path}/cache"\n'
                   f'[profiles.basic]\nstage = "{stage}"\nportage_confdir = "{confdir}"\n')
    return {"cfg": cfg, "out": out, "commits": commits, "confdir": confdir, "repo": repo}


def rebuild_cli(site, *args: str):
    return testlib.run_cli("--config", str(site["cfg"]), "rebuild", *args)


def builds_of(site) -> list[str]:
    return sorted(os.listdir(site["out"] / "basic"))


def test_rebuild_refuses_a_changed_confdir_a_moved_tag_and_a_failed_build(site):
    tag = "2026-01-10"
    good = binhostlib.write_build(site["out"], "basic", tag, site["commits"][tag], confdir=site["confdir"])
    moved = binhostlib.write_build(site["out"], "basic", tag, site["commits"]["2026-01-11"], confdir=site["confdir"])
    failed = binhostlib.write_build(site["out"], "basic", tag, site["commits"][tag], confdir=site["confdir"], ok=False)
    before = builds_of(site)
    # The tag points at another commit than the build used.
    r = rebuild_cli(site, moved.id, "--profile", "basic")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [f"snapshotter: error: tag {tag} points at {site['commits'][tag]} now, build "
                                     f"{moved.id} used {site['commits']['2026-01-11']}; cannot rebuild it from that tag"]
    # A failed build is no original.
    r = rebuild_cli(site, str(failed.path / "build.json"))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "failed; only a good build" in r.stderr
    # An id needs its profile.
    r = rebuild_cli(site, good.id)
    assert r.returncode == 1 and "--profile is needed" in r.stderr and len(r.stderr.splitlines()) == 1
    # The confdir changed since the build.
    (site["confdir"] / "package.use" / "x").write_text("app-misc/hello -ssl\n")
    r = rebuild_cli(site, good.id, "--profile", "basic")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"portage_confdir {site['confdir']} changed since build {good.id}" in r.stderr
    assert "Traceback" not in r.stderr
    assert builds_of(site) == before  # nothing built, no directory taken


def test_rebuild_help_has_an_example():
    r = testlib.run_cli("rebuild", "--help")
    assert r.returncode == 0 and "snapshotter rebuild 2026-11-20.1 --profile basic" in r.stdout


def test_report_json_is_deterministic(tmp_path):
    a, b = two_dirs(tmp_path)
    make_gpkg(a / "app-misc/hello/hello-1.0-1.gpkg.tar")
    make_gpkg(b / "app-misc/hello/hello-1.0-1.gpkg.tar", meta=later())
    one = json.dumps(compare.compare_dirs(a, b).to_dict(), sort_keys=True)
    two = json.dumps(compare.compare_dirs(a, b).to_dict(), sort_keys=True)
    assert one == two and '"identical"' in one


def test_the_verdict_counts_changed_inputs_too(tmp_path):
    """Identical packages from changed inputs (another make.conf) are no proof: exit 1, the input named."""
    from chroot import manifest as manifestmod
    from snapshotter.service import rebuild as rebuildmod

    a, b = two_dirs(tmp_path)
    make_gpkg(a / "app-misc/hello/hello-1.0-1.gpkg.tar")
    make_gpkg(b / "app-misc/hello/hello-1.0-1.gpkg.tar", meta=later())
    man = manifestmod.Manifest(profile="basic", tag="2026-01-10", commit="c" * 40, repo="", stage={"source": "s",
                               "sha256": "0" * 64}, overlays=[], portage_profile=None,
                               make_conf={"content": "A=1\n", "sha256": "1" * 64}, portage_confdir=None,
                               repos_conf="", world=None, emerge_command=["emerge", "@world"], ok=True,
                               id="2026-01-10.1")
    other = manifestmod.Manifest(**{**man.__dict__, "make_conf": {"content": "A=2\n", "sha256": "2" * 64},
                                    "id": "2026-01-10.2"})
    comparison = compare.compare_dirs(a, b)
    same = rebuildmod.RebuildReport(rebuildmod.Original(tmp_path / "a", man), "2026-01-10.2", tmp_path / "b",
                                    comparison, rebuildmod.compare_inputs(man, man))
    assert same.exit_status == 0
    assert same.summary() == ("rebuild 2026-01-10.2 of basic 2026-01-10.1: 1 packages: 1 identical, 0 differs, "
                              "0 missing, 0 extra: reproducible")
    changed = rebuildmod.RebuildReport(rebuildmod.Original(tmp_path / "a", man), "2026-01-10.2", tmp_path / "b",
                                       comparison, rebuildmod.compare_inputs(man, other))
    assert changed.changed_inputs == ["make.conf"] and changed.exit_status == 1
    assert changed.summary().endswith("; inputs changed: make.conf: NOT reproducible")
    assert changed.to_dict()["inputs"]["make.conf"] == {"original": "1" * 64, "rebuild": "2" * 64, "same": False}
