"""A stand-in Gentoo stage for real chroot builds: Debian minbase + a system-wide real Portage.

A real stage3 cannot be downloaded here, so the tests build one (recipe measured in
shared/notes/real-portage-in-tests.md §2): `debootstrap --variant=minbase bookworm`, Portage installed the
way Gentoo installs it (meson, system-wide, from the PyPI sdist), and the Gentoo-isms a stage3 has
(`portage` user/group 250, /usr/bin/python, /usr/bin/gtar, /var/lib/portage, ...). It is packed as
`stage-<recipe hash>.tar.zst` under /var/cache/snapshotter-tests/ and reused across runs; any change of
this file changes the hash and rebuilds it. Run `python tests/helpers/stage.py` to build it ahead of the tests.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PORTAGE_VERSION = "3.0.83"
SUITE = "bookworm"
INCLUDE = "python3,rsync,wget,xz-utils,zstd,bzip2,gnupg,pax-utils,make,patch"
CACHE_DIR = Path(os.environ.get("SNAPSHOTTER_TEST_CACHE", "/var/cache/snapshotter-tests"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def recipe_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def stage_path() -> Path:
    return CACHE_DIR / f"stage-{recipe_hash()}.tar.zst"


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line sources)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        m = re.search(r"^URIs:\s*(\S+)", path.read_text(), re.M)
        if m and "security" not in m[1]:
            return m[1]
    sl = Path("/etc/apt/sources.list")
    if sl.exists():
        m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", sl.read_text(), re.M)
        if m:
            return m[1]
    return DEFAULT_MIRROR


def _run(cmd: list[str], **kw) -> None:
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"stage: {' '.join(cmd[:3])}... {time.monotonic() - t:.1f}s", file=sys.stderr)


def _install_portage(root: Path, work: Path) -> None:
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "pip"), "-q", "--disable-pip-version-check"]
    _run([*pip, "install", "meson", "ninja"])
    _run([*pip, "download", "--no-deps", "--no-binary", "portage", "-d", str(work / "sdist"),
          f"portage=={PORTAGE_VERSION}"])
    (sdist,) = (work / "sdist").glob("portage-*.tar.gz")
    _run(["tar", "-C", str(work), "-xzf", str(sdist)])
    src = work / f"portage-{PORTAGE_VERSION}"
    native = work / "native.ini"
    native.write_text("[binaries]\npython = '/usr/bin/python3'\n")
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    _run([str(venv / "bin" / "meson"), "setup", str(work / "build"), str(src), "--native-file", str(native),
          "-Dprefix=/usr", "-Dsysconfdir=/etc", "-Dsystem-wide=true", "-Dnative-extensions=false",
          "-Dpython.purelibdir=/usr/lib/python3/dist-packages",
          "-Dpython.platlibdir=/usr/lib/python3/dist-packages", "-Drsync-verify=false"], env=env)
    _run([str(venv / "bin" / "meson"), "install", "-C", str(work / "build"), "--quiet"],
         env=dict(env, DESTDIR=str(root)))


def _gentooize(root: Path) -> None:
    for link, target in (("usr/bin/python", "python3"), ("usr/bin/gtar", "tar")):
        p = root / link
        if not p.exists():
            p.symlink_to(target)
    with open(root / "etc/group", "a") as f:
        f.write("portage:x:250:portage\n")
    with open(root / "etc/passwd", "a") as f:
        f.write("portage:x:250:250:portage:/var/lib/portage/home:/bin/false\n")
    with open(root / "etc/shadow", "a") as f:
        f.write("portage:!:19000::::::\n")
    for d in ("var/lib/portage/home", "var/cache/binpkgs", "var/cache/distfiles", "var/db/repos",
              "etc/portage/repos.conf"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/portage/world").write_text("")
    # A stage3's make.profile points into the tree; the builder re-points it per profile.
    mp = root / "etc/portage/make.profile"
    if not mp.is_symlink():
        mp.symlink_to("../../var/db/repos/gentoo/profiles/default")
    # Slim: documentation and apt's caches are not needed to build.
    for d in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt",
              "var/lib/apt/lists"):
        p = root / d
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            p.mkdir()


def build_stage(dest: Path) -> None:
    """Build the stand-in stage tarball at `dest` (about 1-2 minutes with a warm network)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stage-build-", dir=dest.parent))
    try:
        root = work / "root"
        # debootstrap mounts /proc and /sys in the target: a private mount namespace drops them on any exit.
        _run(["unshare", "--mount", "--propagation", "private", "debootstrap", "--variant=minbase",
              f"--include={INCLUDE}", SUITE, str(root), debian_mirror()])
        _install_portage(root, work)
        _gentooize(root)
        part = dest.with_name(dest.name + ".part")
        _run(["tar", "-C", str(root), "--numeric-owner", "--xattrs", "--sort=name", "-I", "zstd -T0 -3",
              "-cf", str(part), "."])
        os.replace(part, dest)
    finally:
        _assert_unmounted(work)  # never delete through a mount point
        shutil.rmtree(work)


def _assert_unmounted(path: Path) -> None:
    prefix = str(path.resolve()).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp.startswith(prefix) or mp == prefix[:-1]:
                raise RuntimeError(f"{mp} is still mounted: refusing to delete {path}")


def ensure_stage() -> Path:
    """The cached stand-in stage, built once (under a lock: parallel runs wait for one builder)."""
    dest = stage_path()
    if dest.exists():
        return dest
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "stage.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.exists():
            for old in CACHE_DIR.glob("stage-*.tar.zst"):
                old.unlink()
            build_stage(dest)
    return dest


if __name__ == "__main__":
    t0 = time.monotonic()
    print(ensure_stage(), f"{time.monotonic() - t0:.0f}s")
