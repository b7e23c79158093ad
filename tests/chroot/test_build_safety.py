"""The builder's safety net without Portage: mountinfo parsing, deletion that never crosses a mount
(real bind mounts), writes that never follow symlinks, stage verification/extraction for every
compression, stage download, and the CLI's refusals (bad sha256 before extraction, unknown profile/tag,
bad overlay ref, locked profile, stale root with a mount)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ebuild_repo, testlib

from chroot import builder
from chroot.errors import ChrootError, StageMismatch
from chroot.mounts import MountedError, inside, mounts_under, parse_mountinfo, safe_rmtree
from chroot.stage import extract_stage, verify_stage
from snapshotter.errors import FetchError
from snapshotter.lock import flocked
from snapshotter.service.build import fetch_stage

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


class BindMount:
    """A real bind mount in the host namespace for the test's duration; always unmounted (checked)."""

    def __init__(self, src: Path, dest: Path) -> None:
        self.src, self.dest = src, dest

    def __enter__(self) -> BindMount:
        self.dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(self.src), str(self.dest)], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", str(self.dest)], check=True)
        assert mounts_under(self.dest) == []


def test_parse_mountinfo_unescapes():
    text = ("36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
            "37 36 0:5 / /dev rw shared:2 - devtmpfs udev rw\n")
    m = parse_mountinfo(text)
    assert [x.mount_point for x in m] == ["/mnt/with space", "/dev"]
    assert m[0].mount_id == 36 and m[0].parent_id == 35 and m[0].fstype == "ext3" and m[1].source == "udev"


def test_mounts_under_sees_real_proc(tmp_path):
    assert "/proc" in mounts_under(Path("/"))
    assert mounts_under(tmp_path) == []


def test_safe_rmtree_never_follows_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    victim = tmp_path / "victim"
    testlib.write_tree(victim, {"a/b/c.txt": "x", "d/e": ("exec", "#!/bin/sh\n"),
                                "link-dir": ("symlink", str(outside)), "a/link-file": ("symlink", "../d/e")})
    safe_rmtree(victim)
    assert not victim.exists()
    assert (outside / "precious").read_text() == "keep"
    safe_rmtree(victim)  # missing: nothing to do


@needs_root
def test_safe_rmtree_refuses_with_a_bind_mount_inside(tmp_path, monkeypatch):
    src = tmp_path / "host-dev-standin"
    src.mkdir()
    (src / "null").write_text("precious")
    victim = tmp_path / "root"
    (victim / "etc").mkdir(parents=True)
    (victim / "etc/file").write_text("x")
    with BindMount(src, victim / "dev"):
        with pytest.raises(MountedError, match="still mounted there: .*/root/dev"):
            safe_rmtree(victim)
        assert (victim / "etc/file").exists()  # refused before deleting anything
        # Even if the mountinfo check were skipped (a mount appearing mid-walk), the walk stops at the mount.
        monkeypatch.setattr("chroot.mounts.assert_unmounted", lambda p: None)
        with pytest.raises(MountedError, match="on another mount"):
            safe_rmtree(victim)
        assert (src / "null").read_text() == "precious"
    assert (src / "null").read_text() == "precious"


def test_inside_refuses_symlinked_directories(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "var").symlink_to("/var")
    assert inside(root, "etc/portage/make.conf") == root / "etc/portage/make.conf"
    with pytest.raises(ChrootError, match="is a symlink"):
        inside(root, "var/db/repos/gentoo")
    with pytest.raises(ChrootError, match="unsafe path"):
        inside(root, "etc/../../x")


def make_stage(tmp_path: Path, compression: str) -> tuple[Path, bool]:
    src = tmp_path / "src"
    if not src.exists():
        testlib.write_tree(src, {"usr/bin/tool": ("exec", "#!/bin/sh\n"), "etc/os-release": "ID=test\n",
                                 "etc/ld.so.conf": ("symlink", "os-release")})
        os.chown(src / "usr/bin/tool", 1234, 5678)
    try:
        os.setxattr(src / "usr/bin/tool", "user.snapshotter", b"kept")
        has_xattr = True
    except OSError:
        has_xattr = False
    flag = {"xz": "--xz", "bz2": "--bzip2", "zst": "--zstd"}[compression]
    out = tmp_path / f"stage3.tar.{compression}"
    subprocess.run(["tar", "-C", str(src), flag, "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cf",
                    str(out), "."], check=True)
    return out, has_xattr


@needs_root
@pytest.mark.parametrize("compression", ["xz", "bz2", "zst"])
def test_extract_stage_keeps_owners_modes_xattrs(tmp_path, compression):
    stage, has_xattr = make_stage(tmp_path, compression)
    root = tmp_path / "root"
    extract_stage(stage, root)
    st = os.stat(root / "usr/bin/tool")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 5678, 0o755)
    assert os.readlink(root / "etc/ld.so.conf") == "os-release"
    if has_xattr:
        assert os.getxattr(root / "usr/bin/tool", "user.snapshotter") == b"kept"
    with pytest.raises(ChrootError, match="not empty"):
        extract_stage(stage, root)


def test_extract_refuses_non_root_filesystem(tmp_path):
    testlib.write_tree(tmp_path / "src", {"hello.txt": "x"})
    stage = tmp_path / "stage.tar.xz"
    subprocess.run(["tar", "-C", str(tmp_path / "src"), "-cJf", str(stage), "."], check=True)
    with pytest.raises(ChrootError, match="does not look like a root file system"):
        extract_stage(stage, tmp_path / "root")


def test_verify_stage(tmp_path):
    stage, _ = make_stage(tmp_path, "xz")
    good = hashlib.sha256(stage.read_bytes()).hexdigest()
    assert verify_stage(stage, good) == good
    assert verify_stage(stage, None) == good
    with pytest.raises(StageMismatch, match="expected 0000"):
        verify_stage(stage, "0" * 64)


def test_fetch_stage_over_http_with_cache(tmp_path, http_mirror):
    stage, _ = make_stage(tmp_path, "zst")
    (http_mirror.root / "stages").mkdir()
    (http_mirror.root / "stages" / stage.name).write_bytes(stage.read_bytes())
    sha = hashlib.sha256(stage.read_bytes()).hexdigest()
    url = f"{http_mirror.url}/stages/{stage.name}"
    got = fetch_stage(url, tmp_path / "cache", sha)
    assert got.read_bytes() == stage.read_bytes()
    n = len(http_mirror.requests)
    assert fetch_stage(url, tmp_path / "cache", sha) == got and len(http_mirror.requests) == n  # cached
    with pytest.raises(FetchError, match="not found \\(404\\)"):
        fetch_stage(f"{http_mirror.url}/stages/missing.tar.xz", tmp_path / "cache", None)
    assert not list((tmp_path / "cache").glob("*.part*"))


@pytest.fixture
def small_env(tmp_path):
    """A mirror with one tag, an overlay with tag v1, and a tiny (not bootable) stage."""
    tags = ebuild_repo.git_repo_with_tags(tmp_path / "mirror.git", [("2026-01-01", ebuild_repo.tree_files())])
    ebuild_repo.git_repo_with_tags(tmp_path / "overlay", [("v1", ebuild_repo.overlay_files("1.0"))], bare=False)
    stage, _ = make_stage(tmp_path, "zst")
    sha = hashlib.sha256(stage.read_bytes()).hexdigest()

    def write_cfg(stage_sha: str = sha, ref: str = "v1") -> Path:
        cfg = tmp_path / "snapshotter.toml"
        cfg.write_text(f'repo = "mirror.git"\n[build]\nwork_dir = "work"\noutput = "out"\ncache_dir = "cache"\n'
                       f'[profiles.p]\nstage = "{stage.name}"\nstage_sha256 = "{stage_sha}"\n'
                       f'overlays = [{{ name = "extra", url = "overlay", ref = "{ref}" }}]\n')
        return cfg

    return tmp_path, write_cfg, tags


def _the_error(stderr: str) -> str:
    """Progress lines may come first; the error is exactly one line, the last, with no traceback."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert [x for x in lines if x.startswith("snapshotter: error:")] == lines[-1:], stderr
    return lines[-1]


def _nothing_built(base: Path) -> None:
    work = base / "work" / "p"
    assert not work.exists() or list(work.iterdir()) == []
    out = base / "out" / "p"
    assert not out.exists() or list(out.iterdir()) == []


def test_cli_bad_stage_sha256_refused_before_extraction(small_env):
    base, write_cfg, _ = small_env
    r = testlib.run_cli("--config", str(write_cfg(stage_sha="ab" * 32)), "build", "--profile", "p")
    assert r.returncode == 1
    line = _the_error(r.stderr)
    assert line.startswith("snapshotter: error: stage ") and f"expected {'ab' * 32}" in line
    _nothing_built(base)


@pytest.mark.parametrize("args, words", [
    (["--profile", "nope"], "unknown build profile 'nope' (profiles: p)"),
    (["--profile", "../p"], "not a valid profile name"),
    (["--profile", "p", "--tag", "2026-02-30"], "is not a snapshot tag"),
    (["--profile", "p", "--tag", "2026-01-05"], "no tag 2026-01-05"),
    (["--profile", "p", "--overlay-ref", "extra"], "--overlay-ref: expected NAME=REF"),
    (["--profile", "p", "--overlay-ref", "other=v1"], "overlay 'other' is not an overlay of profile p"),
    (["--profile", "p", "--overlay-ref", "extra=v9"], "overlay extra: ref 'v9' is not a tag, branch or commit"),
    (["--profile", "p", "--repo", "/nonexistent"], "is not a snapshot repository"),
])
def test_cli_setup_errors_are_one_line(small_env, args, words):
    base, write_cfg, _ = small_env
    r = testlib.run_cli("--config", str(write_cfg()), "build", *args)
    assert r.returncode == 1, r.stderr
    line = _the_error(r.stderr)
    assert line.startswith("snapshotter: error: ") and words in line, line
    _nothing_built(base)


def test_cli_locked_profile_exits_75(small_env):
    base, write_cfg, _ = small_env
    cfg = write_cfg()
    with flocked(base / "work" / "p.lock", "test"):
        r = testlib.run_cli("--config", str(cfg), "build", "--profile", "p")
    assert r.returncode == 75
    assert "build profile p is locked" in r.stderr


@needs_root
def test_stale_root_with_a_mount_is_not_deleted(tmp_path):
    profile_dir = tmp_path / "work" / "p"
    stale = profile_dir / "2026-01-01-20260101T000000Z-1"
    (stale / "root/etc").mkdir(parents=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "precious").write_text("keep")
    kept = profile_dir / "2026-01-01-20260101T000000Z-2"
    kept.mkdir()
    (kept / builder.KEEP_MARKER).write_text("")
    with BindMount(tmp_path / "src", stale / "root/dev"):
        with pytest.raises(ChrootError, match="still has mounts"):
            builder.clean_stale(profile_dir)
        assert (stale / "root/etc").is_dir()
    assert (tmp_path / "src" / "precious").read_text() == "keep"
    builder.clean_stale(profile_dir)
    assert not stale.exists() and kept.exists()  # a --keep-root build dir is left alone


@needs_root
def test_namespace_runner_gets_the_builders_spec(tmp_path):
    """run_in_namespace writes the spec, `python -m chroot.nsrun` reads it: the binds are mounted in the
    runner's namespace only, argv runs there and its exit status comes back."""
    root = (tmp_path / "root").resolve()
    for d in ("proc", "dev", "sys", "var/cache/binpkgs", "var/cache/distfiles"):
        (root / d).mkdir(parents=True)
    pkgdir, distfiles = tmp_path / "packages", tmp_path / "distfiles"
    pkgdir.mkdir()
    distfiles.mkdir()
    (distfiles / "marker").write_text("x")
    argv = ["/bin/sh", "-c", f"test -f {root}/var/cache/distfiles/marker && test -d {root}/proc/self && exit 7"]
    with open(tmp_path / "log", "wb") as logf:
        status = builder.run_in_namespace(root, pkgdir, argv, tmp_path / "nsrun.json", logf, False,
                                          distfiles=distfiles)
    assert status == 7
    assert "mounted proc, dev (rslave), sys (rslave), var/cache/binpkgs, var/cache/distfiles" in \
        (tmp_path / "log").read_text()
    assert mounts_under(root) == []  # the mounts lived in the runner's namespace only


def test_builder_writes_only_into_an_empty_build_directory(tmp_path):
    """The build's directory (allocated by the caller) must be an empty directory: a build never writes
    into another build's directory, nor through a symlink."""
    builder.check_output_dir(tmp_path)
    other = tmp_path / "2026-01-01.1"
    testlib.write_tree(other, {"build.json": "done", "packages/a.gpkg.tar": "a"})
    with pytest.raises(ChrootError, match="is not empty"):
        builder.check_output_dir(other)
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "link", tmp_path / "missing"):
        with pytest.raises(ChrootError, match="does not exist or is not a directory"):
            builder.check_output_dir(bad)
    assert (other / "build.json").read_text() == "done"


def test_children_die_with_the_builder():
    """die_with_parent: a child (here `sleep`, in the builder: tar, unshare) gets SIGKILL when the
    process that started it is killed with -9."""
    code = ("import subprocess, sys\n"
            "from chroot.procs import die_with_parent\n"
            "p = subprocess.Popen(['sleep', '300'], preexec_fn=die_with_parent())\n"
            "print(p.pid, flush=True)\n"
            "import time; time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split(")")[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # killed, waiting to be reaped by init
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        pytest.fail("the child outlived its parent")
