"""Incremental builds with the real Portage in the stand-in stage (tests/helpers/stage.py).

Three tags of the test tree (tests/helpers/ebuild_repo.py): tag 2 changes the ebuild of dev-libs/libfoo (same
version), tag 3 changes it again. app-misc/hello depends on libfoo (DEPEND and RDEPEND); app-misc/extra
comes from an overlay; sys-apps/base is in the profile's @system. The profile `inc` has mode = "incremental"
and signs its packages. The module's builds run in order and share their output:

  tag 1            full (no good build yet)
  tag 2            incremental on tag 1: libfoo built, hello, base and extra reused (hard links)
  tag 2 again      incremental on tag 2's build: nothing changed, everything reused
  tag 3            incremental with --rebuild-reverse-deps: libfoo built, and hello, which build-depends on it
  tag 3 --full     every package built; the incremental result installs on a fresh host like it
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest
from helpers import ebuild_repo, signkeys, testlib
from helpers import stage as test_stage
from helpers.buildcheck import check_manifest, check_signed_gpkg, install_packages, packages_index_cpvs

from chroot import builder
from chroot.mounts import mounts_under, safe_rmtree

pytestmark = pytest.mark.portage

TAG1, TAG2, TAG3 = "2026-01-01", "2026-01-02", "2026-01-03"
LIBFOO = "dev-libs/libfoo/libfoo-1.0.ebuild"
FILES = {"app-misc/extra/extra-1.0-1.gpkg.tar", "app-misc/hello/hello-1.0-1.gpkg.tar",
         "dev-libs/libfoo/libfoo-1.0-1.gpkg.tar", "sys-apps/base/base-1-1.gpkg.tar"}
CPVS = {"app-misc/extra-1.0", "app-misc/hello-1.0", "dev-libs/libfoo-1.0", "sys-apps/base-1"}


def tree(libfoo: str) -> dict:
    files = ebuild_repo.tree_files(hello="1.0")
    files[LIBFOO] = files[LIBFOO].replace('"libfoo 1.0"', f'"libfoo 1.0 {libfoo}"')
    assert libfoo == "first" or files[LIBFOO] != ebuild_repo.tree_files(hello="1.0")[LIBFOO]
    return files


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("chroot builds need root")
    base = tmp_path_factory.mktemp("incremental").resolve()
    stage_file = test_stage.ensure_stage()
    sha = hashlib.sha256(stage_file.read_bytes()).hexdigest()
    tags = ebuild_repo.git_repo_with_tags(base / "mirror.git", [
        (TAG1, tree("first")), (TAG2, tree("second")), (TAG3, tree("third"))])
    ebuild_repo.git_repo_with_tags(base / "overlay", [("v1", ebuild_repo.overlay_files("1.0"))], bare=False)
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="snapshotter-test-inc-", dir=shm)) if os.access(shm, os.W_OK) \
        else base / "work"
    key = signkeys.make_signing_key(base / "gnupg")
    cfg = base / "snapshotter.toml"
    cfg.write_text(f"""
repo = "{base}/mirror.git"
state_dir = "{base}/state"
[build]
work_dir = "{work}"
output = "{base}/out"
cache_dir = "{base}/cache"

[profiles.inc]
stage = "{stage_file}"
stage_sha256 = "{sha}"
portage_profile = "default"
world = ["app-misc/hello", "app-misc/extra"]
overlays = [{{ name = "extra", url = "{base}/overlay", ref = "v1" }}]
make_conf = {{ MAKEOPTS = "-j2" }}
signing_key = "{key.fingerprint}"
gnupghome = "{key.home}"
stage4 = false
mode = "incremental"
""")
    yield {"base": base, "work": work, "cfg": cfg, "tags": tags, "stage": stage_file, "key": key,
           "out": base / "out" / "inc"}
    assert mounts_under(base) == [], "a mount leaked: refusing to let pytest delete the tmp dir"
    left = builder.processes_in(work)
    safe_rmtree(work)
    assert left == [], f"processes were still running in the build roots: {left}"


@pytest.fixture(autouse=True)
def no_leak(env):
    yield
    assert mounts_under(env["base"]) == [] and mounts_under(env["work"]) == []
    assert signkeys.agents_under(env["work"]) == [] and signkeys.agents_for(env["key"].home) == []


def build(env, *args: str) -> tuple[str, dict, str]:
    """A build of profile inc: (id, build.json, stderr)."""
    r = testlib.run_cli("--config", str(env["cfg"]), "build", "--profile", "inc", *args, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    build_id = r.stdout.split()[0]
    return build_id, check_manifest(env["out"] / build_id), r.stderr


def files(env, build_id: str) -> set[str]:
    pkgdir = env["out"] / build_id / "packages"
    return {p.relative_to(pkgdir).as_posix() for p in pkgdir.rglob("*.gpkg.tar")}


def same_inode(a: Path, b: Path) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_first_build_is_full_and_says_why(env):
    build_id, man, err = build(env, "--tag", TAG1)
    assert build_id == f"{TAG1}.1"
    assert "incremental: no good build yet; full build" in err
    assert man["mode"] == "full" and man["incremental"] is None
    assert man["emerge_command"] == ["emerge", "--emptytree", "@world"]
    assert files(env, build_id) == FILES


def test_incremental_build_rebuilds_the_changed_ebuild_and_reuses_the_rest(env, tmp_path):
    first = f"{TAG1}.1"
    build_id, man, err = build(env, "--tag", TAG2)
    assert build_id == f"{TAG2}.1"
    assert f"incremental: on build {first}: reusing 3 of 4 packages; building again: " \
           "dev-libs/libfoo-1.0::gentoo (ebuild changed)" in err, err[-3000:]
    assert man["mode"] == "incremental"
    assert man["emerge_command"] == ["emerge", "--usepkg", "--binpkg-respect-use=y", "--binpkg-changed-deps=y",
                                     "--emptytree", "@world"]
    libfoo = "dev-libs/libfoo/libfoo-1.0-1.gpkg.tar"
    assert man["incremental"] == {"base": first, "reused": sorted(FILES - {libfoo}), "rebuilt": [libfoo]}
    out, base = env["out"] / build_id / "packages", env["out"] / first / "packages"
    for rel in FILES - {libfoo}:
        assert same_inode(out / rel, base / rel), rel  # a hard link of the base's file, not a copy
    assert not same_inode(out / libfoo, base / libfoo)
    assert (out / libfoo).read_bytes() != (base / libfoo).read_bytes()
    # Portage's index lists every package, the reused ones too, and the new libfoo by its own size.
    assert packages_index_cpvs(out / "Packages") == CPVS
    log = (env["out"] / build_id / "build.log").read_text()
    assert log.count("Creating binpkg") == 1 and ">>> Emerging binary" in log, log[-3000:]
    for gpkg in out.rglob("*.gpkg.tar"):
        check_signed_gpkg(gpkg, env["key"], tmp_path)


def test_nothing_changed_reuses_everything(env):
    build_id, man, err = build(env, "--tag", TAG2, "--incremental")
    assert build_id == f"{TAG2}.2"
    assert f"incremental: on build {TAG2}.1: reusing 4 of 4 packages; building again: none" in err
    assert man["incremental"] == {"base": f"{TAG2}.1", "reused": sorted(FILES), "rebuilt": []}
    out = env["out"] / build_id / "packages"
    assert packages_index_cpvs(out / "Packages") == CPVS
    assert "Creating binpkg" not in (env["out"] / build_id / "build.log").read_text()
    # Reused twice, still the first build's files.
    assert same_inode(out / "sys-apps/base/base-1-1.gpkg.tar",
                      env["out"] / f"{TAG1}.1" / "packages/sys-apps/base/base-1-1.gpkg.tar")


def test_reverse_dependencies_are_rebuilt_when_asked(env):
    build_id, man, err = build(env, "--tag", TAG3, "--rebuild-reverse-deps")
    assert build_id == f"{TAG3}.1"
    assert man["mode"] == "incremental" and "--rebuild-if-unbuilt=y" in man["emerge_command"]
    inc = man["incremental"]
    assert inc["base"] == f"{TAG2}.2"
    assert "building again: app-misc/hello-1.0::gentoo (build-depends on dev-libs/libfoo), " \
           "dev-libs/libfoo-1.0::gentoo (ebuild changed)" in err
    assert inc["rebuilt"] == ["app-misc/hello/hello-1.0-1.gpkg.tar", "dev-libs/libfoo/libfoo-1.0-1.gpkg.tar"], inc
    assert inc["reused"] == ["app-misc/extra/extra-1.0-1.gpkg.tar", "sys-apps/base/base-1-1.gpkg.tar"], inc
    assert packages_index_cpvs(env["out"] / build_id / "packages" / "Packages") == CPVS


def install(env, build_id: str, name: str) -> Path:
    """A fresh host (the stand-in stage) that installs the build's packages with emerge --usepkgonly, which
    verifies every signature (binpkg-request-signature): returns its root."""
    man = json.loads((env["out"] / build_id / "build.json").read_text())
    root, _log = install_packages(
        env["work"] / name, env["stage"], env["out"] / build_id / "packages",
        {"gentoo": (env["base"] / "mirror.git", man["commit"]),
         "extra": (env["base"] / "cache/overlays/extra.git", man["overlays"][0]["commit"])},
        env["key"].public.read_text(), ["app-misc/hello", "app-misc/extra"])
    return root


def installed(root: Path) -> dict[str, bytes]:
    """The installed packages' files (per their CONTENTS), by path."""
    out = {}
    for contents in sorted((root / "var/db/pkg").glob("*/*/CONTENTS")):
        for line in contents.read_text().splitlines():
            kind, rest = line.split(" ", 1)
            if kind == "obj":
                path = rest.rsplit(" ", 2)[0]
                out[path] = (root / path.lstrip("/")).read_bytes()
    return out


def test_the_incremental_result_installs_like_a_full_build(env):
    incremental = f"{TAG3}.1"
    full_id, man, err = build(env, "--tag", TAG3, "--full")
    assert man["mode"] == "full" and man["incremental"] is None and "incremental:" not in err
    assert files(env, full_id) == FILES
    try:
        a = install(env, incremental, "client-incremental")
        b = install(env, full_id, "client-full")
        assert sorted(p.relative_to(a).as_posix() for p in (a / "var/db/pkg").glob("*/*")) == \
            sorted(p.relative_to(b).as_posix() for p in (b / "var/db/pkg").glob("*/*")) == \
            sorted(f"var/db/pkg/{c}" for c in CPVS)
        files_a = installed(a)
        assert files_a == installed(b)
        assert files_a["/usr/lib/libfoo.txt"] == b"libfoo 1.0 third\n"
    finally:
        for name in ("client-incremental", "client-full"):
            if (env["work"] / name).exists():
                safe_rmtree(env["work"] / name)
