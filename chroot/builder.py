"""Orchestration of one chroot build: `emerge` of a profile's world against a pinned tag.

Order (everything that can fail cheaply comes before anything is extracted):
lock the profile -> clean stale roots -> resolve tag and overlays -> fetch + verify the stage sha256 ->
extract into a fresh root -> place the trees and the Portage config -> run emerge in private namespaces
(nsrun.py) with the output's packages/ bind-mounted as PKGDIR -> build.json -> remove the root.

Output: OUTPUT/<profile>/<tag>/ {packages/, build.log, build.json} on success; a failed build lands in
OUTPUT/<profile>/<tag>.failed/ so it never replaces the packages of a good build.
"""

from __future__ import annotations

import json
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import chroot
from chroot import manifest as manifestmod
from chroot import portageconf, stage, tree
from chroot.mounts import assert_unmounted, inside, mounts_under, safe_rmtree
from chroot.procs import die_with_parent
from chroot.profile import Profile, validate_name
from snapshotter import __version__
from snapshotter.config import Config
from snapshotter.errors import ConfigError, SnapshotterError
from snapshotter.gitrepo import Mirror
from snapshotter.lock import flocked

log = logging.getLogger(__name__)

CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KEEP_MARKER = "KEPT"  # a kept root (--keep-root) is not stale; delete its build dir by hand
LOG_TAIL_LINES = 20


@dataclass
class BuildRequest:
    profile: str
    tag: str | None = None  # default: the newest tag of the mirror
    overlay_refs: dict[str, str] = field(default_factory=dict)  # overlay name -> ref, overriding the profile
    output: Path | None = None  # default: [build].output
    keep_root: bool = False


@dataclass
class BuildResult:
    ok: bool
    exit_status: int
    output_dir: Path
    log: Path
    manifest: Path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        return read_tail(self.log, lines)


class Terminated(SnapshotterError):
    """The builder got SIGTERM (or SIGHUP); everything was cleaned up."""

    exit_code = 143


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


def _profile(cfg: Config, req: BuildRequest) -> Profile:
    validate_name(req.profile)
    prof = cfg.profiles.get(req.profile)
    if prof is None:
        known = ", ".join(sorted(cfg.profiles)) or "none configured"
        raise ConfigError(f"unknown build profile {req.profile!r} (profiles: {known})")
    if req.overlay_refs:
        names = {o.name for o in prof.overlays}
        for name in req.overlay_refs:
            if name not in names:
                raise ConfigError(f"overlay {name!r} is not an overlay of profile {req.profile}")
        from chroot.profile import _overlays

        prof = Profile(**{**prof.__dict__, "overlays": _overlays(
            f"profiles.{prof.name}.overlays",
            [{"name": o.name, "url": o.url, "ref": req.overlay_refs.get(o.name, o.ref)} for o in prof.overlays],
            Path("/"))})
    return prof


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
            raise SnapshotterError(f"stale build root {d} still has mounts ({', '.join(found)}); unmount them "
                                   "(umount -R) and retry; nothing was deleted")
        log.warning("removing stale build dir %s from an earlier run", d)
        try:
            safe_rmtree(d)
        except OSError as e:
            raise SnapshotterError(f"cannot remove stale build dir {d}: {e.strerror or e}; is a process of "
                                   "a crashed build still running in it?") from None


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise Terminated(f"terminated by {signal.Signals(signum).name}; build stopped and cleaned up")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
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
    spec_path.write_text(json.dumps({"root": str(root), "binds": binds, "argv": argv}))
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


def emerge_argv(root: Path, profile: Profile) -> list[str]:
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


def run_build(cfg: Config, req: BuildRequest, *, console: bool = False) -> BuildResult:
    """Build `req.profile` at `req.tag`; see the module docstring.

    Setup problems (unknown profile or tag, bad stage_sha256, overlay ref, locked profile) raise
    SnapshotterError before anything is built; an emerge failure returns ok=False (exit_status != 0).
    """
    profile = _profile(cfg, req)
    if os.geteuid() != 0:
        raise SnapshotterError("snapshotter build must run as root (it extracts stages with their owners, "
                               "mounts and chroots)")
    for tool in ("unshare", "chroot", "mount", "tar"):
        if shutil.which(tool) is None:
            raise SnapshotterError(f"snapshotter build needs `{tool}` on PATH (util-linux / coreutils / tar)")
    mirror = Mirror(cfg.repo, cfg.git.branch).require()
    if req.tag is None:
        newest = mirror.newest_tag()
        if newest is None:
            raise SnapshotterError(f"{cfg.repo} has no snapshot tags yet; run `snapshotter sync` first")
        tag = newest
    else:
        tag = mirror.find_tag(req.tag)
    out_base = (req.output or cfg.build.output) / profile.name
    work = cfg.build.work_dir
    with _sigterm_raises(), flocked(work / f"{profile.name}.lock", f"build profile {profile.name}"):
        clean_stale(work / profile.name)
        out_base.mkdir(parents=True, exist_ok=True)
        for d in [*out_base.glob(".*.partial-*"), *out_base.glob(".*.old-*")]:  # left by a crashed run
            safe_rmtree(d)
        return _build_locked(cfg, req, profile, mirror, tag.name, tag.commit, out_base, console)


def _build_locked(cfg: Config, req: BuildRequest, profile: Profile, mirror: Mirror, tag: str, commit: str,
                  out_base: Path, console: bool) -> BuildResult:
    # Everything that can be checked without a root is checked first: nothing is created on failure.
    overlays = [tree.fetch_overlay(o, cfg.build.cache_dir) for o in profile.overlays]
    stage_file = stage.fetch_stage(profile.stage, cfg.build.cache_dir / "stages", profile.stage_sha256,
                                   timeout=cfg.sync.timeout)
    stage_sha = stage.verify_stage(stage_file, profile.stage_sha256)

    stamp = _utc_now().strftime("%Y%m%dT%H%M%SZ")
    build_dir = cfg.build.work_dir / profile.name / f"{tag}-{stamp}-{os.getpid()}"
    build_dir.mkdir(parents=True)
    build_dir = build_dir.resolve()
    root = build_dir / "root"
    staging = out_base / f".{tag}.partial-{os.getpid()}"
    staging.mkdir()
    pkgdir = staging / "packages"
    pkgdir.mkdir()
    log_path = staging / "build.log"
    ok = False
    try:
        log.info("build %s at %s (%s): extracting %s", profile.name, tag, commit[:12], stage_file.name)
        stage.extract_stage(stage_file, root)
        tree.place_gentoo(root, mirror.path, commit)
        for ov in overlays:
            tree.place_overlay(root, ov)
        confdir_hash = None
        if profile.portage_confdir is not None:
            portageconf.copy_confdir(profile.portage_confdir, root)
            confdir_hash = portageconf.tree_hash(profile.portage_confdir)
        make_conf = portageconf.write_make_conf(root, profile)
        repos_conf = portageconf.write_repos_conf(root, [o.name for o in overlays])
        if profile.portage_profile:
            portageconf.set_make_profile(root, profile.portage_profile)
        if profile.world is not None:
            portageconf.write_world(root, profile.world)
        portageconf.copy_resolv_conf(root)
        for d in ("proc", "dev", "sys", portageconf.PKGDIR.lstrip("/"), portageconf.DISTDIR.lstrip("/")):
            t = inside(root, d)
            if t.is_symlink():
                raise SnapshotterError(f"{t} is a symlink in the stage; refusing to mount there")
            t.mkdir(parents=True, exist_ok=True)
        argv = emerge_argv(root, profile)
        man = manifestmod.Manifest(
            profile=profile.name, tag=tag, commit=commit, repo=str(mirror.path),
            stage={"source": profile.stage, "sha256": stage_sha},
            overlays=[{"name": o.name, "url": o.url, "ref": o.ref, "commit": o.commit} for o in overlays],
            portage_profile=profile.portage_profile,
            make_conf={"content": make_conf, "sha256": manifestmod.sha256_text(make_conf)},
            portage_confdir=None if confdir_hash is None else {"path": str(profile.portage_confdir),
                                                               "sha256": confdir_hash},
            repos_conf=repos_conf, world=profile.world,
            emerge_command=["emerge", *profile.emerge_args],
            snapshotter_version=__version__)
        started = time.time()
        man.started = _utc_now().isoformat()
        log.info("build %s at %s: emerge %s", profile.name, tag, " ".join(profile.emerge_args))
        with open(log_path, "ab") as logf:
            logf.write(f">>> snapshotter: build {profile.name} tag {tag} commit {commit}\n".encode())
            distfiles = cfg.build.distfiles or cfg.build.cache_dir / "distfiles"
            distfiles.mkdir(parents=True, exist_ok=True)
            status = run_in_namespace(root, pkgdir.resolve(), argv, build_dir / "nsrun.json", logf, console,
                                      distfiles=distfiles.resolve())
        man.finished = _utc_now().isoformat()
        man.duration_seconds = round(time.time() - started, 1)
        man.exit_status = status
        ok = man.ok = status == 0
        man.packages, man.packages_index = manifestmod.list_packages(pkgdir)
        manifestmod.write(man, staging / "build.json")
    finally:
        _finish_root(build_dir, root, req.keep_root)
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
    except (SnapshotterError, OSError) as e:
        log.error("could not remove build dir %s (%s); the next build of this profile retries", build_dir, e)
