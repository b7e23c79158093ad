"""The root's Portage configuration: portage_confdir, make.conf, repos.conf, make.profile and world."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path
from typing import NoReturn

from chroot.errors import ChrootError
from chroot.mounts import inside, remove_entry
from chroot.newfile import kind_at, open_dir, read_file, replace_file, replace_symlink
from chroot.procs import die_with_parent
from chroot.spec import PortageSettings, Signing

PKGDIR = "/var/cache/binpkgs"
DISTDIR = "/var/cache/distfiles"
REPOS_CONF_FILE = "zz-snapshotter.conf"
_MAKE_CONF_HEADER = "# ---- written by snapshotter build (profile {name}); later assignments win ----\n"

# Signing: a tmpfs at SIGNING_DIR exists only in the build's mount namespace (nsrun.PrivateDir); it holds
# a copy of the key's GnuPG home and of the passphrase file.
SIGNING_DIR = "/run/snapshotter-signing"
SIGNING_GNUPGHOME = f"{SIGNING_DIR}/gnupg"
SIGNING_PASSPHRASE = f"{SIGNING_DIR}/passphrase"
PORTAGE_GNUPGHOME = "etc/portage/gnupg"  # where Portage verifies binary packages (BINPKG_GPG_VERIFY_GPG_HOME)
MAKE_GLOBALS = "usr/share/portage/config/make.globals"
# Portage 3.0.83's make.globals value, used when the stage's make.globals does not set it.
DEFAULT_SIGNING_BASE_COMMAND = ("/usr/bin/flock /run/lock/portage-binpkg-gpg.lock /usr/bin/gpg --sign --armor "
                                "[PORTAGE_CONFIG]")
# Set by the builder when it signs; a profile's make_conf must not set them then.
SIGNING_VARS = frozenset({"BINPKG_GPG_SIGNING_GPG_HOME", "BINPKG_GPG_SIGNING_KEY"})


def _quote(value: str) -> str:
    """A double-quoted make.conf value: `${VAR}` references keep working, quotes/backslashes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_signing_settings(profile: PortageSettings) -> None:
    """ChrootError unless `profile` can sign: gpkg format, and none of the variables the builder sets."""
    fmt = profile.make_conf.get("BINPKG_FORMAT", "gpkg")
    if fmt != "gpkg":
        raise ChrootError(f"profile {profile.name}: make_conf BINPKG_FORMAT is {fmt!r}, but only \"gpkg\" "
                          "packages can be signed (a signing key is configured for this profile)")
    clash = sorted(SIGNING_VARS & profile.make_conf.keys())
    if clash:
        raise ChrootError(f"profile {profile.name}: make_conf {clash[0]} is set by the builder when it signs "
                          "packages; remove it (the key is [binhost] signing_key / gnupghome)")
    base = profile.make_conf.get("BINPKG_GPG_SIGNING_BASE_COMMAND")
    if base is not None and "[PORTAGE_CONFIG]" not in base:
        raise ChrootError(f"profile {profile.name}: make_conf BINPKG_GPG_SIGNING_BASE_COMMAND has no "
                          "[PORTAGE_CONFIG] (where Portage puts the key, home and digest options)")


def signing_base_command(root: Path | None, profile: PortageSettings) -> str:
    """The gpg command Portage signs with, before the builder's additions: the profile's make_conf value,
    else the stage's make.globals, else Portage's default (DEFAULT_SIGNING_BASE_COMMAND)."""
    given = profile.make_conf.get("BINPKG_GPG_SIGNING_BASE_COMMAND")
    if given is not None:
        return given
    if root is not None:
        path = inside(root, MAKE_GLOBALS)
        if path.is_file() and not path.is_symlink():
            m = re.search(r'^BINPKG_GPG_SIGNING_BASE_COMMAND="([^"\n]*)"', path.read_text(errors="replace"), re.M)
            if m and "[PORTAGE_CONFIG]" in m[1]:
                return m[1]
    return DEFAULT_SIGNING_BASE_COMMAND


def signing_make_conf(signing: Signing, base_command: str) -> dict[str, str]:
    """make.conf variables that make Portage sign every gpkg with `signing`'s key from SIGNING_GNUPGHOME.

    A passphrase is read from SIGNING_PASSPHRASE with the loopback pinentry: gpg's options go in front of
    Portage's own (`[PORTAGE_CONFIG]`: --homedir, --local-user, --digest-algo, --batch, ...)."""
    out = {"BINPKG_FORMAT": "gpkg", "BINPKG_GPG_SIGNING_GPG_HOME": SIGNING_GNUPGHOME,
           "BINPKG_GPG_SIGNING_KEY": signing.fingerprint}
    if signing.passphrase_file is not None:
        extra = f"--pinentry-mode loopback --passphrase-file {shlex.quote(SIGNING_PASSPHRASE)}"
        out["BINPKG_GPG_SIGNING_BASE_COMMAND"] = base_command.replace("[PORTAGE_CONFIG]",
                                                                      f"{extra} [PORTAGE_CONFIG]", 1)
    return out


def make_conf_block(profile: PortageSettings, signing: Signing | None = None, base_command: str | None = None) -> str:
    """The make.conf lines this profile adds (deterministic: FEATURES, PKGDIR, DISTDIR, then sorted; with
    `signing`, FEATURES has binpkg-signing and the signing variables follow, as the last assignments)."""
    feats = profile.features()
    if signing is not None and "binpkg-signing" not in feats:
        feats.append("binpkg-signing")
    lines = [_MAKE_CONF_HEADER.format(name=profile.name),
             f"FEATURES={_quote(' '.join(feats))}\n",
             f"PKGDIR={_quote(PKGDIR)}\n",
             f"DISTDIR={_quote(DISTDIR)}\n"]
    sign_vars = {} if signing is None else signing_make_conf(signing, base_command or DEFAULT_SIGNING_BASE_COMMAND)
    for var in sorted(profile.make_conf):
        if var != "FEATURES" and var not in sign_vars:
            lines.append(f"{var}={_quote(profile.make_conf[var])}\n")
    if sign_vars:
        lines.append("# signed packages: the key's GnuPG home exists only while the build runs\n")
        lines += [f"{var}={_quote(sign_vars[var])}\n" for var in sorted(sign_vars)]
    return "".join(lines)


def copy_confdir(src: Path, root: Path) -> None:
    """Copy portage_confdir over ROOT/etc/portage (files replace the stage's; symlinks kept as links).

    Every write is relative to a directory descriptor, never following the stage's links: a stage's
    symlink or file where the confdir has a directory is replaced by a directory, a stage's link or
    directory where it has a file by the file."""
    fd = open_dir(root, "etc/portage")
    try:
        _copy_tree(src, fd, f"{root}/etc/portage")
    finally:
        os.close(fd)


def _copy_tree(src: Path, dir_fd: int, shown: str) -> None:
    with os.scandir(src) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        where = f"{shown}/{e.name}"
        if e.is_symlink():
            replace_symlink(dir_fd, e.name, os.readlink(e.path), where)
        elif e.is_dir(follow_symlinks=False):
            if kind_at(dir_fd, e.name) != "dir":
                remove_entry(dir_fd, e.name, where)
                os.mkdir(e.name, 0o755, dir_fd=dir_fd)
            sub = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                _copy_tree(Path(e.path), sub, where)
            finally:
                os.close(sub)
        else:
            st = e.stat(follow_symlinks=False)
            if kind_at(dir_fd, e.name) == "dir":
                remove_entry(dir_fd, e.name, where)
            replace_file(dir_fd, e.name, Path(e.path).read_bytes(), where, stat.S_IMODE(st.st_mode), st.st_mtime_ns)


def write_make_conf(root: Path, profile: PortageSettings, signing: Signing | None = None) -> str:
    """Append the profile's block to ROOT/etc/portage/make.conf (created if missing); return the file.
    A stage's make.conf that is a symlink (or not a regular file) is refused: the stage4 keeps the
    stage's own make.conf."""
    fd = open_dir(root, "etc/portage")
    try:
        shown = f"{root}/etc/portage/make.conf"
        if kind_at(fd, "make.conf") == "dir":
            raise ChrootError(f"{shown} is a directory; the builder needs a make.conf file")
        old = (read_file(fd, "make.conf", shown) or b"").decode()
        if old and not old.endswith("\n"):
            old += "\n"
        base = None
        if signing is not None:
            check_signing_settings(profile)
            base = signing_base_command(root, profile)
        content = old + make_conf_block(profile, signing, base)
        replace_file(fd, "make.conf", content.encode(), shown)
    finally:
        os.close(fd)
    return content


def swap_make_conf(root: Path, content: bytes | None) -> bytes | None:
    """Put `content` at ROOT/etc/portage/make.conf (None: remove it) and return what was there (None if
    nothing). For the stage4, packed after the build ran: its ebuilds may have left a symlink or a
    directory there, which is refused (one line), never read or written through."""
    fd = open_dir(root, "etc/portage", create=False)
    try:
        shown = f"{root}/etc/portage/make.conf"
        if kind_at(fd, "make.conf") == "dir":
            raise ChrootError(f"{shown} is a directory in the build root; a file is needed there")
        old = read_file(fd, "make.conf", shown)
        if content is None:
            remove_entry(fd, "make.conf", shown)
        else:
            replace_file(fd, "make.conf", content, shown)
    finally:
        os.close(fd)
    return old


def repos_conf(overlays: list[str]) -> str:
    out = ["[DEFAULT]\nmain-repo = gentoo\n\n[gentoo]\nlocation = /var/db/repos/gentoo\n"]
    for name in overlays:
        out.append(f"\n[{name}]\nlocation = /var/db/repos/{name}\n")
    return "".join(out)


def write_repos_conf(root: Path, overlays: list[str]) -> str:
    """ROOT/etc/portage/repos.conf/zz-snapshotter.conf: the pinned trees (a stage's repos.conf that is a
    file or a symlink is replaced by a directory; the stage's other files in it stay)."""
    content = repos_conf(overlays)
    fd = open_dir(root, "etc/portage")
    try:
        shown = f"{root}/etc/portage/repos.conf"
        if kind_at(fd, "repos.conf") != "dir":
            remove_entry(fd, "repos.conf", shown)  # the pinned trees replace whatever the stage synced from
    finally:
        os.close(fd)
    fd = open_dir(root, "etc/portage/repos.conf")
    try:
        replace_file(fd, REPOS_CONF_FILE, content.encode(), f"{shown}/{REPOS_CONF_FILE}")
    finally:
        os.close(fd)
    return content


def set_make_profile(root: Path, portage_profile: str, gentoo_tree: Path) -> None:
    """Point ROOT/etc/portage/make.profile at the profile in the gentoo tree (`gentoo_tree`: the tree the
    build mounts at /var/db/repos/gentoo, which must hold that profile directory)."""
    target = inside(gentoo_tree, f"profiles/{portage_profile}")
    if not target.is_dir():
        raise ChrootError(f"portage_profile {portage_profile!r}: no such profile directory in the tree "
                               "(profiles/ of the tag)")
    fd = open_dir(root, "etc/portage")
    try:
        replace_symlink(fd, "make.profile", f"../../var/db/repos/gentoo/profiles/{portage_profile}",
                        f"{root}/etc/portage/make.profile")
    finally:
        os.close(fd)


def write_world(root: Path, atoms: list[str]) -> None:
    """The profile's world: atoms to /var/lib/portage/world, @sets to world_sets."""
    pkgs = [a for a in atoms if not a.startswith("@")]
    sets = [a for a in atoms if a.startswith("@")]
    fd = open_dir(root, "var/lib/portage")
    try:
        for name, lines in (("world", pkgs), ("world_sets", sets)):
            replace_file(fd, name, "".join(f"{a}\n" for a in lines).encode(), f"{root}/var/lib/portage/{name}")
    finally:
        os.close(fd)


def copy_resolv_conf(root: Path, host: Path = Path("/etc/resolv.conf")) -> None:
    """The host's resolv.conf (read following its links, as the host resolves) replaces the root's."""
    fd = open_dir(root, "etc")
    try:
        shown = f"{root}/etc/resolv.conf"
        if host.exists():
            if kind_at(fd, "resolv.conf") == "dir":
                remove_entry(fd, "resolv.conf", shown)
            replace_file(fd, "resolv.conf", host.read_bytes(), shown)
        else:
            remove_entry(fd, "resolv.conf", shown)
    finally:
        os.close(fd)


def _gpg(home: Path, *args: str, stdin: bytes = b"", check: bool = True,
         fd: int | None = None) -> subprocess.CompletedProcess[bytes]:
    cmd = ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--no-options", "--no-autostart",
           "--no-permission-warning", *args]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, preexec_fn=die_with_parent(), timeout=120,
                          pass_fds=() if fd is None else (fd,))
    if check and proc.returncode != 0:
        _gpg_failed(args[0], proc)
    return proc


def _gpg_failed(what: str, proc: subprocess.CompletedProcess[bytes]) -> NoReturn:
    lines = [x for x in proc.stderr.decode(errors="replace").splitlines() if x.strip()]
    errors = [x for x in lines if "error" in x.lower() or "fail" in x.lower() or "invalid" in x.lower()]
    raise ChrootError(f"trusting the signing key in the root's /{PORTAGE_GNUPGHOME}: gpg {what} failed: "
                      f"{(errors or lines or [str(proc.returncode)])[-1]}")


def trust_signing_key(root: Path, public_key: str) -> list[str]:
    """Trust `public_key` in ROOT/etc/portage/gnupg as a client does (import, ownertrust ultimate,
    check-trustdb, readable by everyone: Portage verifies as `nobody`), so that Portage's check of each
    package it has just signed passes. Returns the imported primary fingerprints.

    Runs the host's gpg on the root's directory with --no-options (nothing of the stage's gpg.conf
    applies) and --no-autostart (no agent or keyboxd is started: a public key needs none). The host's
    gpg writes there as root, so the home must hold nothing it could follow out of the root: a home (or
    a directory on the way) that is a symlink, or one holding a symlink, a device or a fifo, is refused
    (one line naming it); stale sockets (an agent of an earlier build) are removed. gpg is given the
    home as /proc/self/fd/N of the checked directory, and the final chmod walk never follows a link."""
    shown = f"{root}/{PORTAGE_GNUPGHOME}"
    parent = open_dir(root, str(Path(PORTAGE_GNUPGHOME).parent))
    try:
        kind = kind_at(parent, "gnupg")
        if kind is None:
            os.mkdir("gnupg", 0o755, dir_fd=parent)
        elif kind != "dir":
            raise ChrootError(f"{shown} is {'a symlink' if kind == 'symlink' else 'not a directory'} in the "
                              "stage; refusing to write through it")
        home_fd = os.open("gnupg", _DIR_FLAGS, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        _check_gnupg_home(home_fd, shown)
        home = Path(f"/proc/self/fd/{home_fd}")
        # gpg --import exits 2 when it cannot ask an agent about secret keys (--no-autostart; or the agent's
        # socket path under a deep root is too long), though the public key was imported: its status says.
        proc = _gpg(home, "--import", "--status-fd", "1", stdin=public_key.encode(), check=False, fd=home_fd)
        fprs = sorted({line.split()[3] for line in proc.stdout.decode(errors="replace").splitlines()
                       if line.startswith("[GNUPG:] IMPORT_OK ") and len(line.split()) > 3})
        if not fprs:
            _gpg_failed("--import", proc)
        _gpg(home, "--import-ownertrust", stdin="".join(f"{f}:6:\n" for f in fprs).encode(), fd=home_fd)
        _gpg(home, "--check-trustdb", fd=home_fd)
        _open_up(home_fd)
    finally:
        os.close(home_fd)
    return fprs


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = {stat.S_IFLNK: "a symlink", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a fifo"}


def _check_gnupg_home(dir_fd: int, shown: str) -> None:
    """Refuse a GnuPG home holding anything but directories, regular files and sockets; remove sockets."""
    for name in sorted(os.listdir(dir_fd)):
        where = f"{shown}/{name}"
        mode = os.lstat(name, dir_fd=dir_fd).st_mode
        if stat.S_ISDIR(mode):
            sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                _check_gnupg_home(sub, where)
            finally:
                os.close(sub)
        elif stat.S_ISSOCK(mode):
            os.unlink(name, dir_fd=dir_fd)  # a stale agent socket: no agent runs in the root now
        elif not stat.S_ISREG(mode):
            raise ChrootError(f"{where} is {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')} in the root's "
                              "GnuPG home; refusing to run the host's gpg on it (remove it from the stage)")


def _open_up(dir_fd: int) -> None:
    """Directories 0755, regular files readable by all (Portage verifies as `nobody`); links never
    followed: every file is opened O_NOFOLLOW relative to its directory's descriptor."""
    os.fchmod(dir_fd, 0o755)
    for name in os.listdir(dir_fd):
        mode = os.lstat(name, dir_fd=dir_fd).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            continue
        flags = _DIR_FLAGS if stat.S_ISDIR(mode) else os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                _open_up(fd)
            elif stat.S_ISREG(st.st_mode):
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o444)
        finally:
            os.close(fd)
