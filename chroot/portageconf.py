"""The root's Portage configuration: portage_confdir, make.conf, repos.conf, make.profile and world."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import NoReturn

from chroot.errors import ChrootError
from chroot.mounts import inside, safe_rmtree
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
    """Copy portage_confdir over ROOT/etc/portage (files replace the stage's; symlinks kept as links)."""
    dest = inside(root, "etc/portage")
    dest.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target_dir = inside(dest, rel) if rel != "." else dest
        target_dir.mkdir(exist_ok=True)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            s = Path(dirpath) / name
            t = target_dir / name
            if t.is_symlink() or t.is_file():
                t.unlink()
            elif t.is_dir():
                safe_rmtree(t)
            if s.is_symlink():
                t.symlink_to(os.readlink(s))
            else:
                shutil.copy2(s, t, follow_symlinks=False)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for d in dirnames:  # a stage file where the confdir has a directory is replaced
            t = target_dir / d
            if t.is_symlink() or (t.exists() and not t.is_dir()):
                t.unlink()


def write_make_conf(root: Path, profile: PortageSettings, signing: Signing | None = None) -> str:
    """Append the profile's block to ROOT/etc/portage/make.conf (created if missing); return the file."""
    path = inside(root, "etc/portage/make.conf")
    if path.is_symlink():
        raise ChrootError(f"{path} is a symlink; refusing to write through it")
    if path.is_dir():
        raise ChrootError(f"{path} is a directory; the builder needs a make.conf file")
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    base = None
    if signing is not None:
        check_signing_settings(profile)
        base = signing_base_command(root, profile)
    content = old + make_conf_block(profile, signing, base)
    path.write_text(content)
    return content


def repos_conf(overlays: list[str]) -> str:
    out = ["[DEFAULT]\nmain-repo = gentoo\n\n[gentoo]\nlocation = /var/db/repos/gentoo\n"]
    for name in overlays:
        out.append(f"\n[{name}]\nlocation = /var/db/repos/{name}\n")
    return "".join(out)


def write_repos_conf(root: Path, overlays: list[str]) -> str:
    d = inside(root, "etc/portage/repos.conf")
    if d.is_symlink() or d.is_file():
        d.unlink()  # the pinned trees replace whatever the stage synced from
    d.mkdir(parents=True, exist_ok=True)
    content = repos_conf(overlays)
    (d / REPOS_CONF_FILE).write_text(content)
    return content


def set_make_profile(root: Path, portage_profile: str) -> None:
    target = inside(root, f"var/db/repos/gentoo/profiles/{portage_profile}")
    if not target.is_dir():
        raise ChrootError(f"portage_profile {portage_profile!r}: no such profile directory in the tree "
                               "(profiles/ of the tag)")
    link = inside(root, "etc/portage/make.profile")
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        safe_rmtree(link)
    link.symlink_to(f"../../var/db/repos/gentoo/profiles/{portage_profile}")


def write_world(root: Path, atoms: list[str]) -> None:
    """The profile's world: atoms to /var/lib/portage/world, @sets to world_sets."""
    d = inside(root, "var/lib/portage")
    d.mkdir(parents=True, exist_ok=True)
    pkgs = [a for a in atoms if not a.startswith("@")]
    sets = [a for a in atoms if a.startswith("@")]
    for name, lines in (("world", pkgs), ("world_sets", sets)):
        f = d / name
        if f.is_symlink():
            f.unlink()
        f.write_text("".join(f"{a}\n" for a in lines))


def copy_resolv_conf(root: Path, host: Path = Path("/etc/resolv.conf")) -> None:
    dest = inside(root, "etc/resolv.conf")
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    if host.exists():
        shutil.copyfile(host, dest)


def _gpg(home: Path, *args: str, stdin: bytes = b"", check: bool = True) -> subprocess.CompletedProcess[bytes]:
    cmd = ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--no-options", "--no-autostart",
           "--no-permission-warning", *args]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, preexec_fn=die_with_parent(), timeout=120)
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
    applies) and --no-autostart (no agent or keyboxd is started: a public key needs none)."""
    home = inside(root, PORTAGE_GNUPGHOME)
    if home.is_symlink() or (home.exists() and not home.is_dir()):
        raise ChrootError(f"{home} is not a directory in the stage; refusing to write through it")
    home.mkdir(mode=0o755, parents=True, exist_ok=True)
    # gpg --import exits 2 when it cannot ask an agent about secret keys (--no-autostart; or the agent's
    # socket path under a deep root is too long), though the public key was imported: its status says.
    proc = _gpg(home, "--import", "--status-fd", "1", stdin=public_key.encode(), check=False)
    fprs = sorted({line.split()[3] for line in proc.stdout.decode(errors="replace").splitlines()
                   if line.startswith("[GNUPG:] IMPORT_OK ") and len(line.split()) > 3})
    if not fprs:
        _gpg_failed("--import", proc)
    _gpg(home, "--import-ownertrust", stdin="".join(f"{f}:6:\n" for f in fprs).encode())
    _gpg(home, "--check-trustdb")
    for dirpath, _dirnames, filenames in os.walk(home):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, stat.S_IMODE(os.lstat(full).st_mode) | 0o444)
    return fprs
