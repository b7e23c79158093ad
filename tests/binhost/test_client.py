"""`snapshotter client-config` in binhost mode and the update script it hands out (snapshotter-autoupdate),
run for real (sh, wget, gpg, tar, xz) against an edition made by binhost's own code and served on
127.0.0.1, with a client root that is a directory of the test (SNAPSHOTTER_CLIENT_ROOT). emerge and
emerge-webrsync cannot act on such a root: here they are small stand-ins on PATH that record how they were
called (tests/binhost/test_delivery_portage.py runs the real ones in a chroot)."""

from __future__ import annotations

import io
import json
import lzma
import os
import shutil
import socket
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import binhostlib, clientlib, testlib

from snapshotter.binhost import client as clientmod
from snapshotter.binhost import settings
from snapshotter.openpgp import export_public_key
from snapshotter.service import delivery

TAG = "2026-01-10"
DAY = "20260110"
SETTINGS = f"portage/portage_settings-{DAY}.tar.xz"
SNAPSHOT = f"snapshots/gentoo-{DAY}.tar.xz"
TLS = ("/etc/portage/binhost-tls/client.crt", "/etc/portage/binhost-tls/client.key",
       "/etc/portage/binhost-tls/server-ca.crt")

# Stand-ins for emerge-webrsync and emerge: record argv, the environment and DISTDIR's files; exit $STANDIN_RC_<NAME>.
STANDIN = """#!/bin/sh
name=$(basename "$0" | tr - _)
{{
  echo "argv $*"
  env | sort
  [ -z "${{DISTDIR:-}}" ] || ls "$DISTDIR" | sed 's/^/distdir /'
}} > "{calls}/$name.$$"
echo "stand-in $name ran"
eval "exit \\${{STANDIN_RC_$name:-0}}"
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, gpg_key: testlib.Key) -> binhostlib.Site:
    """Build 2026-01-10.1 of profile basic, published to testing (production points at nothing)."""
    s = binhostlib.make_site(tmp_path_factory.mktemp("client-site"), gpg_key)
    b = s.build(TAG)
    report = delivery.on_build_success(s.cfg, "basic", b.id)
    assert report.changed and report.to_build == f"{TAG}.1"
    return s


@pytest.fixture(scope="module")
def server(site: binhostlib.Site):
    """The web root on 127.0.0.1: the testing edition is at URL/testing/basic."""
    http = testlib.serve(site.web_root)
    yield http
    http.server.shutdown()
    http.server.server_close()


@pytest.fixture
def short(tmp_path_factory: pytest.TempPathFactory):
    """Short directories for client roots: gpg-agent's sockets live in /etc/portage/gnupg, and a socket path
    is at most 107 bytes (gpg --import starts an agent, and fails when it cannot)."""
    return lambda: tmp_path_factory.mktemp("c")


def client_config(site: binhostlib.Site, out: Path | None, url: str, *extra: str,
                  edition: str = "testing") -> subprocess.CompletedProcess[str]:
    args = ["client-config", "--profile", "basic", "--edition", edition, "--url", url, *extra]
    if out is not None:
        args += ["--out", str(out)]
    return site.cli(*args)


class Client:
    """A client root (a directory) set up from client-config's output, and the update script's runs."""

    def __init__(self, site: binhostlib.Site, base: Path, url: str, edition: str = "testing") -> None:
        self.base = base
        self.out = base / "client-config"
        self.root = base / "root"
        self.calls = base / "calls"
        self.bin = base / "bin"
        r = client_config(site, self.out, url, edition=edition)
        assert r.returncode == 0, r.stderr
        portage = self.root / "etc/portage"
        # What a stage3 brings: its own make.conf, a package.use file; the host adds its own overrides.
        testlib.write_tree(portage, {"make.conf": 'COMMON_FLAGS="-O2"\nUSE="stage3"\n',
                                     "package.use": "app-misc/host-own -doc\n"})
        clientlib.install(self.out, self.root)
        self.calls.mkdir()
        self.bin.mkdir()
        for name in ("emerge-webrsync", "emerge"):
            (self.bin / name).write_text(STANDIN.format(calls=self.calls))
            (self.bin / name).chmod(0o755)

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full = {"PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.base),
                "SNAPSHOTTER_CLIENT_ROOT": str(self.root), "TMPDIR": str(self.base), **(env or {})}
        return subprocess.run(["sh", str(self.root / clientlib.SCRIPT), *args], capture_output=True, text=True,
                              env=full, timeout=120)

    def called(self, name: str) -> list[str]:
        return sorted(p.read_text() for p in self.calls.glob(f"{name.replace('-', '_')}.*"))

    def state(self) -> dict:
        return clientlib.files(self.root)


def served_copy(site: binhostlib.Site, dest: Path, edition: str = "testing") -> testlib.HttpMirror:
    """A copy of an edition's document root (symlinks resolved) on its own server: to be tampered with."""
    shutil.copytree(site.web_root / edition / "basic", dest)
    return testlib.serve(dest)


def stop(http: testlib.HttpMirror) -> None:
    http.server.shutdown()
    http.server.server_close()


def tar_members(data: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()}  # type: ignore[union-attr]


# ---- client-config ---------------------------------------------------------------------------------------
def test_client_config_writes_what_a_client_needs(site: binhostlib.Site, server, tmp_path: Path) -> None:
    url = f"{server.url}/testing/basic"
    out = tmp_path / "web01"
    r = client_config(site, out, url + "/")  # a trailing slash is dropped
    assert r.returncode == 0, r.stderr
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["README", "etc/portage/snapshotter-signing-key.asc", "etc/snapshotter-client.conf",
                     "usr/local/sbin/snapshotter-autoupdate"]
    assert r.stdout.splitlines()[-1] == f"next: copy {out} to the client and follow {out / 'README'}"
    fpr = site.key.fingerprint
    assert (out / "etc/snapshotter-client.conf").read_text().splitlines()[2:] == [
        f"URL={url}", "PROFILE=basic", "EDITION=testing", f"SIGNING_KEY={fpr}"]
    script = out / "usr/local/sbin/snapshotter-autoupdate"
    assert script.read_bytes() == (Path(clientmod.__file__).parent / "autoupdate.sh").read_bytes()
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "etc/snapshotter-client.conf").stat().st_mode) == 0o644
    assert (out / "etc/portage/snapshotter-signing-key.asc").read_bytes() == export_public_key(fpr, site.key.home)
    readme = (out / "README").read_text()
    assert clientlib.readme_commands(readme, 2) == [
        "install -d -m 0755 /etc/portage/gnupg",
        "gpg --homedir /etc/portage/gnupg --batch --import /etc/portage/snapshotter-signing-key.asc",
        f"echo {fpr}:6: | gpg --homedir /etc/portage/gnupg --batch --import-ownertrust",
        "gpg --homedir /etc/portage/gnupg --batch --check-trustdb",
        "gpgconf --homedir /etc/portage/gnupg --kill all",
        "chmod -R a+rX /etc/portage/gnupg"]
    assert clientlib.readme_commands(readme, 3)[0] == "/usr/local/sbin/snapshotter-autoupdate"
    # The README shows repos.conf and binrepos.conf as a build's settings will install them.
    pub = site.web_root / "testing/basic" / f"b/{TAG}.1"
    members = tar_members((pub / SETTINGS).read_bytes())
    for name in ("repos.conf/snapshotter.conf", "binrepos.conf/snapshotter.conf"):
        text = members[name].decode().replace(settings.URL_PLACEHOLDER, url).replace(f"{TAG}.1", "<build>")  # type: ignore[union-attr]
        for line in text.splitlines():
            if line and not line.startswith("#"):
                assert f"    {line}\n" in readme, line
    assert f"GENTOO_MIRRORS={url}/b/<build>" in readme and "verify-signature = true" in readme
    # The same inputs give the same bytes; printing shows the same files.
    again = tmp_path / "again"
    assert client_config(site, again, url).returncode == 0
    assert clientlib.files(again) == clientlib.files(out)
    shown = client_config(site, None, url)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith((out / "README").read_text())
    for name in names[1:]:
        assert f"==== /{name} (mode " in shown.stdout
    assert (out / "usr/local/sbin/snapshotter-autoupdate").read_text() in shown.stdout


def test_client_config_with_a_client_certificate(site: binhostlib.Site, tmp_path: Path) -> None:
    out = tmp_path / "web01"
    url = "https://10.0.0.5:8443"
    r = client_config(site, out, url, "--cert", TLS[0], "--key", TLS[1], "--ca", TLS[2])
    assert r.returncode == 0, r.stderr
    assert (out / "etc/snapshotter-client.conf").read_text().splitlines()[-3:] == [
        f"CERT={TLS[0]}", f"KEY={TLS[1]}", f"CA={TLS[2]}"]
    tls_conf = (out / "etc/portage/binrepos.conf/snapshotter-tls.conf").read_text()
    opts = f"--tries=3 --timeout=60 --certificate={TLS[0]} --private-key={TLS[1]} --ca-certificate={TLS[2]}"
    body = [line for line in tls_conf.splitlines() if not line.startswith("#")]
    assert body == ["[snapshotter]",
                    f'fetchcommand = wget {opts} -O "${{DISTDIR}}/${{FILE}}" "${{URI}}"',
                    f'resumecommand = wget -c {opts} -O "${{DISTDIR}}/${{FILE}}" "${{URI}}"']
    readme = (out / "README").read_text()
    # Written again without a client certificate, the directory loses the TLS file.
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert client_config(site, again, url).returncode == 0
    assert not (again / "etc/portage/binrepos.conf/snapshotter-tls.conf").exists()
    assert "CERT=" not in (again / "etc/snapshotter-client.conf").read_text()
    assert ("install -D -m 0644 etc/portage/binrepos.conf/snapshotter-tls.conf "
            "/etc/portage/binrepos.conf/snapshotter-tls.conf") in clientlib.readme_commands(readme, 1)
    assert f"FETCHCOMMAND='wget {opts} -O" in readme and TLS[1] in readme


@pytest.mark.parametrize("args, message", [
    (["--profile", "basic", "--edition", "testing", "--url", "http://h/testing/basic/snapshots"],
     "ends in /snapshots: give the edition's root"),
    (["--profile", "basic", "--edition", "staging", "--url", "http://h"], "unknown edition 'staging'"),
    (["--profile", "nosuch", "--edition", "testing", "--url", "http://h"], "--profile: unknown profile 'nosuch'"),
    (["--profile", "basic", "--edition", "testing", "--url", "ftp://h"], "--url: expected an http:// or https://"),
    (["--profile", "basic", "--edition", "testing", "--url", "http://h/a b"], "--url: expected"),
    (["--profile", "basic", "--edition", "testing"], "binhost mode needs --url too"),
    (["--profile", "basic", "--edition", "testing", "--url", "https://h", "--cert", "/c"],
     "--cert, --key and --ca go together"),
    (["--profile", "basic", "--edition", "testing", "--url", "http://h", "--cert", TLS[0], "--key", TLS[1],
      "--ca", TLS[2]], "--cert: a client certificate needs an https:// URL"),
    (["--profile", "basic", "--edition", "testing", "--url", "https://h", "--cert", "client.crt", "--key", TLS[1],
      "--ca", TLS[2]], "--cert: expected an absolute path on the client"),
    (["--mirror-url", "http://h", "--profile", "basic"], "--profile: binhost mode options; --mirror-url is"),
    ([], "give --profile, --edition and --url (binhost mode) or --mirror-url"),
])
def test_client_config_refuses_bad_input_with_one_line(site: binhostlib.Site, tmp_path: Path, args: list[str],
                                                       message: str) -> None:
    r = site.cli("client-config", *args, "--out", str(tmp_path / "out")) if "--mirror-url" not in args \
        else site.cli("client-config", *args)
    assert r.returncode != 0
    assert r.stderr.startswith("snapshotter: error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_client_config_out_must_be_a_directory(site: binhostlib.Site, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    r = client_config(site, tmp_path / "link", "http://h/testing/basic")
    assert r.returncode == 1 and "snapshotter: error: --out" in r.stderr and "symlink" in r.stderr
    assert list((tmp_path / "real").iterdir()) == []


def test_snapshot_only_mode_is_unchanged(site: binhostlib.Site) -> None:
    r = site.cli("client-config", "--mirror-url", "https://mirror.example.org/")
    assert r.returncode == 0, r.stderr
    assert "sync-type = webrsync" in r.stdout and 'GENTOO_MIRRORS="https://mirror.example.org"' in r.stdout
    r = site.cli("client-config", "--mirror-url", "https://mirror.example.org/snapshots")
    assert r.returncode == 1 and "ends in /snapshots" in r.stderr


# ---- the script itself -----------------------------------------------------------------------------------
def test_the_script_is_posix_sh_and_shellcheck_clean() -> None:
    script = Path(clientmod.__file__).parent / "autoupdate.sh"
    for sh in ("sh", "dash"):
        if shutil.which(sh):
            r = subprocess.run([sh, "-n", str(script)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (tests/run.sh installs it)")
    r = subprocess.run(["shellcheck", "--shell=sh", "--severity=style", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_the_script_documents_its_exit_statuses() -> None:
    text = clientmod.autoupdate_script().decode()
    r = subprocess.run(["sh", "-c", 'exec sh "$0" --help', str(Path(clientmod.__file__).parent / "autoupdate.sh")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "usage: snapshotter-autoupdate [--force]" in r.stdout
    for line in ("#   0   updated", "#   1   usage or configuration", "#   2   verification failed",
                 "#   3   download failed", "#   4   emerge-webrsync failed", "#   5   emerge failed",
                 "#   75  another update is running"):
        assert line in text
    # Each documented status is one the script can exit with (fail N ... / exit N).
    for code in ("1", "2", "3", "4", "5", "75"):
        assert f"fail {code} " in text


# ---- updates -----------------------------------------------------------------------------------------------
def test_first_update_then_already_current(site: binhostlib.Site, server, short, tmp_path: Path) -> None:
    url = f"{server.url}/testing/basic"
    c = Client(site, short(), url)
    portage = c.root / "etc/portage"
    (portage / "package.accept_keywords").mkdir()
    (portage / "package.accept_keywords/zz-local").write_text("app-misc/mine ~amd64\n")
    r = c.run()
    assert r.returncode == 0, r.stdout + r.stderr
    build = f"{TAG}.1"
    lines = r.stdout.splitlines()
    assert all(line.startswith("snapshotter-autoupdate: ") for line in lines), r.stdout
    assert lines[0] == f"snapshotter-autoupdate: fetching {url}/edition.json (edition testing of basic)"
    assert lines[-1] == f"snapshotter-autoupdate: now at build {build} (tag {TAG}) of basic testing"
    assert r.stderr == ""
    # The settings are the build's, @SNAPSHOTTER_URL@ filled in; the host's own are kept.
    pub = site.web_root / "testing/basic" / f"b/{build}"
    members = tar_members((pub / SETTINGS).read_bytes())
    installed = {name: data for name, data in members.items() if data is not None}
    assert set(installed) == {"make.conf", "package.use/snapshotter", "package.accept_keywords/snapshotter",
                              "package.env/snapshotter", "env/debug.conf", "repos.conf/snapshotter.conf",
                              "binrepos.conf/snapshotter.conf"}
    for name, data in installed.items():
        want = data.replace(settings.URL_PLACEHOLDER.encode(), url.encode())
        assert (portage / name).read_bytes() == want, name
    assert f"sync-uri = {url}/b/{build}/packages\n" in (portage / "binrepos.conf/snapshotter.conf").read_text()
    assert (portage / "make.conf.local").read_text() == ""
    assert (portage / "make.conf.before-snapshotter").read_text() == 'COMMON_FLAGS="-O2"\nUSE="stage3"\n'
    assert (portage / "package.use/local").read_text() == "app-misc/host-own -doc\n"  # the stage's file, moved
    assert (portage / "package.accept_keywords/zz-local").read_text() == "app-misc/mine ~amd64\n"
    assert "moved" in r.stdout and "package.use/local" in r.stdout
    state = c.root / "var/lib/snapshotter-client"
    assert (state / "build").read_text() == f"{build}\n" and (state / "profile").read_text() == "basic\n"
    assert (state / "edition.json").read_bytes() == (site.web_root / "testing/basic/edition.json").read_bytes()
    # emerge-webrsync took the verified snapshot from DISTDIR (--keep), with only our key, then emerge -uDNg.
    (webrsync,) = c.called("emerge-webrsync")
    assert f"argv --keep --revert={DAY}\n" in webrsync
    assert f"GENTOO_MIRRORS={url}/b/{build}\n" in webrsync and "FEATURES=webrsync-gpg\n" in webrsync
    assert {f"distdir gentoo-{DAY}.tar.xz{s}" for s in ("", ".md5sum", ".gpgsig")} <= set(webrsync.splitlines())
    assert "FETCHCOMMAND" not in webrsync  # no client certificate here
    (emerge,) = c.called("emerge")
    assert emerge.startswith("argv --update --deep --newuse --getbinpkg @world\n")
    log = (state / "update.log").read_text()
    assert "stand-in emerge_webrsync ran" in log and "stand-in emerge ran" in log
    assert not list(c.base.glob("snapshotter-autoupdate.*"))  # its temporary directory is gone
    assert not (state / "lock").exists()

    # Again: already current, nothing touched, nothing run.
    before = c.state()
    r = c.run()
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"snapshotter-autoupdate: already at build {build} (tag {TAG}) of basic testing: nothing to do"
    assert c.state() == before
    assert len(c.called("emerge")) == 1
    # --force does it all again; the host's own files stay.
    r = c.run("--force")
    assert r.returncode == 0, r.stderr
    assert len(c.called("emerge")) == 2 and (portage / "package.use/local").exists()
    assert c.state()["etc/portage/make.conf.before-snapshotter"] == before["etc/portage/make.conf.before-snapshotter"]


def test_settings_of_a_later_build_replace_and_remove_the_earlier_ones(site: binhostlib.Site, server,
                                                                        short, tmp_path: Path) -> None:
    """Files the previous build installed and the next one does not have are removed (and every
    package.*/snapshotter the new build lacks); the host's own files stay."""
    c = Client(site, short(), f"{server.url}/testing/basic")
    portage = c.root / "etc/portage"
    (portage / "package.mask").mkdir()
    (portage / "package.mask/snapshotter").write_text("stale from an old build\n")
    (portage / "env").mkdir()
    (portage / "env/host-own.conf").write_text("X=1\n")
    state = c.root / "var/lib/snapshotter-client"
    state.mkdir(parents=True)
    (state / "settings.files").write_text("env/old-build.conf\npackage.license/snapshotter\n")
    (portage / "env/old-build.conf").write_text("old\n")
    (portage / "package.license").mkdir()
    (portage / "package.license/snapshotter").write_text("old\n")
    r = c.run()
    assert r.returncode == 0, r.stderr
    assert "3 removed" in r.stdout
    for gone in ("package.mask/snapshotter", "env/old-build.conf", "package.license/snapshotter"):
        assert not (portage / gone).exists(), gone
    assert (portage / "env/host-own.conf").read_text() == "X=1\n"
    assert (state / "settings.files").read_text().splitlines() == sorted([
        "binrepos.conf/snapshotter.conf", "env/debug.conf", "make.conf", "package.accept_keywords/snapshotter",
        "package.env/snapshotter", "package.use/snapshotter", "repos.conf/snapshotter.conf"])


def without_state(files: dict) -> dict:
    """A root's files without the script's own state directory (its lock lives there)."""
    return {k: v for k, v in files.items() if k not in ("var", "var/lib") and not k.startswith("var/lib/snapshotter-client")}


def assert_refused(c: Client, r: subprocess.CompletedProcess[str], status: int, message: str, before: dict) -> None:
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("snapshotter-autoupdate: error: ") and message in err[0], r.stderr
    assert without_state(c.state()) == without_state(before), "the client root changed"
    assert not (c.root / "var/lib/snapshotter-client/lock").exists()
    assert c.called("emerge-webrsync") == [] and c.called("emerge") == []


@pytest.mark.parametrize("tamper, message", [
    ("edition-build", "edition.json from"),
    ("edition-other-key", "signature verification failed (not signed by"),
    ("settings-bytes", f"{SETTINGS}: sha256"),
    ("settings-asc", f"{SETTINGS}.asc: sha256"),
    ("snapshot-bytes", f"{SNAPSHOT}: sha256"),
])
def test_tampering_is_refused_and_changes_nothing(site: binhostlib.Site, other_key: testlib.Key, short, tmp_path: Path,
                                                  tamper: str, message: str) -> None:
    served = served_copy(site, tmp_path / "served")
    try:
        root = served.root
        ej = root / "edition.json"
        pub = root / f"b/{TAG}.1"
        if tamper == "edition-build":  # edited after signing
            ej.write_text(ej.read_text().replace(f'"build": "{TAG}.1"', f'"build": "{TAG}.9"'))
        elif tamper == "edition-other-key":  # the same edition.json, signed by another key
            other_key.sign(ej, root / "edition.json.asc")
        elif tamper == "settings-bytes":
            data = bytearray((pub / SETTINGS).read_bytes())
            data[100] ^= 1
            (pub / SETTINGS).write_bytes(bytes(data))
        elif tamper == "settings-asc":
            other_key.sign(pub / SETTINGS, pub / f"{SETTINGS}.asc")
        elif tamper == "snapshot-bytes":
            data = bytearray((pub / SNAPSHOT).read_bytes())
            data[-30] ^= 1
            (pub / SNAPSHOT).write_bytes(bytes(data))
        c = Client(site, short(), served.url)
        before = c.state()
        r = c.run()
        assert_refused(c, r, 2, message, before)
        assert "nothing changed" in r.stderr
    finally:
        stop(served)


def test_a_resigned_settings_tarball_with_its_sha256_is_still_refused(site: binhostlib.Site, other_key: testlib.Key,
                                                                      short, tmp_path: Path) -> None:
    """Whoever can sign edition.json is trusted; a tarball signed by another key is not, even when edition.json
    (signed by our key) lists its sha256 and that of its signature."""
    served = served_copy(site, tmp_path / "served")
    try:
        pub = served.root / f"b/{TAG}.1"
        other_key.sign(pub / SETTINGS, pub / f"{SETTINGS}.asc")
        ej = served.root / "edition.json"
        record = json.loads(ej.read_text())
        record["files"][f"{SETTINGS}.asc"] = binhostlib.sha256(pub / f"{SETTINGS}.asc")
        ej.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        site.key.sign(ej, served.root / "edition.json.asc")
        c = Client(site, short(), served.url)
        before = c.state()
        assert_refused(c, c.run(), 2, f"{SETTINGS}: signature verification failed", before)
    finally:
        stop(served)


def test_download_failures_change_nothing(site: binhostlib.Site, short, tmp_path: Path) -> None:
    # No server at all.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Client(site, short(), f"http://127.0.0.1:{port}/testing/basic")
    before = c.state()
    r = c.run()
    assert_refused(c, r, 3, f"cannot fetch http://127.0.0.1:{port}/testing/basic/edition.json (wget exit 4: "
                            f"network or TLS failure: Connecting to 127.0.0.1:{port}... failed: Connection refused.)",
                   before)
    # A server missing the snapshot (after the settings were fetched and verified).
    served = served_copy(site, tmp_path / "served")
    try:
        (served.root / f"b/{TAG}.1/{SNAPSHOT}").unlink()
        c = Client(site, short(), served.url)
        before = c.state()
        r = c.run()
        assert_refused(c, r, 3, f"cannot fetch {served.url}/b/{TAG}.1/{SNAPSHOT} (wget exit 8: the server answered "
                                "with an error: ERROR 404: Not Found.)", before)
        # A server that answers 500.
        served.faults["/edition.json"] = "500"
        r = c.run()
        assert_refused(c, r, 3, "(wget exit 8: the server answered with an error: ERROR 500", before)
    finally:
        stop(served)


def test_failing_emerge_webrsync_and_emerge_are_4_and_5_and_not_recorded(site: binhostlib.Site, server,
                                                                          short, tmp_path: Path) -> None:
    c = Client(site, short(), f"{server.url}/testing/basic")
    r = c.run(env={"STANDIN_RC_emerge_webrsync": "1"})
    assert r.returncode == 4, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("snapshotter-autoupdate: error: emerge-webrsync "
                                                        f"--revert={DAY} failed (exit 1)")
    assert "stand-in emerge_webrsync ran" in r.stderr  # the log's tail
    state = c.root / "var/lib/snapshotter-client"
    assert not (state / "build").exists() and c.called("emerge") == []
    r = c.run(env={"STANDIN_RC_emerge": "3"})
    assert r.returncode == 5, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("snapshotter-autoupdate: error: emerge failed (exit 3)")
    assert not (state / "build").exists()
    r = c.run()  # the next run does it all again
    assert r.returncode == 0, r.stderr
    assert (state / "build").read_text() == f"{TAG}.1\n" and len(c.called("emerge-webrsync")) == 3


def test_configuration_problems_are_1_and_change_nothing(site: binhostlib.Site, server, short, tmp_path: Path) -> None:
    url = f"{server.url}/testing/basic"
    c = Client(site, short(), url)
    conf = c.root / clientlib.CONF
    good = conf.read_text()
    gnupg = c.root / "etc/portage/gnupg"
    make_conf, saved = c.root / "etc/portage/make.conf", c.root / "etc/portage/make.conf.saved"
    cases = [
        (lambda: conf.unlink(), f"{conf} not found"),
        (lambda: conf.write_text(good + "MIRROR=x\n"), "line 7: unknown setting MIRROR"),
        (lambda: conf.write_text(good.replace(f"URL={url}", "URL=http://h/a b")), "line 3: URL may hold only"),
        (lambda: conf.write_text(good.replace(f"URL={url}", f"URL={url}/snapshots")), "ends in /snapshots"),
        (lambda: conf.write_text(good + "CERT=/etc/x.crt\n"), "CERT, KEY and CA go together"),
        (lambda: conf.write_text(good.replace("SIGNING_KEY=", "SIGNING_KEY=0")), "SIGNING_KEY must be a fingerprint"),
        (lambda: conf.write_text(good.replace("EDITION=testing", "EDITION=production")),
         f"{url} serves edition testing of profile basic, but this host follows production of basic"),
        (lambda: gnupg.chmod(0o700), "is not readable by others (Portage verifies packages as nobody)"),
        (lambda: shutil.rmtree(gnupg), f"{gnupg} does not exist"),
        (lambda: (c.root / "etc/portage/package.env").symlink_to("elsewhere"),
         "package.env is neither a directory nor a file (a symlink?)"),
        (lambda: (make_conf.rename(saved), make_conf.mkdir()), "make.conf is a directory"),
    ]
    for make_it_wrong, message in cases:
        try:
            make_it_wrong()
            wrong = c.state()
            r = c.run()
            assert r.returncode == 1, (message, r.stdout, r.stderr)
            assert r.stderr.startswith("snapshotter-autoupdate: error: ") and message in r.stderr, (message, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1
            assert without_state(c.state()) == without_state(wrong), message
        finally:
            conf.write_text(good)
            if (c.root / "etc/portage/package.env").is_symlink():
                (c.root / "etc/portage/package.env").unlink()
            if saved.exists():
                make_conf.rmdir()
                saved.rename(make_conf)
            if not gnupg.exists():
                clientlib.install(c.out, c.root)
            gnupg.chmod(0o755)
    # A key that is there but not trusted: Portage would refuse every package with it.
    subprocess.run(["gpg", "--homedir", str(gnupg), "--batch", "--yes", "--delete-keys", site.key.fingerprint],
                   check=True, capture_output=True)
    subprocess.run(["gpg", "--homedir", str(gnupg), "--batch", "--import", str(site.key.public)], check=True,
                   capture_output=True)
    subprocess.run(["sh", "-c", f"echo {site.key.fingerprint}:2: | gpg --homedir {gnupg} --batch --import-ownertrust"],
                   check=True, capture_output=True)
    os.system(f"chmod -R a+rX {gnupg}")
    r = c.run()
    assert r.returncode == 1 and "is in" in r.stderr and "but not trusted" in r.stderr, r.stderr
    assert c.called("emerge") == []


def test_a_running_update_is_75(site: binhostlib.Site, server, short, tmp_path: Path) -> None:
    c = Client(site, short(), f"{server.url}/testing/basic")
    lock = c.root / "var/lib/snapshotter-client/lock"
    lock.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (lock / "pid").write_text(f"{sleeper.pid}\n")
        r = c.run()
        assert r.returncode == 75 and f"another update is running (pid {sleeper.pid}" in r.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    # The lock of an update that was killed (its pid is gone) is taken over.
    r = c.run()
    assert r.returncode == 0, r.stderr
    assert not lock.exists()


def resign_settings(site: binhostlib.Site, root: Path, extra: tarfile.TarInfo) -> None:
    """The served settings tarball with one more member, signed by our key, listed in a re-signed edition.json:
    what a settings tarball that carries make.profile would look like."""
    pub = root / f"b/{TAG}.1"
    raw = lzma.decompress((pub / SETTINGS).read_bytes())
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        dst.addfile(extra)
    (pub / SETTINGS).write_bytes(lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ))
    site.key.sign(pub / SETTINGS, pub / f"{SETTINGS}.asc")
    ej = root / "edition.json"
    record = json.loads(ej.read_text())
    for name in (SETTINGS, f"{SETTINGS}.asc"):
        record["files"][name] = binhostlib.sha256(pub / name)
    ej.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    site.key.sign(ej, root / "edition.json.asc")


@pytest.mark.parametrize("target, ok", [("../../var/db/repos/gentoo/profiles/default/linux", True),
                                        ("../../var/db/repos/gentoo/profiles/../../../../etc", False),
                                        ("/etc", False)])
def test_a_make_profile_symlink_in_the_settings(site: binhostlib.Site, short, tmp_path: Path, target: str,
                                                ok: bool) -> None:
    """Today's settings tarballs carry no make.profile; one that does (a symlink into a repository's profiles/)
    is installed as /etc/portage/make.profile; any other target is refused, nothing changed."""
    served = served_copy(site, tmp_path / "served")
    try:
        link = tarfile.TarInfo("make.profile")
        link.type, link.linkname, link.mode = tarfile.SYMTYPE, target, 0o777
        resign_settings(site, served.root, link)
        c = Client(site, short(), served.url)
        (c.root / "var/db/repos/gentoo/profiles/stage3").mkdir(parents=True)  # the stage's profile
        (c.root / "etc/portage/make.profile").symlink_to("../../var/db/repos/gentoo/profiles/stage3")
        before = c.state()
        r = c.run()
        if ok:
            assert r.returncode == 0, r.stderr
            assert os.readlink(c.root / "etc/portage/make.profile") == target
            assert list((c.root / "var/db/repos/gentoo/profiles/stage3").iterdir()) == []
        else:
            assert_refused(c, r, 2, f"{SETTINGS}: make.profile points at {target}", before)
    finally:
        stop(served)
