"""Orchestration of one chroot build: `emerge` of a profile's world against a pinned tree.

The caller hands a resolved `BuildSpec` (chroot.spec) and holds the profile's lock. Order (everything
that can fail cheaply comes before anything is extracted): clean stale roots -> verify the stage sha256 ->
extract into a fresh root -> place the trees and the Portage config (and, when signing, trust the key in
the root) -> run emerge in private namespaces (nsrun.py) with the build's packages/ bind-mounted as PKGDIR
and the signing key's home copied into a tmpfs of the namespace -> build.json -> remove the root.

Output: the build's own directory (spec.output, OUTPUT/<profile>/<build id>/, created empty by the
caller) gets packages/, build.log and, last, build.json with "ok" true or false. Once the builder has
accepted the directory, every way out but kill -9 ends with a build.json: a setup error or a signal
records "ok": false and the reason in "error". Nothing ever replaces another build's directory.
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import chroot
from chroot import incremental, overlay, portageconf, stage, stage4
from chroot import manifest as manifestmod
from chroot.errors import ChrootError, MountedError, Terminated
from chroot.mounts import inside, mounts_under, safe_rmtree
from chroot.nsrun import NamespaceSpec, PrivateDir
from chroot.overlay import OverlayUnavailable
from chroot.procs import die_with_parent
from chroot.spec import BuildSpec, PortageSettings, Signing, TreeSource

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
    build_id: str = ""

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


def _mounts_below(root: Path) -> list[str]:
    """Mounts below the root, not counting the overlay root itself (mounted in this thread's namespace)."""
    return [m for m in mounts_under(root) if m != str(root)]


def _wait_namespace_gone(root: Path, timeout: float = 10.0, check: bool = True) -> None:
    """Wait until the namespace's processes are gone (the kernel kills them when its PID 1 dies) and
    (with `check`) that no mount is left below the root (they lived in the child's namespace only)."""
    deadline = time.monotonic() + timeout
    while (processes_in(root) or (check and _mounts_below(root))) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = processes_in(root)
    if left:
        log.warning("processes still running in %s: %s", root, left)
    below = _mounts_below(root) if check else []
    if below:
        raise MountedError(f"{root}: still mounted there after the build: {', '.join(sorted(below))}")


def run_in_namespace(root: Path, pkgdir: Path, argv: list[str], spec_path: Path, logf: IO[bytes],
                     console: bool, distfiles: Path | None = None, private: PrivateDir | None = None,
                     trees: list[tuple[str, str]] | None = None) -> int:
    """Run `argv` (the chroot command) inside fresh mount+PID namespaces; return its exit status.

    `pkgdir` (and `distfiles`, if given) are bind-mounted at the root's PKGDIR (and DISTDIR), `trees`
    ((host directory, directory in the root)) read-only; `private` is a tmpfs of the namespace holding
    copies of host files (the signing key's home)."""
    binds = [(str(pkgdir), portageconf.PKGDIR.lstrip("/"))]
    if distfiles is not None:
        binds.append((str(distfiles), portageconf.DISTDIR.lstrip("/")))
    spec_path.write_text(NamespaceSpec(root, binds, argv, private, list(trees or [])).to_json())
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


def check_host(signing: bool = False) -> None:
    """The builder needs root and a few host tools; say which is missing before anything is done."""
    if os.geteuid() != 0:
        raise ChrootError("snapshotter build must run as root (it extracts stages with their owners, "
                          "mounts and chroots)")
    for tool in ("unshare", "chroot", "mount", "tar", *(["gpg"] if signing else [])):
        if shutil.which(tool) is None:
            raise ChrootError(f"snapshotter build needs `{tool}` on PATH (util-linux / coreutils / tar / gnupg)")


def check_output_dir(path: Path) -> None:
    """The build's directory must exist, be a real directory and be empty: a build never writes into
    another build's directory."""
    if path.is_symlink() or not path.is_dir():
        raise ChrootError(f"build directory {path} does not exist or is not a directory")
    if any(path.iterdir()):
        raise ChrootError(f"build directory {path} is not empty; a build never writes into another build's "
                          "directory")


def _tree_mount(root: Path, source: TreeSource) -> tuple[str, str]:
    """The tree's mount point in the root (created if missing; whatever the stage shipped there is hidden
    by the mount) and the (host directory, directory in the root) pair nsrun bind-mounts read-only."""
    rel = f"{REPOS_DIR}/{source.name}"
    dest = inside(root, rel)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ChrootError(f"{dest} is not a directory in the stage; refusing to mount the {source.name} tree there")
    dest.mkdir(parents=True, exist_ok=True)
    if not source.path.is_dir():
        raise ChrootError(f"tree {source.name}: {source.path} is not a directory")
    return str(source.path), rel


def _copy_tree(src: Path, dest: Path) -> None:
    """Copy a tree (the cache's, read-only) into the empty directory `dest` of a root kept by --keep-root."""
    proc = subprocess.run(["cp", "-a", "--no-target-directory", "--", str(src), str(dest)], capture_output=True,
                          text=True, preexec_fn=die_with_parent())
    if proc.returncode != 0:
        raise ChrootError(f"copying the tree {src} into the kept root: {proc.stderr.strip()}")


def _mount_points(root: Path, signing: Signing | None) -> list[str]:
    points = ["proc", "dev", "sys", portageconf.PKGDIR.lstrip("/"), portageconf.DISTDIR.lstrip("/")]
    if signing is not None:
        points.append(portageconf.SIGNING_DIR.lstrip("/"))
    return points


def _private_dir(signing: Signing | None) -> PrivateDir | None:
    """The signing key's home (and passphrase file) as copies in a tmpfs of the build's namespace."""
    if signing is None:
        return None
    files = [] if signing.passphrase_file is None else \
        [(str(signing.passphrase_file), Path(portageconf.SIGNING_PASSPHRASE).name)]
    return PrivateDir(portageconf.SIGNING_DIR.lstrip("/"),
                      dirs=[(str(signing.gnupghome), Path(portageconf.SIGNING_GNUPGHOME).name)], files=files)


def run_build(spec: BuildSpec, *, console: bool = False) -> BuildResult:
    """Build `spec` into its directory `spec.output`; see the module docstring. The caller holds the
    profile's lock.

    Missing host tools or a `spec.output` that is not an empty directory raise ChrootError and touch
    nothing. From then on every failure is recorded in the build's directory (build.json "ok": false,
    with the reason in "error"): a setup problem (stage sha256, unsafe stage, trusting the key) or a
    signal is raised after that; an emerge failure returns ok=False (exit_status != 0).
    """
    check_host(signing=spec.signing is not None)
    check_output_dir(spec.output)
    profile = spec.settings
    man = manifestmod.Manifest(
        profile=profile.name, tag=spec.tag, commit=spec.commit, repo=spec.repo,
        stage={"source": spec.stage.source, "sha256": None,
               **({} if spec.stage.build is None else {"build": spec.stage.build})},
        overlays=[o.describe() for o in spec.overlays], portage_profile=profile.portage_profile,
        make_conf=None, portage_confdir=None, repos_conf="", world=profile.world,
        emerge_command=["emerge", *profile.emerge_args], snapshotter_version=spec.tool_version,
        id=spec.build_id, signing_key=None if spec.signing is None else spec.signing.fingerprint)
    log_path = spec.output / "build.log"
    man.started = _utc_now().isoformat()
    with open(log_path, "ab") as logf:
        logf.write(f">>> snapshotter: build {spec.build_id} of profile {profile.name}: tag {spec.tag} commit "
                   f"{spec.commit}\n".encode())
        try:
            with _stop_signals_raise():
                clean_stale(spec.work_dir)
                if spec.stage.unpacked is None or spec.stage.sha256 is None:
                    man.stage["sha256"] = stage.verify_stage(spec.stage.path, spec.stage.sha256)
                else:  # unpacked by the caller from a file with the pinned sha256: hashed when it was unpacked
                    man.stage["sha256"] = spec.stage.sha256
                return _build(spec, profile, man, logf, console)
        except BaseException as e:
            _record_failure(spec, man, logf, e)
            raise


def _record_failure(spec: BuildSpec, man: manifestmod.Manifest, logf: IO[bytes], exc: BaseException) -> None:
    """build.json "ok": false for a build stopped by `exc` before it recorded its own result. Never
    raises: the original exception is what the caller sees."""
    if (spec.output / "build.json").exists():
        return
    if isinstance(exc, KeyboardInterrupt):
        why = "interrupted (Ctrl-C)"
    elif isinstance(exc, ChrootError | OSError):
        why = str(exc) or type(exc).__name__
    else:
        why = f"{type(exc).__name__}: {exc}"
    man.ok = False
    man.error = why
    man.finished = _utc_now().isoformat()
    try:
        logf.write(f">>> snapshotter: build {spec.build_id} failed: {why}\n".encode())
        logf.flush()
        man.packages, man.packages_index = manifestmod.list_packages(spec.output / "packages")
        manifestmod.write(man, spec.output / "build.json")
        log.info("build %s of profile %s recorded as failed in %s", spec.build_id, spec.settings.name, spec.output)
    except OSError as e:
        log.error("could not record the failed build %s in %s: %s", spec.build_id, spec.output, e)


def _build(spec: BuildSpec, profile: PortageSettings, man: manifestmod.Manifest, logf: IO[bytes],
           console: bool) -> BuildResult:
    tag, out = spec.tag, spec.output
    stamp = _utc_now().strftime("%Y%m%dT%H%M%SZ")
    build_dir = spec.work_dir / f"{tag}-{stamp}-{os.getpid()}"
    build_dir.mkdir(parents=True)
    build_dir = build_dir.resolve()
    root = build_dir / "root"
    pkgdir = out / "packages"
    pkgdir.mkdir()
    if spec.reuse is not None:
        man.mode = "incremental"
        incremental.seed(spec.reuse, pkgdir)
    status = 1
    try:
        with ExitStack() as mounted:
            ready = time.monotonic()
            method = _make_root(spec, build_dir, root, mounted, logf)
            status = _prepare_and_emerge(spec, profile, man, build_dir, root, pkgdir, logf, console, method, ready)
    finally:
        _finish_root(build_dir, root, spec.keep_root)
    man.packages, man.packages_index = manifestmod.list_packages(pkgdir)
    if spec.reuse is not None:
        man.incremental = incremental.summary(spec.reuse, pkgdir)
    manifestmod.write(man, out / "build.json")
    log.info("build %s %s at %s: %s, output in %s", profile.name, spec.build_id, tag,
             "ok" if man.ok else f"FAILED ({status})", out)
    return BuildResult(ok=man.ok, exit_status=status, output_dir=out, log=out / "build.log",
                       manifest=out / "build.json", build_id=spec.build_id)


def _make_root(spec: BuildSpec, build_dir: Path, root: Path, mounted: ExitStack, logf: IO[bytes]) -> str:
    """Make the build's root: an overlay over the stage the caller unpacked (in a private mount namespace
    of this thread, entered on `mounted`, which unmounts and leaves it), else an extraction of the stage.
    Returns "overlay" or "extract"."""
    lower = spec.stage.unpacked
    if lower is not None and not spec.keep_root:
        try:
            mounted.enter_context(overlay.private_mount_namespace())
            overlay.mount_overlay(lower, build_dir, root)
        except OverlayUnavailable as e:
            why = f"overlay root unavailable ({e}); extracting the stage instead"
            log.warning("build %s: %s", spec.build_id, why)
            logf.write(f">>> snapshotter: {why}\n".encode())
        else:
            mounted.callback(_unmount_root, root)
            logf.write(f">>> snapshotter: root: overlay over the unpacked stage {lower}\n".encode())
            return "overlay"
    elif lower is not None:
        logf.write(b">>> snapshotter: --keep-root: extracting the stage (a kept root is a complete tree)\n")
    if lower is not None and spec.stage.sha256 is not None:
        stage.verify_stage(spec.stage.path, spec.stage.sha256)  # not hashed yet (see run_build)
    log.info("build %s: extracting %s", spec.build_id, spec.stage.path.name)
    for leftover in (build_dir / "upper", build_dir / "work"):
        if leftover.is_dir():
            safe_rmtree(leftover)
    if root.is_dir():
        root.rmdir()
    stage.extract_stage(spec.stage.path, root)
    return "extract"


def _unmount_root(root: Path) -> None:
    """Unmount the overlay root once the build's namespace is gone (its processes may hold files)."""
    _wait_namespace_gone(root, check=False)
    overlay.unmount(root)


def _prepare_and_emerge(spec: BuildSpec, profile: PortageSettings, man: manifestmod.Manifest, build_dir: Path,
                        root: Path, pkgdir: Path, logf: IO[bytes], console: bool, method: str,
                        ready: float) -> int:
    """The trees' mount points and the Portage config in the root, then emerge in the build's namespaces
    (and, after a good build, the stage4). Returns emerge's exit status."""
    tag, commit = spec.tag, spec.commit
    trees = [_tree_mount(root, t) for t in (spec.gentoo, *spec.overlays)]
    if spec.keep_root:  # a kept root can be entered again after the build: it gets copies of the trees
        for host, rel in trees:
            _copy_tree(Path(host), inside(root, rel))
        trees = []
    if profile.portage_confdir is not None:
        portageconf.copy_confdir(profile.portage_confdir, root)
        man.portage_confdir = {"path": str(profile.portage_confdir),
                               "sha256": profile.portage_confdir_sha256}
    make_conf_path = inside(root, "etc/portage/make.conf")
    stage_make_conf = make_conf_path.read_bytes() if make_conf_path.is_file() and \
        not make_conf_path.is_symlink() else None
    make_conf = portageconf.write_make_conf(root, profile, spec.signing)
    man.make_conf = {"content": make_conf, "sha256": manifestmod.sha256_text(make_conf)}
    man.repos_conf = portageconf.write_repos_conf(root, [o.name for o in spec.overlays])
    if profile.portage_profile:
        portageconf.set_make_profile(root, profile.portage_profile, spec.gentoo.path)
    if profile.world is not None:
        portageconf.write_world(root, profile.world)
    portageconf.copy_resolv_conf(root)
    if spec.signing is not None:
        fprs = portageconf.trust_signing_key(root, spec.signing.public_key)
        logf.write(f">>> snapshotter: signing gpkgs with {spec.signing.fingerprint}; trusted in "
                   f"/{portageconf.PORTAGE_GNUPGHOME}: {', '.join(fprs)}\n".encode())
    for d in _mount_points(root, spec.signing):
        t = inside(root, d)
        if t.is_symlink():
            raise ChrootError(f"{t} is a symlink in the stage; refusing to mount there")
        t.mkdir(parents=True, exist_ok=True)
    man.root = {"method": method, "seconds": round(time.monotonic() - ready, 2)}
    logf.write(f">>> snapshotter: root ready ({method}) in {man.root['seconds']} s\n".encode())
    argv = emerge_argv(root, profile)
    started = time.time()
    man.started = _utc_now().isoformat()
    log.info("build %s %s at %s (%s): emerge %s", profile.name, spec.build_id, tag, commit[:12],
             " ".join(profile.emerge_args))
    logf.flush()
    spec.distfiles.mkdir(parents=True, exist_ok=True)
    status = run_in_namespace(root, pkgdir.resolve(), argv, build_dir / "nsrun.json", logf, console,
                              distfiles=spec.distfiles.resolve(), private=_private_dir(spec.signing), trees=trees)
    man.finished = _utc_now().isoformat()
    man.duration_seconds = round(time.time() - started, 1)
    man.exit_status = status
    man.ok = status == 0
    if man.ok and spec.stage4:
        man.stage4 = _pack_stage4(spec, root, stage_make_conf, logf)
    return status


def _pack_stage4(spec: BuildSpec, root: Path, stage_make_conf: bytes | None, logf: IO[bytes]) -> dict[str, Any]:
    """Pack the root of a successful build as OUTPUT/.../stage4.tar.zst (chroot.stage4), once the build's
    namespace is gone. make.conf is packed as the stage had it: the builder's block (PKGDIR, signing
    variables) belongs to this build only, and a build seeded from this stage appends its own block again.
    """
    _wait_namespace_gone(root)
    left = processes_in(root)
    if left:
        raise ChrootError(f"processes still run in the build root {root} ({left}); not packing a stage4")
    # The build's ebuilds ran in this root: make.conf is swapped without following what they may have left.
    built = portageconf.swap_make_conf(root, stage_make_conf)
    dest = spec.output / stage4.STAGE4_NAME
    started = time.time()
    try:
        digest, size = stage4.pack_root(root, dest, spec.source_time)
    finally:
        portageconf.swap_make_conf(root, built)  # a kept root (--keep-root) shows the make.conf the build used
    logf.write(f">>> snapshotter: stage4 {dest.name}: {size} bytes, sha256 {digest} "
               f"({time.time() - started:.1f} s)\n".encode())
    log.info("build %s: stage4 %s (%d bytes)", spec.build_id, dest, size)
    return {"file": dest.name, "sha256": digest, "size": size}


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
