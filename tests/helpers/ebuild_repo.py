"""A tiny EAPI 8 ebuild repository for real `emerge` runs, and git repositories holding it with date tags.

The main tree ("gentoo") has a profile `default` and:
  sys-apps/base      in @system (the profile's `packages`)
  dev-libs/libfoo    a library ...
  app-misc/hello     ... that hello depends on (DEPEND + RDEPEND)
  app-misc/fetched   has a distfile (fetched from GENTOO_MIRRORS, kept in the shared DISTDIR)
  dev-libs/tilde     keyworded ~amd64 only (needs package.accept_keywords)
  app-misc/stamp     installs the time it was built (/usr/share/stamp/built): never reproducible
  app-misc/trouble   version 1 sleeps in src_compile (for kill -9 tests), version 2 fails
Versions change between tags (`tree_files(hello="1.1")`). The overlay ("extra", masters = gentoo) holds
app-misc/extra, one version per overlay tag.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

from helpers import testlib

MAKE_DEFAULTS = """\
ARCH="amd64"
ACCEPT_KEYWORDS="amd64"
CHOST="x86_64-pc-linux-gnu"
ELIBC="glibc"
KERNEL="linux"
USERLAND="GNU"
ACCEPT_LICENSE="*"
IUSE_IMPLICIT="prefix prefix-guest prefix-stack"
USE_EXPAND="ELIBC KERNEL USERLAND"
USE_EXPAND_HIDDEN="ELIBC KERNEL USERLAND"
USE_EXPAND_IMPLICIT="ARCH ELIBC KERNEL USERLAND"
USE_EXPAND_UNPREFIXED="ARCH"
USE_EXPAND_VALUES_ARCH="amd64"
USE_EXPAND_VALUES_ELIBC="glibc"
USE_EXPAND_VALUES_KERNEL="linux"
USE_EXPAND_VALUES_USERLAND="GNU"
"""

EBUILD_HEAD = 'EAPI=8\nDESCRIPTION="{desc}"\nHOMEPAGE="https://example.org"\nLICENSE="MIT"\nSLOT="0"\n' \
              'KEYWORDS="amd64"\nS="${{WORKDIR}}"\n'

SLOW_MARKER = "TROUBLE-SLEEPING"
FAIL_MARKER = "TROUBLE-FAILS-ON-PURPOSE"


def _ebuild(desc: str, body: str, deps: str = "") -> str:
    dep = f'DEPEND="{deps}"\nRDEPEND="{deps}"\n' if deps else ""
    return EBUILD_HEAD.format(desc=desc) + dep + body


def _installs(path: str, text: str) -> str:
    d, name = path.rsplit("/", 1)
    return f'src_install() {{\n\tinsinto {d}\n\tnewins - {name} <<< "{text}"\n}}\n'


DISTFILE = "fetched-1.tar.gz"


def distfile() -> bytes:
    """The source tarball of app-misc/fetched (same bytes every time: fixed mtime, no gzip name/time)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as t:
            data = b"fetched from the distfiles mirror\n"
            info = tarfile.TarInfo("fetched-1/data.txt")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _manifest_dist(name: str, data: bytes) -> str:
    return (f"DIST {name} {len(data)} BLAKE2B {hashlib.blake2b(data).hexdigest()} "
            f"SHA512 {hashlib.sha512(data).hexdigest()}\n")


def tree_files(hello: str = "1.0", trouble: str = "1") -> dict[str, str | bytes | tuple]:
    files: dict[str, str | bytes | tuple] = {
        "profiles/repo_name": "gentoo\n",
        "profiles/categories": "app-misc\ndev-libs\nsys-apps\n",
        "profiles/arch.list": "amd64\n",
        "profiles/profiles.desc": "amd64 default stable\n",
        "profiles/license_groups": "FREE MIT\n",
        "profiles/default/eapi": "8\n",
        "profiles/default/make.defaults": MAKE_DEFAULTS,
        "profiles/default/packages": "*sys-apps/base\n",
        "licenses/MIT": "MIT License\n",
        "metadata/layout.conf": "masters =\nthin-manifests = true\n",
        # The canary shows whether the builder's environment reached the build (it must not: env -i).
        "sys-apps/base/base-1.ebuild": _ebuild("base system", _installs(
            "/usr/share/base/canary", "canary ${SNAPSHOTTER_LEAK_CANARY:-absent}")),
        "dev-libs/libfoo/libfoo-1.0.ebuild": _ebuild("a library", _installs("/usr/lib/libfoo.txt", "libfoo 1.0")),
        f"app-misc/hello/hello-{hello}.ebuild": _ebuild(
            "says hello", f'src_install() {{\n\texeinto /usr/bin\n\tnewexe - hello <<< $\'#!/bin/sh\\necho hello {hello}\'\n}}\n',
            deps="dev-libs/libfoo"),
    }
    # Keyworded for testing only: installable only with the profile's portage_confdir
    # (package.accept_keywords), which proves the confdir reached the root's /etc/portage.
    files["dev-libs/tilde/tilde-1.ebuild"] = _ebuild("testing keyword", _installs("/usr/share/tilde", "t")) \
        .replace('KEYWORDS="amd64"', 'KEYWORDS="~amd64"')
    # A package with a distfile (a Manifest with its hashes): fetched from GENTOO_MIRRORS/distfiles/.
    files["app-misc/fetched/fetched-1.ebuild"] = _ebuild(
        "has a distfile", f'SRC_URI="https://example.org/{DISTFILE}"\n'
        'src_install() {\n\tinsinto /usr/share/fetched\n\tdoins fetched-1/data.txt\n}\n')
    files["app-misc/fetched/Manifest"] = _manifest_dist(DISTFILE, distfile())
    # Not reproducible on purpose: installs the time it was built (in no profile's world but the rebuild
    # test's, tests/chroot/test_rebuild_portage.py).
    files["app-misc/stamp/stamp-1.ebuild"] = _ebuild("embeds its build time", _installs(
        "/usr/share/stamp/built", "built at $(date -u +%s.%N)"))
    if trouble == "1":
        body = f'src_compile() {{\n\techo "{SLOW_MARKER}"\n\tsleep 300\n}}\n'
    else:
        body = f'src_compile() {{\n\tdie "{FAIL_MARKER}"\n}}\n'
    files[f"app-misc/trouble/trouble-{trouble}.ebuild"] = _ebuild("trouble", body + _installs("/usr/share/trouble", "t"))
    return files


def overlay_files(version: str) -> dict[str, str | bytes | tuple]:
    return {
        "profiles/repo_name": "extra\n",
        "metadata/layout.conf": "masters = gentoo\nthin-manifests = true\n",
        f"app-misc/extra/extra-{version}.ebuild": _ebuild(
            "from the overlay", _installs("/usr/share/extra/version", f"extra {version}")),
    }


def _git(work: Path, *args: str, env: dict[str, str] | None = None) -> str:
    full = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@localhost", **(env or {})}
    return subprocess.run(["git", "-C", str(work), *args], check=True, capture_output=True, text=True,
                          env=full).stdout.strip()


def git_repo_with_tags(path: Path, versions: list[tuple[str, dict[str, str | bytes | tuple]]],
                       bare: bool = True) -> dict[str, str]:
    """A git repository whose successive commits hold the given trees, each tagged (annotated).

    Returns tag -> commit. With bare=True `path` is a bare repository (like the snapshot mirror).
    """
    work = path.with_name(path.name + ".work")
    work.mkdir(parents=True)
    _git(work, "init", "-q", "-b", "main")
    tags = {}
    for i, (tag, files) in enumerate(versions):
        for p in sorted(work.iterdir()):
            if p.name != ".git":
                subprocess.run(["rm", "-rf", "--one-file-system", str(p)], check=True)
        testlib.write_tree(work, files)
        _git(work, "add", "-A")
        when = f"{1767225600 + i * 86400} +0000"
        env = {"GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when}
        _git(work, "commit", "-q", "-m", f"Update portage tree to {tag}", env=env)
        _git(work, "tag", "-a", "-m", f"Tagging {tag}", tag, env=env)
        tags[tag] = _git(work, "rev-parse", "HEAD")
    if bare:
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(path)], check=True, capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=True)
    else:
        work.rename(path)
    return tags
