"""[profiles.NAME] validation: every key, every wrong type, errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import testlib

from snapshotter import config
from snapshotter.config import DEFAULT_EMERGE_ARGS, Overlay, is_url, parse_profile
from snapshotter.errors import ConfigError
from snapshotter.service.build import portage_settings


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "stage3.tar.xz").write_bytes(b"x")
    (tmp_path / "confdir").mkdir()
    (tmp_path / "overlay.git").mkdir()
    return tmp_path


def test_full_profile(base):
    p = parse_profile("basic", {
        "stage": "stage3.tar.xz",
        "stage_sha256": "AB" * 32,
        "portage_profile": "default/linux/amd64/23.0/",
        "portage_confdir": "confdir",
        "make_conf": {"CFLAGS": "-O2 -pipe", "USE": ["ssl", "-X"], "FEATURES": "ccache"},
        "world": ["app-misc/hello", ">=dev-libs/libfoo-1.0:0", "@custom"],
        "emerge_args": "--emptytree --jobs=2 @world",
        "overlays": [{"name": "extra", "url": "overlay.git", "ref": "v1.0"},
                     {"name": "other", "url": "https://git.example.org/o.git", "ref": "0123abcd"}],
    }, base)
    assert p.stage == str(base / "stage3.tar.xz") and not is_url(p.stage)
    assert p.stage_sha256 == "ab" * 32
    assert p.portage_profile == "default/linux/amd64/23.0"
    assert p.portage_confdir == base / "confdir"
    assert p.make_conf == {"CFLAGS": "-O2 -pipe", "USE": "ssl -X", "FEATURES": "ccache"}
    assert portage_settings(p).features() == ["buildpkg", "ccache"]  # buildpkg is always there
    assert p.world == ["app-misc/hello", ">=dev-libs/libfoo-1.0:0", "@custom"]
    assert p.emerge_args == ["--emptytree", "--jobs=2", "@world"]
    assert p.overlays == [Overlay("extra", str(base / "overlay.git"), "v1.0"),
                          Overlay("other", "https://git.example.org/o.git", "0123abcd")]


def test_defaults(base):
    p = parse_profile("p", {"stage": "https://example.org/stage3-amd64.tar.xz"}, base)
    assert is_url(p.stage) and p.stage_sha256 is None
    assert portage_settings(p).features() == ["buildpkg", "cgroup", "ipc-sandbox", "network-sandbox", "parallel-fetch"]
    assert p.emerge_args == list(DEFAULT_EMERGE_ARGS) and p.world is None and p.overlays == []
    assert p.portage_profile is None and p.portage_confdir is None and p.make_conf == {}


@pytest.mark.parametrize("table, key, words", [
    ({"bogus": 1}, "profiles.p.bogus", "unknown key"),
    ({"stage": None}, "profiles.p.stage", "missing"),
    ({"stage": "nope.tar.xz"}, "profiles.p.stage", "does not exist"),
    ({"stage": 5}, "profiles.p.stage", "expected a string"),
    ({"stage": "https://x.org/stage.zip"}, "profiles.p.stage", ".tar.xz, .tar.bz2 or .tar.zst"),
    ({"stage_sha256": "abc"}, "profiles.p.stage_sha256", "64 hex digits"),
    ({"stage_sha256": 12}, "profiles.p.stage_sha256", "expected a string"),
    ({"portage_profile": "../../etc"}, "profiles.p.portage_profile", "below the tree's profiles/"),
    ({"portage_profile": "a b"}, "profiles.p.portage_profile", "below the tree's profiles/"),
    ({"portage_confdir": "missing"}, "profiles.p.portage_confdir", "does not exist"),
    ({"make_conf": "CFLAGS=-O2"}, "profiles.p.make_conf", "expected a table"),
    ({"make_conf": {"C-FLAGS": "x"}}, "profiles.p.make_conf.C-FLAGS", "not a valid variable name"),
    ({"make_conf": {"PKGDIR": "/x"}}, "profiles.p.make_conf.PKGDIR", "set by the builder"),
    ({"make_conf": {"DISTDIR": "/x"}}, "profiles.p.make_conf.DISTDIR", "set by the builder"),
    ({"make_conf": {"CFLAGS": 2}}, "profiles.p.make_conf.CFLAGS", "expected a string"),
    ({"make_conf": {"CFLAGS": "a\nrm -rf /"}}, "profiles.p.make_conf.CFLAGS", "one line"),
    ({"make_conf": {"FEATURES": "-buildpkg"}}, "profiles.p.make_conf.FEATURES", "buildpkg is required"),
    ({"world": "app-misc/hello"}, "profiles.p.world", "expected a list"),
    ({"world": ["-rf"]}, "profiles.p.world[0]", "not a package atom"),
    ({"world": ["a b"]}, "profiles.p.world[0]", "not a package atom"),
    ({"emerge_args": []}, "profiles.p.emerge_args", "must not be empty"),
    ({"emerge_args": 3}, "profiles.p.emerge_args", "expected a list"),
    ({"emerge_args": "--x 'unclosed"}, "profiles.p.emerge_args", "quotation"),
    ({"overlays": {"name": "x"}}, "profiles.p.overlays", "expected a list"),
    ({"overlays": [{"name": "x", "url": "overlay.git"}]}, "profiles.p.overlays[0].ref", "missing"),
    ({"overlays": [{"name": "x", "url": "overlay.git", "ref": "v1", "branch": "b"}]},
     "profiles.p.overlays[0].branch", "unknown key"),
    ({"overlays": [{"name": "../x", "url": "overlay.git", "ref": "v1"}]}, "profiles.p.overlays[0].name",
     "not a valid repository name"),
    ({"overlays": [{"name": "gentoo", "url": "overlay.git", "ref": "v1"}]}, "profiles.p.overlays[0].name",
     "not a valid repository name"),
    ({"overlays": [{"name": "x", "url": "overlay.git", "ref": "v1"}, {"name": "x", "url": "overlay.git",
                                                                       "ref": "v2"}]},
     "profiles.p.overlays[1].name", "listed twice"),
    ({"overlays": [{"name": "x", "url": "overlay.git", "ref": "../../v1"}]}, "profiles.p.overlays[0].ref",
     "not a valid tag"),
    ({"overlays": [{"name": "x", "url": "overlay.git", "ref": "--upload-pack=sh"}]},
     "profiles.p.overlays[0].ref", "not a valid tag"),
    ({"overlays": [{"name": "x", "url": "--upload-pack=touch /tmp/x", "ref": "v1"}]},
     "profiles.p.overlays[0].url", "not a git URL"),
    ({"overlays": [{"name": "x", "url": "no-such-dir", "ref": "v1"}]}, "profiles.p.overlays[0].url",
     "does not exist"),
])
def test_errors_name_the_key(base, table, key, words):
    full = {"stage": "stage3.tar.xz", **table}
    if full["stage"] is None:
        del full["stage"]
    with pytest.raises(ConfigError) as e:
        parse_profile("p", full, base)
    msg = str(e.value)
    assert msg.startswith(key + ":"), msg
    assert words in msg, msg


@pytest.mark.parametrize("name", ["../etc", ".hidden", "-x", "a b", "a/b", ""])
def test_profile_names_are_path_safe(base, name):
    with pytest.raises(ConfigError, match="not a valid profile name"):
        parse_profile(name, {"stage": "stage3.tar.xz"}, base)


def test_config_file_loads_profiles(base):
    cfg_file = base / "snapshotter.toml"
    cfg_file.write_text('[build]\nwork_dir = "work"\n[profiles.basic]\nstage = "stage3.tar.xz"\n'
                        'world = ["app-misc/hello"]\n')
    cfg = config.load(cfg_file)
    assert cfg.build.work_dir == base / "work"
    assert cfg.profiles["basic"].world == ["app-misc/hello"]


def test_cli_reports_bad_profile_in_one_line(base):
    cfg_file = base / "snapshotter.toml"
    cfg_file.write_text('[profiles.basic]\nstage = "stage3.tar.xz"\nstage_sha256 = "nothex"\n')
    r = testlib.run_cli("--config", str(cfg_file), "build", "--profile", "basic")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"snapshotter: error: config file {cfg_file}: profiles.basic.stage_sha256: expected 64 hex digits, "
        "got 'nothex'"]
