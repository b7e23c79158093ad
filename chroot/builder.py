"""Orchestration of one chroot build: `emerge` of a profile's world against a pinned tree.

The caller hands a resolved `BuildSpec` (chroot.spec) and holds the profile's lock. Order (everything
that can fail cheaply comes before anything is extracted): clean stale roots -> verify the stage sha256 ->
extract into a fresh root -> place the trees and the Portage config -> run emerge in private namespaces
(nsrun.py) with the output's packages/ bind-mounted as PKGDIR -> build.json -> remove the root.

Output: OUTPUT/<profile>/<tag>/ {packages/, build.log, build.json} on success; a failed build lands in
OUTPUT/<profile>/<tag>.failed/ so it never replaces the packages of a good build.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import chroot
from chroot import manifest as manifestmod
from chroot import portageconf, stage
from chroot.errors import ChrootError, Terminated
from chroot.mounts import assert_unmounted, inside, mounts_under, safe_rmtree
from chroot.nsrun import NamespaceSpec
from chroot.procs import die_with_parent
from chroot.spec import BuildSpec, PortageSettings, TreeSource

log = logging.getLogger(__name__)

CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REPOS_DIR = "var/db/repos"
KEEP_MARKER = "KEPT"  # a kept root (--keep-root) is not stale; delete its build dir by hand
LOG_TAIL_LINES = 20


@dataclass
class BuildResult:
    ok: bool
    exit_status: int
    output_dir: Path
    log: Path
    manifest: Path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        return read_tail(self.log, lines)


def read_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def clean_stale(profile_dir: Path) -> None:
    """Remove build dirs of crashed runs (called with the profile lock held, so none is in use)."""
    if not profile_dir.is_dir():
        return
    for d in sorted(profile_dir.iterdir()):
        if not d.is_dir() or d.is_symlink():
            continue
        if (d / KEEP_MARKER).exists():
            log.info("keeping %s (kept root; delete it by hand when done)", d)
            continue
        found = mounts_under(d)
        if found:
            raise ChrootError(f"stale build root {d} still has mounts ({', '.join(found)}); unmount them "
                                   "(umount -R) and retry; nothing was deleted")
        log.warning("removing stale build dir %s from an earlier run", d)
        try:
            safe_rmtree(d)
        except OSError as e:
            raise ChrootError(f"cannot remove stale build dir {d}: {e.strerror or e}; is a process of "
                                   "a crashed build still running in it?") from None


@contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """While the build runs: SIGTERM and SIGHUP raise Terminated, SIGINT (Ctrl-C) KeyboardInterrupt, so that
    the build is stopped and its root removed on the way out. SIGINT gets its handler whatever disposition
    was inherited: a job started from a non-interactive shell (`cmd &`) starts with SIGINT ignored, and
    Python then installs no handler of its own. The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise Terminated(f"terminated by {signal.Signals(signum).name}; build stopped and cleaned up")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def processes_in(root: Path) -> list[int]:
    """PIDs of processes whose root directory is `root` or below (chrooted into the build)."""
    prefix = str(root).rstrip("/")
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                r = os.readlink(f"/proc/{entry.name}/root")
            except OSError:
                continue
            if r == prefix or r.startswith(prefix + "/"):
                pids.append(int(entry.name))
    return pids


def _wait_namespace_gone(root: Path, timeout: float = 10.0) -> None:
    """Wait until the namespace's processes are gone (the kernel kills them when its PID 1 dies) and
    check that the host sees no mount under the root (mounts lived in the child's namespace only)."""
    deadline = time.monotonic() + timeout
    while (processes_in(root) or mounts_under(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = processes_in(root)
    if left:
        log.warning("processes still running in %s: %s", root, left)
    assert_unmounted(root)


def run_in_namespace(root: Path, pkgdir: Path, argv: list[str], spec_path: Path, logf: IO[bytes],
                     console: bool, distfiles: Path | None = None) -> int:
    """Run `argv` (the chroot command) inside fresh mount+PID namespaces; return its exit status.

    `pkgdir` (and `distfiles`, if given) are bind-mounted at the root's PKGDIR (and DISTDIR)."""
    binds = [(str(pkgdir), portageconf.PKGDIR.lstrip("/"))]
    if distfiles is not None:
        binds.append((str(distfiles), portageconf.DISTDIR.lstrip("/")))
    spec_path.write_text(NamespaceSpec(root, binds, argv).to_json())
    pkg_parent = str(Path(chroot.__file__).resolve().parent.parent)
    env = {"PATH": os.environ.get("PATH", CHROOT_PATH), "PYTHONPATH": pkg_parent, "LC_ALL": "C.UTF-8"}
    cmd = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--",
           sys.executable, "-m", "chroot.nsrun", str(spec_path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, preexec_fn=die_with_parent())
    try:
        assert proc.stdout is not None
        out = sys.stderr.buffer if console else None
        while chunk := os.read(proc.stdout.fileno(), 65536):
            logf.write(chunk)
            logf.flush()
            if out is not None:
                out.write(chunk)
                out.flush()
        return proc.wait()
    finally:
        _kill(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def emerge_argv(root: Path, profile: PortageSettings) -> list[str]:
    term = os.environ.get("TERM", "dumb")
    if not term.replace("-", "").replace("_", "").isalnum():
        term = "dumb"
    return ["chroot", str(root), "/usr/bin/env", "-i", "HOME=/root", f"TERM={term}", f"PATH={CHROOT_PATH}",
            "/bin/bash", "--login", "-c", 'exec emerge "$@"', "emerge", *profile.emerge_args]


def _replace_dir(src: Path, dest: Path) -> None:
    """Move `src` to `dest`, replacing a previous `dest` only after the new one is in place."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
    os.rename(src, dest)
    if old is not None:
        safe_rmtree(old)


def check_host() -> None:
    """The builder needs root and a few host tools; say which is missing before anything is done."""
    if os.geteuid() != 0:
        raise ChrootError("snapshotter build must run as root (it extracts stages with their owners, "
                          "mounts and chroots)")
    for tool in ("unshare", "chroot", "mount", "tar"):
        if shutil.which(tool) is None:
            raise ChrootError(f"snapshotter build needs `{tool}` on PATH (util-linux / coreutils / tar)")


def _place_tree(root: Path, source: TreeSource) -> None:
    dest = inside(root, f"{REPOS_DIR}/{source.name}")
    if dest.exists():
        safe_rmtree(dest)  # whatever the stage shipped there is replaced by the pinned tree
    source.place(dest)


def run_build(spec: BuildSpec, *, console: bool = False) -> BuildResult:
    """Build `spec`; see the module docstring. The caller holds the profile's lock.

    Setup problems (bad stage sha256, unsafe stage, missing host tools) raise ChrootError before
    anything is built; an emerge failure returns ok=False (exit_status != 0).
    """
    check_host()
    profile = spec.settings
    with _stop_signals_raise():
        clean_stale(spec.work_dir)
        spec.output.mkdir(parents=True, exist_ok=True)
        for d in [*spec.output.glob(".*.partial-*"), *spec.output.glob(".*.old-*")]:  # left by a crashed run
            safe_rmtree(d)
        stage_sha = stage.verify_stage(spec.stage.path, spec.stage.sha256)
        return _build(spec, profile, stage_sha, console)


def _build(spec: BuildSpec, profile: PortageSettings, stage_sha: str, console: bool) -> BuildResult:
    tag, commit, out_base = spec.tag, spec.commit, spec.output
    stamp = _utc_now().strftime("%Y%m%dT%H%M%SZ")
    build_dir = spec.work_dir / f"{tag}-{stamp}-{os.getpid()}"
    build_dir.mkdir(parents=True)
    build_dir = build_dir.resolve()
    root = build_dir / "root"
    staging = out_base / f".{tag}.partial-{os.getpid()}"
    staging.mkdir()
    pkgdir = staging / "packages"
    pkgdir.mkdir()
    log_path = staging / "build.log"
    ok = False
    status = 1
    try:
        log.info("build %s at %s (%s): extracting %s", profile.name, tag, commit[:12], spec.stage.path.name)
        stage.extract_stage(spec.stage.path, root)
        _place_tree(root, spec.gentoo)
        for ov in spec.overlays:
            _place_tree(root, ov)
        confdir_hash = None
        if profile.portage_confdir is not None:
            portageconf.copy_confdir(profile.portage_confdir, root)
            confdir_hash = portageconf.tree_hash(profile.portage_confdir)
        make_conf = portageconf.write_make_conf(root, profile)
        repos_conf = portageconf.write_repos_conf(root, [o.name for o in spec.overlays])
        if profile.portage_profile:
            portageconf.set_make_profile(root, profile.portage_profile)
        if profile.world is not None:
            portageconf.write_world(root, profile.world)
        portageconf.copy_resolv_conf(root)
        for d in ("proc", "dev", "sys", portageconf.PKGDIR.lstrip("/"), portageconf.DISTDIR.lstrip("/")):
            t = inside(root, d)
            if t.is_symlink():
                raise ChrootError(f"{t} is a symlink in the stage; refusing to mount there")
            t.mkdir(parents=True, exist_ok=True)
        argv = emerge_argv(root, profile)
        man = manifestmod.Manifest(
            profile=profile.name, tag=tag, commit=commit, repo=spec.repo,
            stage={"source": spec.stage.source, "sha256": stage_sha},
            overlays=[o.describe() for o in spec.overlays],
            portage_profile=profile.portage_profile,
            make_conf={"content": make_conf, "sha256": manifestmod.sha256_text(make_conf)},
            portage_confdir=None if confdir_hash is None else {"path": str(profile.portage_confdir),
                                                               "sha256": confdir_hash},
            repos_conf=repos_conf, world=profile.world,
            emerge_command=["emerge", *profile.emerge_args],
            snapshotter_version=spec.tool_version)
        started = time.time()
        man.started = _utc_now().isoformat()
        log.info("build %s at %s: emerge %s", profile.name, tag, " ".join(profile.emerge_args))
        with open(log_path, "ab") as logf:
            logf.write(f">>> snapshotter: build {profile.name} tag {tag} commit {commit}\n".encode())
            spec.distfiles.mkdir(parents=True, exist_ok=True)
            status = run_in_namespace(root, pkgdir.resolve(), argv, build_dir / "nsrun.json", logf, console,
                                      distfiles=spec.distfiles.resolve())
        man.finished = _utc_now().isoformat()
        man.duration_seconds = round(time.time() - started, 1)
        man.exit_status = status
        ok = man.ok = status == 0
        man.packages, man.packages_index = manifestmod.list_packages(pkgdir)
        manifestmod.write(man, staging / "build.json")
    finally:
        _finish_root(build_dir, root, spec.keep_root)
        if not ok and not (staging / "build.json").exists():
            safe_rmtree(staging)  # setup failed or interrupted: nothing was built
    final = out_base / (tag if ok else f"{tag}.failed")
    _replace_dir(staging, final)
    log.info("build %s at %s: %s, output in %s", profile.name, tag, "ok" if ok else f"FAILED ({status})", final)
    return BuildResult(ok=ok, exit_status=status, output_dir=final, log=final / "build.log",
                       manifest=final / "build.json")


def _finish_root(build_dir: Path, root: Path, keep: bool) -> None:
    """Remove (or keep) the build dir. Never raises: it runs while another error may be propagating;
    what cannot be removed now is reported and removed as stale by the profile's next build."""
    if keep:
        (build_dir / KEEP_MARKER).write_text("kept by --keep-root\n")
        log.info("build root kept at %s", root)
        return
    try:
        _wait_namespace_gone(root)
        safe_rmtree(build_dir)
    except (ChrootError, OSError) as e:
        log.error("could not remove build dir %s (%s); the next build of this profile retries", build_dir, e)
