"""Real chroot builds with the real Portage in the stand-in stage (tests/helpers/stage.py), for real:
mounts in private namespaces, emerge -e world, signed .gpkg.tar packages, build ids, kill -9, failures,
round trip. The mirror is filled by the real `snapshotter sync` from signed snapshots on a loopback HTTP
mirror.

One stage, one mirror and one overlay are shared by the module; each scenario builds once and checks
many things. Profile `basic` signs with a passphrase-protected key (passphrase_file), `trouble` with a key
without one. Every test ends by checking the host's /proc/self/mountinfo for leaks and that no gpg-agent
of a build is left (the fixtures `env` and `no_leak` are in tests/chroot/conftest.py, shared with
test_rebuild_portage).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from helpers import buildcheck, ebuild_repo, signkeys, testlib
from helpers.buildcheck import check_manifest, check_signed_gpkg, packages_index_cpvs, sha256, tar_names
from helpers.buildenv import TAG1, TAG2

from chroot import builder
from chroot.mounts import mounts_under, parse_mountinfo, safe_rmtree
from snapshotter import fsutil
from snapshotter.config import Overlay
from snapshotter.service import build as buildsvc

pytestmark = [pytest.mark.portage, pytest.mark.usefixtures("no_leak")]

def build_dirs(env, profile: str) -> dict[str, str | None]:
    """The profile's build directories: name -> build.json's text (None while it has none)."""
    out = env["base"] / "out" / profile
    if not out.is_dir():
        return {}
    return {d.name: (d / "build.json").read_text() if (d / "build.json").exists() else None
            for d in sorted(out.iterdir())}


def secret_key_bytes(key: testlib.Key) -> list[bytes]:
    """The contents of the key's secret key files (what must never leave its home)."""
    return [p.read_bytes() for p in (key.home / "private-keys-v1.d").glob("*.key")]


def build(env, *args: str, timeout: float = 300):
    # The canary variable must not reach the build (checked in the round trip via sys-apps/base).
    return testlib.run_cli("--config", str(env["cfg"]), *args, timeout=timeout,
                           env={"SNAPSHOTTER_LEAK_CANARY": "leaked"})


def git_tree_id(repo: Path, commit: str) -> str:
    return subprocess.run(["git", f"--git-dir={repo}", "rev-parse", f"{commit}^{{tree}}"], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_build_world_with_pinned_overlay(env, tmp_path):
    """Tag 1 with the overlay pinned at v1 (v2 exists): real gpkg packages of all of @world + index, each
    signed by the profile's passphrase-protected key (no terminal), in the build's own directory."""
    t0 = time.monotonic()
    r = build(env, "-v", "build", "--profile", "basic", "--tag", TAG1)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    out = env["base"] / "out" / "basic" / f"{TAG1}.1"
    assert r.stdout.strip() == f"{TAG1}.1 {out}"
    assert ">>> Emerging (1 of 6)" in r.stderr  # -v streams emerge's output live
    assert "Traceback" not in r.stderr

    pkgdir = out / "packages"
    gpkgs = sorted(p.relative_to(pkgdir).as_posix() for p in pkgdir.rglob("*.gpkg.tar"))
    assert gpkgs == ["app-misc/extra/extra-1.0-1.gpkg.tar", "app-misc/fetched/fetched-1-1.gpkg.tar",
                     "app-misc/hello/hello-1.0-1.gpkg.tar",
                     "dev-libs/libfoo/libfoo-1.0-1.gpkg.tar", "dev-libs/tilde/tilde-1-1.gpkg.tar",
                     "sys-apps/base/base-1-1.gpkg.tar"]
    # A real gpkg: an uncompressed tar holding the metadata and image archives and the gpkg-1 marker.
    with tarfile.open(pkgdir / "app-misc/hello/hello-1.0-1.gpkg.tar") as t:
        names = t.getnames()
    assert "hello-1.0-1/gpkg-1" in names
    assert any(n.startswith("hello-1.0-1/image.tar") for n in names)
    assert packages_index_cpvs(pkgdir / "Packages") == {
        "app-misc/extra-1.0", "app-misc/fetched-1", "app-misc/hello-1.0", "dev-libs/libfoo-1.0", "dev-libs/tilde-1",
        "sys-apps/base-1"}
    # Signed the Portage way, by the profile's key; nothing of the key's home in a package or the output.
    key = env["basic_key"]
    for gpkg in sorted(pkgdir.rglob("*.gpkg.tar")):
        check_signed_gpkg(gpkg, key, tmp_path)
    secrets = secret_key_bytes(key)
    assert secrets
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not any(sec in data for sec in secrets), f
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "build.log", "packages", "stage4.tar.zst"]
    # The stage4 holds the public key trusted in /etc/portage/gnupg, nothing of the signing home.
    s4_names = tar_names(out / "stage4.tar.zst", "--zstd")
    assert "./etc/portage/gnupg/pubring.kbx" in s4_names
    assert not [n for n in s4_names if "snapshotter-signing" in n or "private-keys" in n], s4_names

    man = check_manifest(out)
    assert man["ok"] is True and man["exit_status"] == 0 and man["error"] == ""
    assert man["id"] == f"{TAG1}.1" and man["format"] == 3 and man["signing_key"] == key.fingerprint
    assert man["profile"] == "basic" and man["tag"] == TAG1 and man["commit"] == env["tags"][TAG1]
    assert man["overlays"] == [{"name": "extra", "url": str(env["base"] / "overlay"), "ref": "v1",
                                "commit": env["ov_tags"]["v1"]}]
    assert man["stage"]["sha256"] == env["sha"]
    # The root was an overlay over the stage unpacked once into the private stage cache, which the build's
    # writes never reached (the builder's make.conf block went to the build's upper layer only).
    assert man["root"]["method"] == "overlay"
    lower = env["base"] / "cache" / "roots" / env["sha"]
    assert stat.S_IMODE((env["base"] / "cache" / "roots").stat().st_mode) == 0o700
    assert (lower / "usr/bin/emerge").exists()
    assert not (lower / "etc/portage/make.conf").exists()  # the stand-in has none; the build wrote its own
    assert not (lower / "var/lib/portage/world").exists() or \
        "app-misc/hello" not in (lower / "var/lib/portage/world").read_text()
    # The trees came from the tree cache (one per git tree id), mounted read-only.
    trees = {p.name for p in (env["base"] / "cache" / "trees").iterdir() if p.is_dir()}
    assert trees == {git_tree_id(env["base"] / "mirror.git", env["tags"][TAG1]),
                     git_tree_id(env["base"] / "cache" / "overlays" / "extra.git", env["ov_tags"]["v1"])}
    assert "var/db/repos/gentoo (read-only)" in (out / "build.log").read_text()
    # dev-libs/tilde (~amd64 only) built: the confdir's package.accept_keywords reached /etc/portage.
    assert man["portage_confdir"] == {"path": str(env["confdir"]), "sha256": fsutil.tree_hash(env["confdir"])}
    mc = man["make_conf"]["content"]
    assert hashlib.sha256(mc.encode()).hexdigest() == man["make_conf"]["sha256"]
    assert 'FEATURES="buildpkg cgroup ipc-sandbox network-sandbox parallel-fetch binpkg-signing"' in mc
    assert 'MAKEOPTS="-j2"' in mc and 'PKGDIR="/var/cache/binpkgs"' in mc and 'DISTDIR="/var/cache/distfiles"' in mc
    assert f'BINPKG_GPG_SIGNING_KEY="{key.fingerprint}"' in mc
    assert "--pinentry-mode loopback --passphrase-file /run/snapshotter-signing/passphrase [PORTAGE_CONFIG]" in mc
    assert man["emerge_command"] == ["emerge", "--emptytree", "@world"]
    assert man["started"] <= man["finished"]
    log_text = (out / "build.log").read_text()
    assert "Creating binpkg" in log_text
    assert "private tmpfs run/snapshotter-signing (this namespace only): gnupg, passphrase" in log_text
    assert "unlocked" in log_text and "GnuPG unlock failed" not in log_text  # Portage's unlock, no terminal
    assert "refuse unsigned" not in r.stderr
    # The root is gone, nothing stale left, nothing mounted.
    assert list((env["work"] / "basic").iterdir()) == []
    print(f"\nbuild of 6 packages took {took:.1f}s (stage extraction + emerge + cleanup)")


def test_second_tag_builds_new_version(env):
    """Tag 2 changed hello to 1.1; the overlay pinned to v2 for this build gives extra-2.0. The kept root
    holds the key's public part only (trusted in /etc/portage/gnupg), nothing of its home."""
    r = build(env, "build", "--profile", "basic", "--tag", TAG2, "--overlay-ref", "extra=v2", "--keep-root")
    assert r.returncode == 0, r.stderr[-3000:]
    out = env["base"] / "out" / "basic" / f"{TAG2}.1"
    assert r.stdout.strip() == f"{TAG2}.1 {out}"
    # --keep-root: the root stays (marked, so it is never taken for stale), with nothing mounted in it.
    (kept,) = (env["work"] / "basic").iterdir()
    root = kept / "root"
    assert (kept / builder.KEEP_MARKER).exists() and mounts_under(kept) == []
    assert (root / "var/db/repos/gentoo/app-misc/hello/hello-1.1.ebuild").exists()
    assert not (root / "var/db/repos/gentoo/app-misc/hello/hello-1.0.ebuild").exists()
    assert (root / "var/db/repos/extra/app-misc/extra/extra-2.0.ebuild").exists()
    assert (root / "etc/portage/make.profile").resolve() == (root / "var/db/repos/gentoo/profiles/default").resolve()
    assert (root / "etc/portage/package.accept_keywords/tilde").exists()
    assert (root / "var/lib/portage/world").read_text() == \
        "app-misc/hello\napp-misc/extra\ndev-libs/tilde\napp-misc/fetched\n"
    assert (root / "var/db/pkg/app-misc/hello-1.1").is_dir()
    assert not any((root / "var/cache/binpkgs").iterdir())  # packages went to the bind-mounted output
    assert not any((root / "proc").iterdir())  # proc was mounted in the build's namespace only
    # The key's home and passphrase lived in the namespace's tmpfs: the kept root has an empty mount point.
    assert list((root / "run/snapshotter-signing").iterdir()) == []
    key = env["basic_key"]
    keygrips = {p.name for p in (key.home / "private-keys-v1.d").glob("*.key")}
    assert keygrips and not [p for p in root.rglob("*.key") if p.name in keygrips]
    assert not list((root / "etc/portage/gnupg").glob("private-keys-v1.d/*"))
    listing = subprocess.run(["gpg", "--homedir", str(root / "etc/portage/gnupg"), "--batch", "--no-autostart",
                              "--with-colons", "--list-keys"], capture_output=True, text=True).stdout
    assert f"fpr:::::::::{key.fingerprint}:" in listing and "pub:u:" in listing  # trusted, as Portage needs
    builder.clean_stale(env["work"] / "basic")
    assert kept.exists()
    safe_rmtree(kept)
    assert packages_index_cpvs(out / "packages" / "Packages") == {
        "app-misc/extra-2.0", "app-misc/fetched-1", "app-misc/hello-1.1", "dev-libs/libfoo-1.0", "dev-libs/tilde-1",
        "sys-apps/base-1"}
    man = check_manifest(out)
    assert man["commit"] == env["tags"][TAG2]
    assert man["overlays"][0]["ref"] == "v2" and man["overlays"][0]["commit"] == env["ov_tags"]["v2"]
    # The distfile was fetched from GENTOO_MIRRORS once (tag 1) into the shared DISTDIR (default:
    # CACHE_DIR/distfiles) and reused here.
    assert env["http"].requests.count(f"/distfiles/{ebuild_repo.DISTFILE}") == 1
    assert (env["base"] / "cache/distfiles" / ebuild_repo.DISTFILE).read_bytes() == ebuild_repo.distfile()
    assert not (root / "var/cache/distfiles" / ebuild_repo.DISTFILE).exists()  # it lived in the bind mount
    # The older tag's result is untouched.
    assert (env["base"] / "out" / "basic" / f"{TAG1}.1" / "packages/app-misc/hello/hello-1.0-1.gpkg.tar").exists()
    assert json.loads((out / "build.json").read_text())["signing_key"] == key.fingerprint


_processes_in = builder.processes_in


def wait_for_slow_ebuild(env, proc: subprocess.Popen, before: dict[str, str | None]) -> Path:
    """The new build directory of profile trouble, once its slow ebuild runs."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        new = [env["base"] / "out" / "trouble" / n for n in build_dirs(env, "trouble").keys() - before.keys()]
        if new and (new[0] / "build.log").exists() and \
                ebuild_repo.SLOW_MARKER in (new[0] / "build.log").read_text(errors="replace"):
            return new[0]
        assert proc.poll() is None, "the build ended before the slow ebuild started"
        time.sleep(0.5)
    raise AssertionError("the slow ebuild never started")


def test_kill_9_mid_emerge_leaves_no_mount_then_failure_cleans_stale_root(env):
    """kill -9 of `snapshotter build` while emerge runs: no mount, no process (the gpg-agent Portage started
    for signing included), host /dev intact; the killed build's directory stays, without build.json.
    The next build of the profile removes the stale root; its failing ebuild gives exit 4 with the tail."""
    work = env["work"] / "trouble"
    before = build_dirs(env, "trouble")
    full_env = dict(os.environ, SNAPSHOTTER_CONFIG=str(env["cfg"]))
    proc = subprocess.Popen(["snapshotter", "build", "--profile", "trouble", "--tag", TAG1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=full_env)
    try:
        killed_dir = wait_for_slow_ebuild(env, proc, before)
        (build_dir,) = work.iterdir()
        root = build_dir / "root"
        assert _processes_in(root), "emerge should be running inside the root"
        # Portage unlocked the signing key at emerge's start: its gpg-agent runs in the build's namespace.
        assert signkeys.agents_under(root), "a gpg-agent should be running inside the root"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 15
    while _processes_in(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_in(root) == []  # the PID namespace died with the builder: no orphan emerge, sleep, agent
    assert signkeys.agents_under(env["work"]) == []
    assert mounts_under(env["base"]) == []  # mounts only ever existed in the dead namespace
    # The root was an overlay mounted in the builder's own mount namespace: it vanished with the process,
    # leaving the empty mount point; the build's writes stay in upper/ (the stage cache is never written).
    assert list(root.iterdir()) == []
    upper = build_dir / "upper"
    assert (upper / "etc/portage/make.conf").is_file()  # the crashed build's layer is still there, stale
    assert list((upper / "run/snapshotter-signing").iterdir()) == []  # the key's tmpfs died with the namespace
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert killed_dir.name.startswith(f"{TAG1}.") and not (killed_dir / "build.json").exists()  # incomplete

    # Tag 2's trouble-2 dies in src_compile: exit 4, the log tail with the reason, no traceback.
    before = build_dirs(env, "trouble")
    r = build(env, "build", "--profile", "trouble")  # no --tag: the newest, TAG2
    assert r.returncode == 4, r.stderr[-3000:]
    assert ebuild_repo.FAIL_MARKER in r.stderr
    assert "Traceback" not in r.stderr
    (new,) = build_dirs(env, "trouble").keys() - before.keys()
    assert new.startswith(f"{TAG2}.")
    assert r.stderr.strip().splitlines()[-1].startswith(f"snapshotter: error: build {new} of profile trouble failed")
    assert not build_dir.exists()  # the stale root was removed safely
    assert list(work.iterdir()) == []
    # The URL stage was downloaded once and then taken from the cache.
    stage_url_path = f"/stages/{env['stage'].name}"
    assert env["http"].requests.count(stage_url_path) == 1
    failed = env["base"] / "out" / "trouble" / new
    man = json.loads((failed / "build.json").read_text())
    assert man["ok"] is False and man["exit_status"] != 0 and man["id"] == new
    assert man["signing_key"] == env["trouble_key"].fingerprint
    assert ebuild_repo.FAIL_MARKER in (failed / "build.log").read_text()
    # The killed build's directory is still there as it was: a build never replaces another's directory.
    assert build_dirs(env, "trouble") == before | {new: (failed / "build.json").read_text()}
    assert before[killed_dir.name] is None


STAGE4_EXCLUDED = ("./var/db/repos/gentoo/", "./var/cache/binpkgs/", "./var/cache/distfiles/", "./etc/resolv.conf",
                   "./var/log/emerge.log", "./var/log/portage/", "./var/tmp/portage/", "./run/snapshotter-signing",
                   "./proc/", "./dev/", "./sys/")


def test_stage4_chain_seeds_the_next_build(env):
    """Profile chain (stage = "latest-build"): build 1 starts from seed_stage and packs its root as a stage4
    without the build's mounts, caches, logs and resolv.conf; a failed build is skipped as a seed; build 2
    starts from build 1's stage4 (named by sha256 in its build.json), rebuilds hello-1.1, and appends one
    builder block to make.conf, not a second one."""
    r = build(env, "build", "--profile", "chain", "--tag", TAG1)
    assert r.returncode == 0, r.stderr[-3000:]
    out1 = env["base"] / "out" / "chain" / f"{TAG1}.1"
    man1 = check_manifest(out1)
    assert man1["stage"] == {"source": str(env["stage"]), "sha256": env["sha"]}  # seed_stage: no build yet
    s4 = man1["stage4"]
    stage4_1 = out1 / "stage4.tar.zst"
    assert s4 == {"file": "stage4.tar.zst", "sha256": sha256(stage4_1), "size": stage4_1.stat().st_size}
    names = tar_names(stage4_1, "--zstd")
    assert "./var/db/pkg/app-misc/hello-1.0/CONTENTS" in names and "./usr/bin/hello" in names
    empty_dirs = {"./var/db/repos/", "./var/cache/binpkgs/", "./var/cache/distfiles/", "./proc/", "./dev/", "./sys/"}
    assert empty_dirs <= set(names)
    leaked = [n for n in names if n.startswith(STAGE4_EXCLUDED) and n not in empty_dirs]
    assert not leaked, leaked
    # make.conf as the stage had it (the stand-in stage has none): the builder's block (PKGDIR, FEATURES,
    # signing) was this build's only.
    assert "./etc/portage/make.conf" not in names and "./etc/portage/repos.conf/zz-snapshotter.conf" in names
    assert f"stage4 stage4.tar.zst: {s4['size']} bytes, sha256 {s4['sha256']}" in (out1 / "build.log").read_text()

    # A newer failed build with a stage4 file is never a seed (its bytes would not even extract).
    failed = env["base"] / "out" / "chain" / f"{TAG2}.1"
    failed.mkdir()
    (failed / "stage4.tar.zst").write_bytes(b"not a stage\n")
    (failed / "build.json").write_text(json.dumps({
        **man1, "id": failed.name, "tag": TAG2, "ok": False, "exit_status": 1, "commit": env["tags"][TAG2],
        "stage4": {"file": "stage4.tar.zst", "sha256": sha256(failed / "stage4.tar.zst"), "size": 12}}))

    r = build(env, "build", "--profile", "chain", "--tag", TAG2)
    assert r.returncode == 0, r.stderr[-3000:]
    out2 = env["base"] / "out" / "chain" / f"{TAG2}.2"
    assert r.stdout.strip() == f"{TAG2}.2 {out2}"
    man2 = check_manifest(out2)
    assert man2["stage"] == {"source": str(stage4_1), "sha256": s4["sha256"], "build": f"{TAG1}.1"}
    assert packages_index_cpvs(out2 / "packages" / "Packages") >= {"app-misc/hello-1.1"}
    assert man2["make_conf"]["content"].count('PKGDIR="/var/cache/binpkgs"') == 1
    names2 = tar_names(out2 / "stage4.tar.zst", "--zstd")
    assert "./var/db/pkg/app-misc/hello-1.1/CONTENTS" in names2
    assert not [n for n in names2 if n.startswith("./var/db/pkg/app-misc/hello-1.0")]
    assert man2["stage4"]["sha256"] == sha256(out2 / "stage4.tar.zst") != s4["sha256"]
    assert list((env["work"] / "chain").iterdir()) == []


def test_packages_install_with_usepkgonly_into_fresh_root(env):
    """Round trip: the signed packages of the tag-1 build install into a fresh root with emerge --usepkgonly,
    which verifies each signature against the key trusted in its /etc/portage/gnupg and, with
    binpkg-request-signature, would refuse an unsigned one."""
    src = env["base"] / "out" / "basic" / f"{TAG1}.1" / "packages"
    if not (src / "Packages").exists():
        pytest.skip("needs the tag-1 build")
    rt = env["work"] / "roundtrip"
    ov = buildsvc.fetch_overlay(Overlay("extra", str(env["base"] / "overlay"), "v1"), rt / "cache")
    root, log_text = buildcheck.install_packages(
        rt, env["stage"], src, {"gentoo": (env["base"] / "mirror.git", env["tags"][TAG1]), "extra": (ov.repo, ov.commit)},
        env["basic_key"].public.read_text(), ["app-misc/hello", "app-misc/extra"])
    assert ">>> Emerging binary (1 of 4)" in log_text
    for cpv in ("app-misc/hello-1.0", "app-misc/extra-1.0", "dev-libs/libfoo-1.0", "sys-apps/base-1"):
        assert (root / "var/db/pkg" / cpv).is_dir(), cpv
    out = subprocess.run(["chroot", str(root), "/bin/sh", "/usr/bin/hello"], capture_output=True, text=True)
    assert out.stdout.strip() == "hello 1.0"
    assert (root / "usr/share/extra/version").read_text().strip() == "extra 1.0"
    # Built by `snapshotter build` with SNAPSHOTTER_LEAK_CANARY=leaked in its environment: env -i kept it out.
    assert (root / "usr/share/base/canary").read_text().strip() == "canary absent"
    assert mounts_under(rt) == []
    safe_rmtree(rt)


def _sigint_ignored() -> None:
    """As a non-interactive shell starts a background job (`cmd &`): with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_clean_up(env, sig, status):
    """SIGTERM or Ctrl-C (SIGINT) mid-emerge: the build stops, the root and partial output are removed.
    The build starts with SIGINT ignored, as from a background shell: Ctrl-C must work all the same.
    (How long the stop and clean-up take: benchmarks/bench_service.py.)"""
    work = env["work"] / "trouble"
    before = build_dirs(env, "trouble")
    full_env = dict(os.environ, SNAPSHOTTER_CONFIG=str(env["cfg"]))
    proc = subprocess.Popen(["snapshotter", "build", "--profile", "trouble", "--tag", TAG1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            preexec_fn=_sigint_ignored)
    try:
        out = wait_for_slow_ebuild(env, proc, before)
        (build_dir,) = work.iterdir()
        root = build_dir / "root"
        inside_pids = _processes_in(root)
        assert inside_pids
        # The build's mounts exist only in its private namespace: the host sees none of them.
        assert mounts_under(root) == []
        # ... while a process in the chroot sees them (its mountinfo lists paths relative to its root).
        ns = {m.mount_point for m in parse_mountinfo(Path(f"/proc/{inside_pids[0]}/mountinfo").read_text())}
        assert {"/proc", "/dev", "/sys", "/var/cache/binpkgs", "/run/snapshotter-signing"} <= ns, ns
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, stderr[-2000:]
    assert "Traceback" not in stderr
    assert _processes_in(root) == []
    assert not build_dir.exists()  # removed right away, not left stale
    # The stopped build is recorded as failed in its own, new directory (a new id for the same tag);
    # every earlier build directory is exactly as it was.
    after = build_dirs(env, "trouble")
    assert after.keys() - before.keys() == {out.name} and {k: after[k] for k in before} == before
    tag, n = out.name.rsplit(".", 1)
    assert tag == TAG1 and int(n) == 1 + max((int(k.rsplit(".", 1)[1]) for k in before if k.startswith(TAG1)),
                                             default=0)
    man = json.loads((out / "build.json").read_text())
    assert man["ok"] is False and man["exit_status"] is None and man["id"] == out.name
    assert man["error"] == ("interrupted (Ctrl-C)" if sig == signal.SIGINT
                            else "terminated by SIGTERM; build stopped and cleaned up")
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "build.log", "packages"]
