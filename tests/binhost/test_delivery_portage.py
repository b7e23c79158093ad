"""Delivery end to end with the real Portage: signed builds of the stand-in stage (tests/helpers/stage.py),
editions (testing moved by each good build, production by `snapshotter promote` and `rollback`) served on
127.0.0.1, and client roots (more extractions of the same stage) that run the update script handed out by
`snapshotter client-config` inside `chroot`:
the real emerge-webrsync --revert (signature checked), the real emerge -uDNg @world with Portage's default
signature verification of binary packages.

The scenario runs in order and shares its state (module-scoped): two builds in all (tag 1, then tag 2 with
the overlay moved to v2), a testing client, a production client, promotion, rollback, refused packages,
and the same update over mutual TLS with the real lighttpd.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from helpers import buildenv, clientlib, ebuild_repo, lighttpd, signkeys, testlib
from helpers import stage as test_stage
from helpers.buildenv import TAG1, TAG2

from chroot.mounts import mounts_under, safe_rmtree
from chroot.stage import extract_stage
from snapshotter import config
from snapshotter.binhost.lighttpd import LighttpdOptions, render
from snapshotter.binhost.pki import Pki

pytestmark = pytest.mark.portage

DAY1, DAY2 = "20260101", "20260102"
WORLD = "app-misc/hello\napp-misc/extra\n"
CLIENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Runs "$@" in the client root: private mount and PID namespaces (proc and /dev mounted there only; every
# process, gpg-agents included, dies with it), chroot, a clean environment.
IN_ROOT = ('root=$1; shift; mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev" '
           '&& mount --make-rslave "$root/dev" '
           f'&& exec chroot "$root" /usr/bin/env -i PATH={CLIENT_PATH} HOME=/root TERM=dumb LC_ALL=C.UTF-8 "$@"')


def config_text(base: Path, work: Path, stage: Path, sha: str, key: testlib.Key, overlay: Path, mark: str,
                tls: str = "") -> str:
    return f"""
repo = "{base}/mirror.git"
state_dir = "{base}/state"
[build]
work_dir = "{work}/build"
output = "{base}/out"
cache_dir = "{base}/cache"
[publish]
xz_threads = 1
[binhost]
web_root = "{base}/www"
signing_key = "{key.fingerprint}"
gnupghome = "{key.home}"
{tls}
[profiles.basic]
stage = "{stage}"
stage_sha256 = "{sha}"
portage_profile = "default"
world = ["app-misc/hello", "app-misc/extra"]
portage_confdir = "{base}/confdir"
overlays = [{{ name = "extra", url = "{overlay}", ref = "v1" }}]
make_conf = {{ MAKEOPTS = "-j2", USE = "-doc", SNAPSHOTTER_TEST_MARK = "{mark}" }}
"""


class Env:
    def __init__(self, base: Path, work: Path, cfg: Path, stage: Path, key: testlib.Key, http: testlib.HttpMirror,
                 web: testlib.HttpMirror, config_args: tuple) -> None:
        self.base, self.work, self.cfg_path, self.stage, self.key = base, work, cfg, stage, key
        self.http, self.web = http, web
        self.config_args = config_args
        self.clients: dict[str, Client] = {}

    @property
    def cfg(self) -> config.Config:
        return config.load(self.cfg_path)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return testlib.run_cli("--config", str(self.cfg_path), *args, timeout=timeout)

    def set_config(self, mark: str, tls: str = "") -> None:
        self.cfg_path.write_text(config_text(*self.config_args, mark=mark, tls=tls))

    def build(self, tag: str, *args: str) -> str:
        """A real signed build of profile basic; a good build moves the automatic edition (testing) to it.
        Returns its id."""
        r = self.cli("build", "--profile", "basic", "--tag", tag, *args)
        assert r.returncode == 0, r.stderr[-3000:]
        build_id = r.stdout.split()[0]
        assert self.edition_build("testing") == build_id, r.stderr[-3000:]
        return build_id

    def url(self, edition: str) -> str:
        return f"{self.web.url}/{edition}/basic"

    def edition_build(self, edition: str) -> str:
        return json.loads((self.base / "www" / edition / "basic" / "edition.json").read_text())["build"]


class Client:
    """A client host: a fresh extraction of the stand-in stage with a world file, set up with client-config's
    README commands run inside it."""

    def __init__(self, env: Env, name: str, url: str, edition: str, *extra: str) -> None:
        self.env = env
        self.root = env.work / name
        extract_stage(env.stage, self.root)
        (self.root / "var/lib/portage/world").write_text(WORLD)
        self.configure(url, edition, *extra)

    def configure(self, url: str, edition: str, *extra: str) -> None:
        out = self.root.parent / f"{self.root.name}-client-config"
        shutil.rmtree(out, ignore_errors=True)
        r = self.env.cli("client-config", "--profile", "basic", "--edition", edition, "--url", url, "--out",
                         str(out), *extra)
        assert r.returncode == 0, r.stderr
        inside = self.root / "root/client-config"
        shutil.rmtree(inside, ignore_errors=True)
        shutil.copytree(out, inside, symlinks=True)
        install = " && ".join(["cd /root/client-config", *clientlib.readme_commands((out / "README").read_text(), 1),
                               *clientlib.readme_commands((out / "README").read_text(), 2)])
        r = self.sh(install)
        assert r.returncode == 0, r.stdout + r.stderr

    def run(self, command: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
        argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "sh", "-c", IN_ROOT, "sh",
                str(self.root), *command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-c", script])

    def update(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "/usr/local/sbin/snapshotter-autoupdate", *args])

    def installed(self) -> set[str]:
        db = self.root / "var/db/pkg"
        return {f"{c.name}/{p.name}" for c in db.iterdir() if c.is_dir() for p in c.iterdir()} if db.is_dir() else set()

    @property
    def etc(self) -> Path:
        return self.root / "etc/portage"

    def log(self) -> str:
        return (self.root / "var/lib/snapshotter-client/update.log").read_text(errors="replace")

    def build(self) -> str:
        return (self.root / "var/lib/snapshotter-client/build").read_text().strip()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, gpg_key: testlib.Key):
    if os.geteuid() != 0:
        pytest.skip("client roots need root (chroot, mount namespaces)")
    base = tmp_path_factory.mktemp("delivery").resolve()
    stage = test_stage.ensure_stage()
    sha = hashlib.sha256(stage.read_bytes()).hexdigest()
    overlay = base / "overlay"
    ebuild_repo.git_repo_with_tags(overlay, [("v1", ebuild_repo.overlay_files("1.0")),
                                             ("v2", ebuild_repo.overlay_files("2.0"))], bare=False)
    # Build and client roots on tmpfs when there is one (extracting a root on a busy disk costs 20-30 s).
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="snapshotter-test-delivery-", dir=shm)) if os.access(shm, os.W_OK) \
        else base / "work"
    work.mkdir(exist_ok=True)
    testlib.write_tree(base / "confdir", {"package.use/basic": "app-misc/hello -doc\n",
                                          "package.accept_keywords": "app-misc/hello amd64\n"})
    key = signkeys.make_signing_key(base / "gnupg-sign")
    http = testlib.serve(base / "http")
    web = testlib.serve(base / "www")
    args = (base, work, stage, sha, key, overlay)
    cfg = base / "snapshotter.toml"
    cfg.write_text(config_text(*args, mark="one"))
    buildenv.sync_mirror(base, cfg, http, gpg_key, {TAG1: ebuild_repo.tree_files(hello="1.0"),
                                                     TAG2: ebuild_repo.tree_files(hello="1.1")})
    e = Env(base, work, cfg, stage, key, http, web, args)
    try:
        yield e
    finally:
        for server in (http, web):
            server.server.shutdown()
            server.server.server_close()
        assert mounts_under(work) == [] and mounts_under(base) == [], "a mount leaked"
        safe_rmtree(work)


def snapshot_files(tarball: Path) -> dict[str, bytes]:
    """The files of a snapshot tarball, without its top directory."""
    out = {}
    with tarfile.open(tarball) as t:
        for m in t.getmembers():
            if m.isfile():
                f = t.extractfile(m)
                assert f is not None
                out[m.name.split("/", 1)[1]] = f.read()
    return out


def tree_files(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*") if p.is_file()}


def stop(http: testlib.HttpMirror) -> None:
    http.server.shutdown()
    http.server.server_close()


def check_at_build(env: Env, client: Client, build_id: str, tag: str) -> None:
    """The client's settings, tree and record are those of `build_id`."""
    day = tag.replace("-", "")
    pub = env.base / "www/.snapshotter/builds/basic" / build_id
    with tarfile.open(pub / f"portage/portage_settings-{day}.tar.xz") as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}  # type: ignore[union-attr]
    for name, data in members.items():
        url = client_url(client)
        assert (client.etc / name).read_bytes() == data.replace(b"@SNAPSHOTTER_URL@", url.encode()), name
    tree = tree_files(client.root / "var/db/repos/gentoo")
    assert tree == snapshot_files(pub / f"snapshots/gentoo-{day}.tar.xz")
    exported = env.base / f"export-{tag}"
    if not exported.exists():
        r = env.cli("export", tag, str(exported))
        assert r.returncode == 0, r.stderr
    assert tree == tree_files(exported)  # the tag's tree, exactly
    assert client.build() == build_id


def client_url(client: Client) -> str:
    conf = (client.root / "etc/snapshotter-client.conf").read_text()
    return next(line[4:] for line in conf.splitlines() if line.startswith("URL="))


def test_testing_client_gets_the_builds_settings_tree_and_signed_packages(env: Env) -> None:
    b1 = env.build(TAG1)
    assert b1 == f"{TAG1}.1" and env.edition_build("testing") == b1
    client = env.clients["testing"] = Client(env, "testing-client", env.url("testing"), "testing")
    r = client.update()
    assert r.returncode == 0, r.stdout + r.stderr[-3000:] + client.log()[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    check_at_build(env, client, b1, TAG1)
    assert {"app-misc/hello-1.0", "app-misc/extra-1.0", "dev-libs/libfoo-1.0", "sys-apps/base-1"} <= client.installed()
    out = client.run(["/bin/sh", "/usr/bin/hello"])
    assert out.stdout.strip() == "hello 1.0"
    log = client.log()
    assert ">>> Emerging binary (1 of" in log and "Creating binpkg" not in log  # nothing was compiled
    # Signature checking was on for the tree (gpg, with only the build's key) and for every package.
    assert "PGP verification method: gpg" in log
    features = client.run(["portageq", "envvar", "FEATURES"]).stdout.split()
    assert "binpkg-ignore-signature" not in features
    assert "verify-signature = true" in (client.etc / "binrepos.conf/snapshotter.conf").read_text()
    print(log[-6000:])


def test_the_client_refuses_packages_signed_by_another_key_and_unsigned_ones(env: Env) -> None:
    """The testing client's binary repository is pointed at packages made from its installed hello with
    quickpkg: unsigned, or signed by a key it does not trust. Portage's default verification refuses both,
    and the installed hello stays."""
    client = env.clients["testing"]
    other = signkeys.make_signing_key(env.base / "gnupg-other")
    shutil.copytree(other.home, client.root / "var/tmp/other-gnupg", ignore=shutil.ignore_patterns("S.*"))
    # quickpkg checks what it signed: with the other key's own home (readable by nobody, who verifies).
    made = client.sh(
        "chmod -R a+rX /var/tmp/other-gnupg && "
        "PKGDIR=/var/tmp/unsigned FEATURES=-binpkg-signing quickpkg app-misc/hello >/var/tmp/quickpkg.log 2>&1 && "
        f"PKGDIR=/var/tmp/foreign FEATURES=binpkg-signing BINPKG_GPG_SIGNING_GPG_HOME=/var/tmp/other-gnupg "
        f"BINPKG_GPG_VERIFY_GPG_HOME=/var/tmp/other-gnupg BINPKG_GPG_SIGNING_KEY={other.fingerprint} "
        "quickpkg app-misc/hello >>/var/tmp/quickpkg.log 2>&1")
    assert made.returncode == 0, (client.root / "var/tmp/quickpkg.log").read_text()
    binrepos = client.etc / "binrepos.conf/snapshotter.conf"
    good = binrepos.read_text()
    vdb = client.root / "var/db/pkg/app-misc/hello-1.0"
    installed = clientlib.files(vdb)
    served = testlib.serve(client.root / "var/tmp")
    try:
        for kind, refusal in (("unsigned", "appears unsigned"), ("foreign", "signed with at least one unknown key")):
            assert (client.root / f"var/tmp/{kind}/app-misc/hello/hello-1.0-1.gpkg.tar").is_file()
            binrepos.write_text(good.replace(client_url(client) + f"/b/{client.build()}/packages",
                                             f"{served.url}/{kind}"))
            r = client.run(["emerge", "--oneshot", "--getbinpkgonly", "app-misc/hello"])
            assert f"/{kind}/app-misc/hello/hello-1.0-1.gpkg.tar" in served.requests  # offered, and fetched
            assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
            assert refusal in r.stdout + r.stderr, r.stdout[-3000:]
            assert "Traceback" not in r.stdout + r.stderr
            assert clientlib.files(vdb) == installed  # hello was not reinstalled
    finally:
        binrepos.write_text(good)
        stop(served)


def test_a_second_tag_moves_testing_and_production_stays(env: Env) -> None:
    b1 = f"{TAG1}.1"
    r = env.cli("promote", "basic", "--to", "production")
    assert r.returncode == 0, r.stderr
    assert env.edition_build("production") == b1
    prod = env.clients["production"] = Client(env, "production-client", env.url("production"), "production")
    r = prod.update()
    assert r.returncode == 0, r.stderr[-3000:] + prod.log()[-3000:]
    check_at_build(env, prod, b1, TAG1)
    assert {"app-misc/hello-1.0", "app-misc/extra-1.0"} <= prod.installed()

    # Tag 2 (hello 1.1) with the overlay at v2 (extra 2.0) and another make.conf value.
    env.set_config(mark="two")
    b2 = env.build(TAG2, "--overlay-ref", "extra=v2")
    assert b2 == f"{TAG2}.1"
    assert env.edition_build("testing") == b2 and env.edition_build("production") == b1
    r = prod.update()
    assert r.returncode == 0 and f"already at build {b1} (tag {TAG1}) of basic production: nothing to do" in r.stdout
    testing = env.clients["testing"]
    r = testing.update()
    assert r.returncode == 0, r.stderr[-3000:] + testing.log()[-3000:]
    check_at_build(env, testing, b2, TAG2)
    assert 'SNAPSHOTTER_TEST_MARK="two"' in (testing.etc / "make.conf").read_text()
    assert {"app-misc/hello-1.1", "app-misc/extra-2.0"} <= testing.installed()
    assert not {"app-misc/hello-1.0", "app-misc/extra-1.0"} & testing.installed()
    assert testing.run(["/bin/sh", "/usr/bin/hello"]).stdout.strip() == "hello 1.1"


def test_promote_then_rollback_moves_the_production_client(env: Env) -> None:
    b1, b2 = f"{TAG1}.1", f"{TAG2}.1"
    prod = env.clients["production"]
    r = env.cli("promote", "basic", "--to", "production")
    assert r.returncode == 0, r.stderr
    assert env.edition_build("production") == b2
    r = prod.update()
    assert r.returncode == 0, r.stderr[-3000:] + prod.log()[-3000:]
    check_at_build(env, prod, b2, TAG2)
    assert {"app-misc/hello-1.1", "app-misc/extra-2.0"} <= prod.installed()
    assert 'SNAPSHOTTER_TEST_MARK="two"' in (prod.etc / "make.conf").read_text()

    r = env.cli("rollback", "basic", "--edition", "production")
    assert r.returncode == 0, r.stderr
    assert env.edition_build("production") == b1
    r = prod.update()
    assert r.returncode == 0, r.stderr[-3000:] + prod.log()[-3000:]
    assert f"verified edition.json: build {b1} (tag {TAG1}); this host is at {b2}" in r.stdout
    check_at_build(env, prod, b1, TAG1)  # the earlier tree and settings
    assert 'SNAPSHOTTER_TEST_MARK="one"' in (prod.etc / "make.conf").read_text()
    # What Portage does with the versions that went down (measured, docs/binhost.md "Rollback on a client"):
    # hello-1.1 is gone from tag 1's tree and extra-2.0 (from the overlay, which clients do not have) is in no
    # repository of the client: emerge -uDNg takes both down to the build's binary packages.
    assert prod.installed() == {"app-misc/hello-1.0", "app-misc/extra-1.0", "dev-libs/libfoo-1.0", "sys-apps/base-1"}
    assert prod.run(["/bin/sh", "/usr/bin/hello"]).stdout.strip() == "hello 1.0"
    log = prod.log()
    assert ">>> Emerging binary (1 of 2) app-misc/extra-1.0::extra" in log
    assert ">>> Emerging binary (2 of 2) app-misc/hello-1.0::gentoo" in log and "Creating binpkg" not in log


def test_emerge_keeps_a_newer_version_that_is_still_in_the_tree(env: Env) -> None:
    """The rule behind the rollback above, with the testing client (hello-1.1 installed from tag 2): an older
    version in the tree changes nothing while the installed one is still there and visible; masked (as a
    rolled-back build's settings may do, here package.mask), the installed version goes down."""
    testing = env.clients["testing"]
    tree = testing.root / "var/db/repos/gentoo/app-misc/hello"
    older = tree / "hello-1.0.ebuild"
    mask = testing.etc / "package.mask/zz-test"
    older.write_text((tree / "hello-1.1.ebuild").read_text().replace("1.1", "1.0"))
    try:
        r = testing.run(["emerge", "--pretend", "--verbose", "--update", "--deep", "--newuse", "@world"])
        assert r.returncode == 0, r.stderr
        assert "Total: 0 packages" in r.stdout and "UD" not in r.stdout
        mask.parent.mkdir(exist_ok=True)
        mask.write_text(">=app-misc/hello-1.1\n")
        r = testing.run(["emerge", "--pretend", "--verbose", "--update", "--deep", "--newuse", "@world"])
        assert r.returncode == 0, r.stderr
        assert "[ebuild     UD ] app-misc/hello-1.0::gentoo [1.1::gentoo]" in r.stdout
    finally:
        older.unlink()
        mask.unlink(missing_ok=True)


def test_a_new_host_installed_from_the_stage4_production_publishes(env: Env) -> None:
    """An operator installs a new host from the stage4 the production edition publishes (the root its build
    ran in, packages installed), checked against the signed edition.json, and the host then follows the
    edition with the update script."""
    b1 = env.edition_build("production")
    root = env.base / "www/production/basic"
    edition = json.loads((root / "edition.json").read_text())
    subprocess.run(["gpg", "--homedir", str(env.key.home), "--batch", "--verify", str(root / "edition.json.asc"),
                    str(root / "edition.json")], check=True, capture_output=True)
    rel = f"stages/stage4-basic-{b1}.tar.zst"
    stage4 = root / edition["path"] / rel
    assert hashlib.sha256(stage4.read_bytes()).hexdigest() == edition["files"][rel]
    subprocess.run(["gpg", "--homedir", str(env.key.home), "--batch", "--verify", f"{stage4}.asc", str(stage4)],
                   check=True, capture_output=True)
    host = Client.__new__(Client)
    host.env, host.root = env, env.work / "stage4-host"
    extract_stage(stage4, host.root)
    # The build's own packages are installed already; its tree is not part of a stage.
    assert {"app-misc/hello-1.0", "app-misc/extra-1.0"} <= host.installed()
    assert list((host.root / "var/db/repos").glob("*/*")) == []
    host.configure(env.url("production"), "production")
    r = host.update()
    assert r.returncode == 0, r.stdout + r.stderr[-3000:] + host.log()[-3000:]
    check_at_build(env, host, b1, TAG1)
    assert host.installed() == {"app-misc/hello-1.0", "app-misc/extra-1.0", "dev-libs/libfoo-1.0", "sys-apps/base-1"}
    assert host.run(["/bin/sh", "/usr/bin/hello"]).stdout.strip() == "hello 1.0"
    r = host.update()
    assert r.returncode == 0 and f"already at build {b1}" in r.stdout


def test_over_mutual_tls_with_lighttpd(env: Env) -> None:
    """The testing and production endpoints of P1's lighttpd configuration (client certificates per edition).
    A new testing host with a testing certificate updates end to end; pointed at the production endpoint,
    the same host is refused with one line and nothing changes."""
    lighttpd.require_lighttpd()
    ips = {"testing": "127.0.0.2", "production": "127.0.0.3"}
    ports = {e: lighttpd.free_port(ip) for e, ip in ips.items()}
    tls = (f'[tls]\npki_dir = "{env.base}/pki"\naccess_log_dir = "{env.base}/logs"\n'
           + "".join(f'[[tls.endpoints]]\nprofile = "basic"\nedition = "{e}"\nlisten = "{ips[e]}:{ports[e]}"\n'
                     for e in ips))
    env.set_config(mark="two", tls=tls)
    cfg = env.cfg
    (env.base / "logs").mkdir()
    pki = Pki(cfg.tls.pki_dir)
    pki.init(["testing", "production"])
    pki.issue_server("binhost", ips=list(ips.values()), dns=[])
    pki.issue_client("web01", "testing", env.base / "web01-tls")
    conf = env.base / "lighttpd.conf"
    conf.write_text(render(cfg, LighttpdOptions(user=None, group=None)).text)
    server = lighttpd.Lighttpd(conf, [(ips[e], ports[e]) for e in ips]).start()
    try:
        client = Client.__new__(Client)
        client.env, client.root = env, env.work / "tls-client"
        extract_stage(env.stage, client.root)
        (client.root / "var/lib/portage/world").write_text(WORLD)
        tls_dir = client.root / "etc/portage/binhost-tls"
        shutil.copytree(env.base / "web01-tls", tls_dir)
        paths = ["/etc/portage/binhost-tls/client.crt", "/etc/portage/binhost-tls/client.key",
                 "/etc/portage/binhost-tls/server-ca.crt"]
        tls_args = ("--cert", paths[0], "--key", paths[1], "--ca", paths[2])
        client.configure(f"https://{ips['testing']}:{ports['testing']}", "testing", *tls_args)
        assert (client.etc / "binrepos.conf/snapshotter-tls.conf").is_file()
        r = client.update()
        assert r.returncode == 0, r.stdout + r.stderr[-3000:] + client.log()[-3000:]
        b2 = env.edition_build("testing")
        check_at_build(env, client, b2, TAG2)
        assert {"app-misc/hello-1.1", "app-misc/extra-2.0"} <= client.installed()
        assert "Traceback" not in client.log()
        # Every download went through the endpoint with this host's certificate (its CN is the log's user).
        server.stop()
        log = (env.base / "logs/snapshotter-basic-testing.access.log").read_text()
        server.start()
        for path in ("/edition.json", f"/b/{b2}/portage/portage_settings-{DAY2}.tar.xz",
                     f"/b/{b2}/snapshots/gentoo-{DAY2}.tar.xz", f"/b/{b2}/packages/Packages",  # Packages.gz here
                     f"/b/{b2}/packages/app-misc/hello/hello-1.1-1.gpkg.tar"):
            assert any(" web01 [" in line and f'"GET {path}' in line and '" 200 ' in line for line in log.splitlines()), path

        # The same host, pointed at the production endpoint: refused at the handshake, one line, nothing changed.
        client.configure(f"https://{ips['production']}:{ports['production']}", "production", *tls_args)
        watched = ("etc/portage", "var/db/pkg", "var/db/repos/gentoo", "var/lib/portage", "var/cache/binhost")
        before = {d: clientlib.files(client.root / d) for d in watched}
        r = client.update()
        assert r.returncode == 3, r.stdout + r.stderr
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"snapshotter-autoupdate: error: https://{ips['production']}:{ports['production']} refused this host's "
            f"certificate {paths[0]}, or cannot be reached (wget exit 4: network or TLS failure"), r.stderr
        assert "Traceback" not in r.stdout + r.stderr
        assert {d: clientlib.files(client.root / d) for d in watched} == before
        assert client.build() == b2
    finally:
        server.stop()
