"""The TOML configuration: defaults, validation errors that name the key, flags over file."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import testlib

from snapshotter import config
from snapshotter.errors import ConfigError


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "snapshotter.toml"
    path.write_text(text)
    return config.load(path)


def test_example_config_loads_and_matches_the_defaults(tmp_path: Path) -> None:
    cfg = config.load(testlib.REPO_ROOT / "examples" / "snapshotter.toml")
    defaults = config.validate(config.Config())
    for section in ("git", "sync", "publish", "service"):
        assert getattr(cfg, section) == getattr(defaults, section), section
    assert cfg.repo == defaults.repo


def test_missing_default_file_means_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    cfg = config.load()
    assert cfg.sync.fingerprints == [config.GENTOO_SNAPSHOT_FPR]
    assert cfg.sync.max_catchup_days == 14


def test_env_variable_names_the_file_and_it_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(config.CONFIG_ENV, str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        config.load()
    (tmp_path / "nope.toml").write_text('repo = "mirror.git"\n')
    assert config.load().repo == tmp_path / "mirror.git"  # relative to the file


@pytest.mark.parametrize("text,message", [
    ("colour = 1\n", "colour: unknown key"),
    ("[sync]\nmirors = []\n", "sync.mirors: unknown key"),
    ("[sync]\nmax_catchup_days = \"14\"\n", "sync.max_catchup_days: expected an integer"),
    ("[sync]\nmax_catchup_days = 0\n", "sync.max_catchup_days: must be at least 1"),
    ("[sync]\nmirrors = \"https://x\"\n", "sync.mirrors: expected a list of strings"),
    ("[sync]\nmirrors = [\"ftp://x\"]\n", "sync.mirrors[0]: expected an http(s):// or file:// URL"),
    ("[sync]\nfingerprints = [\"ABCD\"]\n", "sync.fingerprints[0]: expected a 40-hex-digit"),
    ("[sync]\nkeyring = [3]\n", "sync.keyring[0]: expected a path"),
    ("[sync]\ntimeout = true\n", "sync.timeout: expected a number"),
    ("[sync]\ndeadline = 0\n", "sync.deadline: must be positive"),
    ("[sync]\nmax_member_size = 0\n", "sync.max_member_size: must be a positive number of bytes"),
    ("[sync]\nmax_tarball_size = 1.5\n", "sync.max_tarball_size: expected an integer"),
    ("[sync]\nmax_side_file_size = -1\n", "sync.max_side_file_size: must be a positive number of bytes"),
    ("[sync]\nmax_unpacked_size = \"8G\"\n", "sync.max_unpacked_size: expected an integer"),
    ("[git]\nsign_tags = \"yes\"\n", "git.sign_tags: expected true or false"),
    ("[git]\nbranch = \"-x\"\n", "git.branch: not a valid branch name"),
    ("[git]\npush = [\"--upload-pack=evil\"]\n", "git.push[0]: not a remote name or URL"),
    ("git = 3\n", "git: expected a table"),
    ("[service]\nsync_time = \"25:00\"\n", "service.sync_time: expected HH:MM"),
    ("[publish]\nxz_level = 12\n", "publish.xz_level: must be 0..9"),
    ("repo = \n", "snapshotter.toml:"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_fingerprints_are_normalized(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[sync]\nfingerprints = ["dcd0 5b71 eab9 4199 527f 44ac db6b 8c1f 96d8 bf6d"]\n')
    assert cfg.sync.fingerprints == [config.GENTOO_SNAPSHOT_FPR]


def test_cli_reports_config_errors_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[sync]\nretries = -1\n")
    proc = testlib.run_cli("--config", str(path), "sync")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"snapshotter: error: config file {path}: sync.retries: must not be negative, got -1"


def test_flags_override_the_file(tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key) -> None:
    from datetime import date
    testlib.build_snapshot(http_mirror.root, date(2026, 11, 20), key=gpg_key)
    path = tmp_path / "snapshotter.toml"
    path.write_text(f'repo = "{tmp_path / "from-file.git"}"\n[sync]\nmirrors = ["http://127.0.0.1:9"]\n'
                    f'keyring = ["{gpg_key.public}"]\nfingerprints = ["{gpg_key.fingerprint}"]\n'
                    f'cache_dir = "{tmp_path / "cache"}"\n')
    proc = testlib.run_cli("--config", str(path), "sync", "--repo", str(tmp_path / "from-flag.git"),
                           "--mirror", http_mirror.url, env={"SNAPSHOTTER_NOW": "1795262400"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "from-flag.git" / "HEAD").exists()
    assert not (tmp_path / "from-file.git").exists()


def test_help_teaches(tmp_path: Path) -> None:
    out = testlib.run_cli("sync", "--help").stdout
    for words in ("--mirror URL", "--date YYYYMMDD", "Exit status", "Update portage tree to YYYY-MM-DD"):
        assert words in out
