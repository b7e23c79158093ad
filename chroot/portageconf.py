"""The root's Portage configuration: portage_confdir, make.conf, repos.conf, make.profile and world."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from chroot.errors import ChrootError
from chroot.mounts import inside, safe_rmtree
from chroot.spec import PortageSettings

PKGDIR = "/var/cache/binpkgs"
DISTDIR = "/var/cache/distfiles"
REPOS_CONF_FILE = "zz-snapshotter.conf"
_MAKE_CONF_HEADER = "# ---- written by snapshotter build (profile {name}); later assignments win ----\n"


def _quote(value: str) -> str:
    """A double-quoted make.conf value: `${VAR}` references keep working, quotes/backslashes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_conf_block(profile: PortageSettings) -> str:
    """The make.conf lines this profile adds (deterministic: FEATURES, PKGDIR, DISTDIR, then sorted)."""
    lines = [_MAKE_CONF_HEADER.format(name=profile.name),
             f"FEATURES={_quote(' '.join(profile.features()))}\n",
             f"PKGDIR={_quote(PKGDIR)}\n",
             f"DISTDIR={_quote(DISTDIR)}\n"]
    for var in sorted(profile.make_conf):
        if var != "FEATURES":
            lines.append(f"{var}={_quote(profile.make_conf[var])}\n")
    return "".join(lines)


def tree_hash(path: Path) -> str:
    """sha256 over a directory's relative paths, kinds, modes, symlink targets and file contents."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, path)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                h.update(f"L {rel} {os.readlink(full)}\0".encode())
            else:
                h.update(f"F {rel} {stat.S_IMODE(st.st_mode):o}\0".encode())
                with open(full, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
        for d in dirnames:
            if not os.path.islink(os.path.join(dirpath, d)):
                h.update(f"D {os.path.normpath(os.path.join(rel_dir, d))}\0".encode())
    return h.hexdigest()


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


def write_make_conf(root: Path, profile: PortageSettings) -> str:
    """Append the profile's block to ROOT/etc/portage/make.conf (created if missing); return the file."""
    path = inside(root, "etc/portage/make.conf")
    if path.is_symlink():
        raise ChrootError(f"{path} is a symlink; refusing to write through it")
    if path.is_dir():
        raise ChrootError(f"{path} is a directory; the builder needs a make.conf file")
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    content = old + make_conf_block(profile)
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
