"""Every file the builder writes into a build root from the host (make.conf, repos.conf, make.profile,
world, world_sets, resolv.conf, the portage_confdir copy, the GnuPG home the host's gpg writes) against
a stage that planted symlinks there (as an ebuild of the build a stage4 was packed from could): an
absolute link to a victim file outside the root, and a relative one climbing out of it. The victim
never changes; a planted link at the written name is replaced, one on the way (a directory) or in the
GnuPG home is refused with one line naming it. No Portage needed."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import signkeys, testlib

from chroot import portageconf
from chroot.errors import ChrootError
from snapshotter.config import parse_profile
from snapshotter.service.build import portage_settings


@pytest.fixture(scope="module")
def public_key(tmp_path_factory) -> str:
    return signkeys.make_signing_key(tmp_path_factory.mktemp("key") / "home").public.read_text()


class Site:
    def __init__(self, tmp_path: Path, public_key: str) -> None:
        self.tmp = tmp_path
        self.root = tmp_path / "root"
        testlib.write_tree(self.root, {"etc/portage/make.conf": 'CHOST="x86_64-pc-linux-gnu"\n',
                                       "var/db/repos/gentoo/profiles/default/eapi": "8\n"})
        self.victim = tmp_path / "victim"
        self.victim.write_text("precious\n")
        self.victim.chmod(0o600)
        self.victim_dir = tmp_path / "victim-dir"
        self.victim_dir.mkdir()
        (self.victim_dir / "keep").write_text("keep\n")
        (self.victim_dir / "keep").chmod(0o600)
        self.victim_dir.chmod(0o700)
        self.host_resolv = tmp_path / "host-resolv.conf"
        self.host_resolv.write_text("nameserver 127.0.0.1\n")
        self.confdir = tmp_path / "confdir"
        testlib.write_tree(self.confdir, {"package.use/ssl": "dev-libs/openssl -bindist\n",
                                          "env/debug.conf": "FEATURES=splitdebug\n",
                                          "make.profile": ("symlink", "x")})
        (tmp_path / "stage.tar.xz").write_bytes(b"")
        self.profile = portage_settings(parse_profile("basic", {"stage": str(tmp_path / "stage.tar.xz")}, tmp_path))
        self.public_key = public_key

    def plant(self, rel: str, absolute: bool) -> Path:
        """A symlink at ROOT/rel to the victim (a directory's name: to the victim directory)."""
        link = self.root / rel
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        elif link.exists() or link.is_symlink():
            link.unlink()
        link.parent.mkdir(parents=True, exist_ok=True)
        target = self.victim_dir if rel in DIRS else self.victim
        link.symlink_to(target if absolute else os.path.relpath(target, link.parent))
        assert link.resolve() == target.resolve()
        return link

    def state(self) -> tuple[object, ...]:
        def one(p: Path) -> tuple[object, ...]:
            st = p.lstat()
            return (p.read_bytes() if p.is_file() else sorted(x.name for x in p.iterdir()),
                    stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_uid)
        return one(self.victim), one(self.victim_dir), one(self.victim_dir / "keep")


DIRS = {"etc", "etc/portage", "var/lib", "var/lib/portage", "etc/portage/repos.conf", "etc/portage/package.use",
        "etc/portage/env", "etc/portage/make.profile", "etc/portage/gnupg", "etc/portage/gnupg/sub"}

ACTIONS: dict[str, Callable[[Site], object]] = {
    "make.conf": lambda s: portageconf.write_make_conf(s.root, s.profile),
    "repos.conf": lambda s: portageconf.write_repos_conf(s.root, ["extra"]),
    "make.profile": lambda s: portageconf.set_make_profile(s.root, "default", s.root / "var/db/repos/gentoo"),
    "world": lambda s: portageconf.write_world(s.root, ["app-misc/hello", "@company"]),
    "resolv.conf": lambda s: portageconf.copy_resolv_conf(s.root, s.host_resolv),
    "confdir": lambda s: portageconf.copy_confdir(s.confdir, s.root),
    "gnupg": lambda s: portageconf.trust_signing_key(s.root, s.public_key),
}

# (write site, where the link is planted, what happens: "replaced" or "refused")
CASES = [
    ("make.conf", "etc/portage/make.conf", "refused"),  # the stage4 keeps the stage's own make.conf
    ("make.conf", "etc/portage", "refused"),
    ("make.conf", "etc", "refused"),
    ("repos.conf", "etc/portage/repos.conf/zz-snapshotter.conf", "replaced"),
    ("repos.conf", "etc/portage/repos.conf", "replaced"),
    ("repos.conf", "etc/portage", "refused"),
    ("make.profile", "etc/portage/make.profile", "replaced"),
    ("make.profile", "etc/portage", "refused"),
    ("world", "var/lib/portage/world", "replaced"),
    ("world", "var/lib/portage/world_sets", "replaced"),
    ("world", "var/lib/portage", "refused"),
    ("world", "var/lib", "refused"),
    ("resolv.conf", "etc/resolv.conf", "replaced"),
    ("resolv.conf", "etc", "refused"),
    ("confdir", "etc/portage/package.use", "replaced"),
    ("confdir", "etc/portage/env", "replaced"),
    ("confdir", "etc/portage/env/debug.conf", "replaced"),
    ("confdir", "etc/portage/make.profile", "replaced"),
    ("confdir", "etc/portage", "refused"),
    ("gnupg", "etc/portage/gnupg", "refused"),
    ("gnupg", "etc/portage/gnupg/pubring.kbx", "refused"),
    ("gnupg", "etc/portage/gnupg/trustdb.gpg", "refused"),
    ("gnupg", "etc/portage/gnupg/sub", "refused"),
    ("gnupg", "etc/portage", "refused"),
]


@pytest.mark.parametrize("absolute", [True, False], ids=["absolute", "relative"])
@pytest.mark.parametrize(("site", "rel", "outcome"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_planted_link_never_followed(tmp_path, public_key, site, rel, outcome, absolute):
    s = Site(tmp_path, public_key)
    if site == "gnupg" and rel.startswith("etc/portage/gnupg/"):
        (s.root / "etc/portage/gnupg").mkdir(parents=True)
    link = s.plant(rel, absolute)
    before = s.state()
    if outcome == "refused":
        with pytest.raises(ChrootError) as e:
            ACTIONS[site](s)
        msg = str(e.value)
        assert "\n" not in msg and str(link) in msg, msg
        assert "symlink" in msg, msg
        assert link.is_symlink()  # left as it was
    else:
        ACTIONS[site](s)
        if rel.endswith("make.profile"):  # replaced by the builder's (or the confdir's) own link
            want = "x" if site == "confdir" else "../../var/db/repos/gentoo/profiles/default"
            assert os.readlink(link) == want
        else:
            assert not link.is_symlink(), link
    assert s.state() == before
    assert s.victim.read_text() == "precious\n"


def test_written_where_links_were(tmp_path, public_key):
    """After replacing planted links the files hold what the builder writes."""
    s = Site(tmp_path, public_key)
    for rel in ("etc/portage/repos.conf/zz-snapshotter.conf", "var/lib/portage/world", "etc/resolv.conf",
                "etc/portage/env/debug.conf"):
        s.plant(rel, absolute=True)
    s.plant("etc/portage/package.use", absolute=False)
    for site in ("repos.conf", "world", "resolv.conf", "confdir"):
        ACTIONS[site](s)
    assert (s.root / "etc/portage/repos.conf/zz-snapshotter.conf").read_text() == portageconf.repos_conf(["extra"])
    assert (s.root / "var/lib/portage/world").read_text() == "app-misc/hello\n"
    assert (s.root / "etc/resolv.conf").read_text() == "nameserver 127.0.0.1\n"
    assert (s.root / "etc/portage/env/debug.conf").read_text() == "FEATURES=splitdebug\n"
    assert (s.root / "etc/portage/package.use").is_dir() and not (s.root / "etc/portage/package.use").is_symlink()
    assert (s.root / "etc/portage/package.use/ssl").read_text() == "dev-libs/openssl -bindist\n"
    assert s.victim.read_text() == "precious\n"
    assert sorted(p.name for p in s.victim_dir.iterdir()) == ["keep"]


def test_gnupg_home_refuses_fifos_and_devices_and_drops_stale_sockets(tmp_path, public_key):
    s = Site(tmp_path, public_key)
    home = s.root / "etc/portage/gnupg"
    home.mkdir()
    os.mkfifo(home / "trustdb.gpg")
    with pytest.raises(ChrootError, match=r"trustdb.gpg is a fifo in the root's GnuPG home") as e:
        portageconf.trust_signing_key(s.root, public_key)
    assert "\n" not in str(e.value)
    (home / "trustdb.gpg").unlink()
    if os.geteuid() == 0:
        os.mknod(home / "pubring.kbx", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        with pytest.raises(ChrootError, match=r"pubring.kbx is a character device"):
            portageconf.trust_signing_key(s.root, public_key)
        (home / "pubring.kbx").unlink()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(home / "S.gpg-agent"))
    finally:
        sock.close()
    assert portageconf.trust_signing_key(s.root, public_key)
    assert not (home / "S.gpg-agent").exists()
    assert (home / "pubring.kbx").is_file()


@pytest.mark.parametrize("absolute", [True, False], ids=["absolute", "relative"])
def test_swap_make_conf_for_the_stage4(tmp_path, public_key, absolute):
    """What the builder puts back before packing a stage4, after the build's ebuilds ran in the root."""
    s = Site(tmp_path, public_key)
    assert portageconf.swap_make_conf(s.root, b"stage\n") == b'CHOST="x86_64-pc-linux-gnu"\n'
    assert portageconf.swap_make_conf(s.root, None) == b"stage\n"
    assert not (s.root / "etc/portage/make.conf").exists()
    assert portageconf.swap_make_conf(s.root, b"built\n") is None
    before = s.state()
    for rel in ("etc/portage/make.conf", "etc/portage"):
        link = s.plant(rel, absolute)
        with pytest.raises(ChrootError, match="symlink") as e:
            portageconf.swap_make_conf(s.root, b"stage\n")
        assert "\n" not in str(e.value) and str(link) in str(e.value)
        assert s.state() == before
