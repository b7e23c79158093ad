"""Signed builds without Portage: the make.conf lines that make Portage sign, trusting the key in a root's
/etc/portage/gnupg, the namespace runner's private tmpfs holding the key's home, build.json's formats,
and the checks that stop a build before it starts (missing key, wrong fingerprint, passphrase).

What the real Portage does with all of it: tests/chroot/test_build_portage.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import ebuild_repo, signkeys, testlib

from chroot import builder, manifest, portageconf
from chroot.errors import ChrootError
from chroot.mounts import mounts_under
from chroot.nsrun import NamespaceSpec, PrivateDir
from chroot.spec import Signing
from snapshotter.config import parse_profile
from snapshotter.service.build import portage_settings

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and builds need root")
FPR = "0123456789ABCDEF0123456789ABCDEF01234567"


def settings(tmp_path: Path, **make_conf: str):
    (tmp_path / "stage.tar.xz").write_bytes(b"")
    return portage_settings(parse_profile("basic", {"stage": str(tmp_path / "stage.tar.xz"),
                                                    "make_conf": make_conf}, tmp_path))


def assignments(block: str) -> dict[str, str]:
    out = {}
    for line in block.splitlines():
        if "=" in line and not line.startswith("#"):
            var, _, value = line.partition("=")
            out[var] = value
    return out


def test_make_conf_signs_with_the_key_from_the_private_home(tmp_path):
    s = settings(tmp_path, MAKEOPTS="-j2")
    block = portageconf.make_conf_block(s, Signing(tmp_path, FPR, "KEY"), portageconf.DEFAULT_SIGNING_BASE_COMMAND)
    got = assignments(block)
    assert got["FEATURES"] == '"buildpkg cgroup ipc-sandbox network-sandbox parallel-fetch binpkg-signing"'
    assert got["BINPKG_FORMAT"] == '"gpkg"'
    assert got["BINPKG_GPG_SIGNING_GPG_HOME"] == '"/run/snapshotter-signing/gnupg"'
    assert got["BINPKG_GPG_SIGNING_KEY"] == f'"{FPR}"'
    assert "BINPKG_GPG_SIGNING_BASE_COMMAND" not in got  # no passphrase: Portage's own command
    assert list(got)[-3:] == ["BINPKG_FORMAT", "BINPKG_GPG_SIGNING_GPG_HOME", "BINPKG_GPG_SIGNING_KEY"]  # win
    # Unsigned: none of it.
    plain = assignments(portageconf.make_conf_block(s))
    assert "binpkg-signing" not in plain["FEATURES"] and not any(v.startswith("BINPKG_") for v in plain)


def test_passphrase_goes_in_front_of_portages_options(tmp_path):
    """The loopback pinentry and the passphrase file extend the stage's base command (make.globals)."""
    root = tmp_path / "root"
    testlib.write_tree(root, {"etc/portage/make.conf": "",
                              portageconf.MAKE_GLOBALS: 'PKGDIR="/x"\nBINPKG_GPG_SIGNING_BASE_COMMAND="/usr/bin/'
                                                        'gpg --sign --armor [PORTAGE_CONFIG]"\n'})
    sig = Signing(tmp_path, FPR, "KEY", passphrase_file=tmp_path / "pp")
    content = portageconf.write_make_conf(root, settings(tmp_path), sig)
    assert assignments(content)["BINPKG_GPG_SIGNING_BASE_COMMAND"] == (
        '"/usr/bin/gpg --sign --armor --pinentry-mode loopback --passphrase-file /run/snapshotter-signing/passphrase '
        '[PORTAGE_CONFIG]"')
    # Without make.globals: Portage 3.0.83's default command, extended the same way.
    (root / portageconf.MAKE_GLOBALS).unlink()
    (root / "etc/portage/make.conf").write_text("")
    content = portageconf.write_make_conf(root, settings(tmp_path), sig)
    assert assignments(content)["BINPKG_GPG_SIGNING_BASE_COMMAND"] == (
        '"/usr/bin/flock /run/lock/portage-binpkg-gpg.lock /usr/bin/gpg --sign --armor --pinentry-mode loopback '
        '--passphrase-file /run/snapshotter-signing/passphrase [PORTAGE_CONFIG]"')


@pytest.mark.parametrize("make_conf, words", [
    ({"BINPKG_FORMAT": "xpak"}, "BINPKG_FORMAT is 'xpak', but only \"gpkg\" packages can be signed"),
    ({"BINPKG_GPG_SIGNING_KEY": FPR}, "make_conf BINPKG_GPG_SIGNING_KEY is set by the builder"),
    ({"BINPKG_GPG_SIGNING_BASE_COMMAND": "gpg --sign"}, "has no [PORTAGE_CONFIG]"),
])
def test_make_conf_that_contradicts_signing_is_refused(tmp_path, make_conf, words):
    with pytest.raises(ChrootError) as e:
        portageconf.check_signing_settings(settings(tmp_path, **make_conf))
    assert words in str(e.value)


def test_trust_signing_key_in_the_roots_portage_gnupg(tmp_path):
    """As a client trusts a binhost key: imported, ultimately trusted, readable by everyone (Portage
    verifies as nobody); the secret key is not there."""
    key = signkeys.make_signing_key(tmp_path / "home")
    root = tmp_path / "root"
    (root / "etc/portage").mkdir(parents=True)
    assert portageconf.trust_signing_key(root, key.public.read_text()) == [key.fingerprint]
    home = root / "etc/portage/gnupg"
    for p in [home, *home.rglob("*")]:
        mode = p.lstat().st_mode
        assert mode & 0o004, p  # world-readable
        if stat.S_ISDIR(mode):
            assert mode & 0o001, p
    assert not list(home.glob("private-keys-v1.d/*"))  # no secret key
    listing = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--no-autostart", "--with-colons",
                              "--list-keys"], capture_output=True, text=True, check=True).stdout
    assert any(line.startswith("pub:u:") for line in listing.splitlines()), listing  # ultimate validity
    # A stage whose /etc/portage/gnupg is a symlink is refused (nothing written through it).
    other = tmp_path / "other"
    (other / "etc/portage").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (other / "etc/portage/gnupg").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ChrootError, match="refusing to write through it"):
        portageconf.trust_signing_key(other, key.public.read_text())
    assert list((tmp_path / "elsewhere").iterdir()) == []


@needs_root
def test_private_tmpfs_holds_a_copy_only_the_namespace_sees(tmp_path):
    """The key's home and passphrase are copied into a tmpfs of the runner's namespace: the command sees
    them (home 0700, passphrase 0400, an agent's socket left behind), the host and the root never do."""
    root = (tmp_path / "root").resolve()
    for d in ("proc", "dev", "sys", "var/cache/binpkgs", "run/snapshotter-signing"):
        (root / d).mkdir(parents=True)
    home = tmp_path / "home"
    testlib.write_tree(home, {"pubring.kbx": "pub", "private-keys-v1.d/AB.key": "secret"})
    home.chmod(0o700)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(home / "S.gpg-agent"))
    (tmp_path / "pp").write_text("sekrit\n")
    pkgdir = tmp_path / "packages"
    pkgdir.mkdir()
    d = f"{root}/run/snapshotter-signing"
    check = (f'test "$(stat -c %a {d})" = 700 && test "$(stat -c %a {d}/gnupg)" = 700 '
             f'&& test "$(cat {d}/gnupg/private-keys-v1.d/AB.key)" = secret && test ! -e {d}/gnupg/S.gpg-agent '
             f'&& test "$(stat -c %a {d}/passphrase)" = 400 && test "$(cat {d}/passphrase)" = sekrit '
             f'&& grep -q " {d} .* - tmpfs " /proc/self/mountinfo && exit 7')
    private = PrivateDir("run/snapshotter-signing", dirs=[(str(home), "gnupg")], files=[(str(tmp_path / "pp"),
                                                                                         "passphrase")])
    with open(tmp_path / "log", "wb") as logf:
        status = builder.run_in_namespace(root, pkgdir, ["/bin/sh", "-c", check], tmp_path / "nsrun.json", logf,
                                          False, private=private)
    sock.close()
    log_text = (tmp_path / "log").read_text()
    assert status == 7, log_text
    assert "private tmpfs run/snapshotter-signing (this namespace only): gnupg, passphrase" in log_text
    assert list((root / "run/snapshotter-signing").iterdir()) == []  # gone with the namespace
    assert mounts_under(root) == []
    assert sorted(p.name for p in home.iterdir()) == ["S.gpg-agent", "private-keys-v1.d", "pubring.kbx"]


def test_namespace_spec_with_a_private_dir_round_trips():
    spec = NamespaceSpec(Path("/r"), [("/p", "var/cache/binpkgs")], ["true"],
                         PrivateDir("run/x", [("/home", "gnupg")], [("/pp", "passphrase")]))
    assert NamespaceSpec.from_json(spec.to_json()) == spec
    for bad in ({"path": "run/x", "dirs": [["/h", "../up"]], "files": []},
                {"path": "run/x", "dirs": [["/h", "a"]], "files": [["/f", "a"]]},
                {"path": 1, "dirs": [], "files": []}):
        text = json.dumps({"root": "/r", "binds": [], "argv": ["true"], "private": bad})
        with pytest.raises(ValueError):
            NamespaceSpec.from_json(text)


def test_build_json_format_3_and_formats_2_and_1_still_read(tmp_path):
    m = manifest.Manifest(profile="p", tag="2026-01-01", commit="c" * 40, repo="/r", stage={"source": "s", "sha256": "x"},
                          overlays=[], portage_profile=None, make_conf=None, portage_confdir=None, repos_conf="",
                          world=None, emerge_command=["emerge"], id="2026-01-01.3", signing_key=FPR,
                          error="stage: bad")
    data = json.loads(m.to_json())
    assert data["format"] == 3 and data["id"] == "2026-01-01.3" and data["signing_key"] == FPR
    assert data["mode"] == "full" and data["incremental"] is None
    two = {k: v for k, v in data.items() if k not in ("mode", "incremental")} | {"format": 2}
    back = manifest.Manifest.from_json(json.dumps(two))
    assert back.format == 2 and back.mode == "full" and back.id == "2026-01-01.3"
    old = {k: v for k, v in two.items() if k not in ("id", "signing_key", "error")} | {"format": 1}
    back = manifest.Manifest.from_json(json.dumps(old))
    assert back.format == 1 and back.id == "" and back.signing_key is None
    with pytest.raises(ValueError, match="format 4"):
        manifest.Manifest.from_json(json.dumps(data | {"format": 4}))
    manifest.write(m, tmp_path / "build.json")
    with pytest.raises(FileExistsError):  # a build.json is never replaced
        manifest.write(m, tmp_path / "build.json")
    assert manifest.load(tmp_path / "build.json") == m
    assert [p.name for p in tmp_path.iterdir()] == ["build.json"]


# ---- a build stops before it starts: `snapshotter build` with a small config, no Portage ----------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A snapshot repository with one tag, a (not bootable) stage and two keys (one with a passphrase)."""
    base = tmp_path_factory.mktemp("signing")
    ebuild_repo.git_repo_with_tags(base / "mirror.git", [("2026-01-01", ebuild_repo.tree_files())])
    stage = base / "stage.tar.zst"
    (base / "stage-root/usr").mkdir(parents=True)
    subprocess.run(["tar", "--zstd", "-C", str(base / "stage-root"), "-cf", str(stage), "."], check=True)
    key = signkeys.make_signing_key(base / "gnupg")
    pp_key = signkeys.make_signing_key(base / "gnupg-pp", passphrase="correct horse")
    return base, stage, key, pp_key


@pytest.fixture
def small(tmp_path, shared):
    """`shared` with this test's own output, work and cache directories: enough to reach the signing check."""
    base, stage, key, pp_key = shared
    sha = hashlib.sha256(stage.read_bytes()).hexdigest()

    def cfg(signing: str, root: str = "extract") -> Path:
        # root = "extract": the stage (which is no root file system) is extracted by the build itself, whose
        # failure is recorded in its own directory; with "overlay" it is unpacked into the stage cache first.
        path = tmp_path / "snapshotter.toml"
        path.write_text(f'repo = "{base}/mirror.git"\n[build]\nwork_dir = "work"\noutput = "out"\n'
                        f'cache_dir = "cache"\nroot = "{root}"\n[binhost]\n{signing}\n'
                        f'[profiles.p]\nstage = "{stage}"\nstage_sha256 = "{sha}"\n')
        return path

    return tmp_path, cfg, key, pp_key


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert [x for x in lines if x.startswith("snapshotter: error:")] == lines[-1:], stderr
    return lines[-1]


@needs_root
@pytest.mark.parametrize("case, words", [
    ("no such key", "no secret key 0123456789ABCDEF0123456789ABCDEF01234567 in"),
    ("missing home", "gnupghome {base}/nowhere does not exist"),
    ("passphrase, none given", "failed: signing failed: No pinentry (the key has a passphrase: set passphrase_file)"),
    ("wrong passphrase", "signing a test message with {pp} failed: signing failed: Bad passphrase"),
    ("passphrase file missing", "passphrase file {base}/missing-pp is missing or not readable"),
])
def test_unusable_signing_key_stops_the_build_before_it_starts(small, case, words):
    """One line, exit 1, no build directory, no root, and no gpg-agent left by the test signature."""
    base, cfg, key, pp_key = small
    (base / "wrong-pp").write_text("wrong\n")
    signing = {
        "no such key": f'signing_key = "{FPR}"\ngnupghome = "{key.home}"',
        "missing home": f'signing_key = "{key.fingerprint}"\ngnupghome = "{base}/nowhere"',
        "passphrase, none given": f'signing_key = "{pp_key.fingerprint}"\ngnupghome = "{pp_key.home}"',
        "wrong passphrase": f'signing_key = "{pp_key.fingerprint}"\ngnupghome = "{pp_key.home}"\n'
                            f'passphrase_file = "{base}/wrong-pp"',
        "passphrase file missing": f'signing_key = "{pp_key.fingerprint}"\ngnupghome = "{pp_key.home}"\n'
                                   f'passphrase_file = "{base}/missing-pp"',
    }[case]
    r = testlib.run_cli("--config", str(cfg(signing)), "build", "--profile", "p")
    assert r.returncode == 1, r.stderr
    line = _one_error_line(r.stderr)
    assert line.startswith("snapshotter: error: profile p: signing key "), line
    assert words.format(base=base, pp=pp_key.fingerprint) in line, line
    assert line.endswith("the build was not started") or "does not exist" in line or "missing" in line, line
    assert not (base / "out/p").exists() or list((base / "out/p").iterdir()) == []
    assert not (base / "work/p").exists() or list((base / "work/p").iterdir()) == []
    assert signkeys.agents_for(key.home) == [] and signkeys.agents_for(pp_key.home) == []


@needs_root
def test_a_usable_key_passes_the_check_and_the_build_gets_its_own_directory(small):
    """With a working key (and passphrase file) the check passes without a terminal and stops its agent;
    this stage cannot build, so the build fails after it started: recorded in its own directory."""
    base, cfg, _key, pp_key = small
    (base / "pp").write_text("correct horse\n")
    r = testlib.run_cli("--config", str(cfg(f'signing_key = "{pp_key.fingerprint}"\ngnupghome = "{pp_key.home}"\n'
                                            f'passphrase_file = "{base}/pp"')), "build", "--profile", "p")
    assert r.returncode == 1, r.stderr
    line = _one_error_line(r.stderr)
    assert "does not look like a root file system" in line, line
    out = base / "out/p/2026-01-01.1"
    man = json.loads((out / "build.json").read_text())
    assert man["ok"] is False and man["id"] == "2026-01-01.1" and man["signing_key"] == pp_key.fingerprint
    assert "does not look like a root file system" in man["error"] and man["exit_status"] is None
    assert "build 2026-01-01.1 failed: " in (out / "build.log").read_text()
    assert signkeys.agents_for(pp_key.home) == []
    # The next build of the same tag is a new build; the failed one stays as it was.
    r = testlib.run_cli("--config", str(cfg("")), "build", "--profile", "p")
    assert r.returncode == 1 and "no signing key" in r.stderr and "refuse unsigned binary packages" in r.stderr
    assert sorted(p.name for p in (base / "out/p").iterdir()) == ["2026-01-01.1", "2026-01-01.2"]
    assert json.loads((out / "build.json").read_text()) == man
    assert json.loads((base / "out/p/2026-01-01.2/build.json").read_text())["signing_key"] is None


def test_a_stage_that_cannot_be_unpacked_for_an_overlay_root_stops_before_the_build(small):
    """With overlay roots the stage is unpacked into the stage cache before the build gets its id: a stage
    that is no root file system fails with one line, no build directory and nothing in the cache."""
    base, cfg, _key, _pp_key = small
    r = testlib.run_cli("--config", str(cfg("", root="overlay")), "build", "--profile", "p")
    assert r.returncode == 1, r.stderr
    assert "does not look like a root file system" in _one_error_line(r.stderr)
    assert not (base / "out/p").exists() or list((base / "out/p").iterdir()) == []
    roots = base / "cache/roots"
    assert [p for p in roots.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("root", ["overlay", "extract"])
def test_a_stage_that_is_not_the_pinned_one_stops_before_the_build(small, root):
    """stage_sha256 names another stage: one line with both digests, no build directory, nothing unpacked,
    whichever way roots are made (with overlay roots the stage cache checks it, once, as it unpacks)."""
    base, cfg, _key, _pp_key = small
    path = cfg("", root=root)
    text = path.read_text()
    sha = re.search(r'stage_sha256 = "([0-9a-f]{64})"', text)[1]
    path.write_text(text.replace(sha, "0" * 64))
    r = testlib.run_cli("--config", str(path), "build", "--profile", "p")
    assert r.returncode == 1, r.stderr
    assert f"sha256 is {sha}, expected {'0' * 64}" in _one_error_line(r.stderr)
    assert not (base / "out/p").exists() or list((base / "out/p").iterdir()) == []
    roots = base / "cache/roots"
    assert not roots.exists() or [p for p in roots.iterdir() if not p.name.endswith(".lock")] == []
