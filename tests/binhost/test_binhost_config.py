"""[binhost] and the per-profile signing overrides: defaults, validation that names the key, signing_for."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import testlib

from snapshotter import config
from snapshotter.errors import ConfigError

FPR_A = "0123456789ABCDEF0123456789ABCDEF01234567"
FPR_B = "89ABCDEF0123456789ABCDEF0123456789ABCDEF"


def load(tmp_path: Path, text: str) -> config.Config:
    (tmp_path / "stage3.tar.xz").write_bytes(b"")
    path = tmp_path / "snapshotter.toml"
    path.write_text(text)
    return config.load(path)


def test_defaults_and_the_example_file() -> None:
    b = config.validate(config.Config()).binhost
    assert (b.web_root, b.editions, b.automatic_edition) == (None, ["testing", "production"], "testing")
    assert (b.signing_key, b.gnupghome, b.passphrase_file) == ("", None, None)
    assert (b.keep_builds, b.rollback_days) == (5, 14)
    example = config.load(testlib.REPO_ROOT / "examples" / "snapshotter.toml")
    assert example.binhost == b


def test_values_are_read_and_normalized(tmp_path: Path) -> None:
    cfg = load(tmp_path, f"""
[binhost]
web_root = "www"
editions = ["daily", "stable", "lts"]
automatic_edition = "daily"
signing_key = "{FPR_A.lower()[:20]} {FPR_A.lower()[20:]}"
gnupghome = "gnupg"
passphrase_file = "/etc/snapshotter/passphrase"
keep_builds = 2
rollback_days = 0
""")
    b = cfg.binhost
    assert b.web_root == tmp_path / "www"
    assert b.editions == ["daily", "stable", "lts"]
    assert b.automatic_edition == "daily"
    assert b.signing_key == FPR_A
    assert b.gnupghome == tmp_path / "gnupg"
    assert b.passphrase_file == Path("/etc/snapshotter/passphrase")
    assert (b.keep_builds, b.rollback_days) == (2, 0)
    assert load(tmp_path, '[binhost]\nautomatic_edition = ""\n').binhost.automatic_edition == ""


@pytest.mark.parametrize("text,message", [
    ("[binhost]\nweb_root = 3\n", "binhost.web_root: expected a path"),
    ("[binhost]\neditions = []\n", "binhost.editions: at least one edition is required"),
    ("[binhost]\neditions = \"testing\"\n", "binhost.editions: expected a list of strings"),
    ("[binhost]\neditions = [\"testing\", \"../x\"]\n", "binhost.editions[1]: not a valid edition name"),
    ("[binhost]\neditions = [\"a\", \"b\", \"a\"]\n", "binhost.editions[2]: edition 'a' is listed twice"),
    ("[binhost]\nautomatic_edition = \"nightly\"\n", "binhost.automatic_edition: 'nightly' is not one of"),
    ("[binhost]\neditions = [\"x\"]\n", "binhost.automatic_edition: 'testing' is not one of"),
    ("[binhost]\nsigning_key = \"ABCD\"\n", "binhost.signing_key: expected a 40-hex-digit"),
    ("[binhost]\nkeep_builds = 0\n", "binhost.keep_builds: must be at least 1"),
    ("[binhost]\nrollback_days = -1\n", "binhost.rollback_days: must not be negative"),
    ("[binhost]\nkeep = 3\n", "binhost.keep: unknown key"),
    ("[profiles.p]\nstage = \"stage3.tar.xz\"\nsigning_key = \"xyz\"\n", "profiles.p.signing_key: expected a 40-hex"),
    ("[profiles.p]\nstage = \"stage3.tar.xz\"\nsigning_key = 5\n", "profiles.p.signing_key: expected a string"),
    ("[profiles.p]\nstage = \"stage3.tar.xz\"\ngnupghome = \"\"\n", "profiles.p.gnupghome: expected a path"),
    ("[profiles.p]\nstage = \"stage3.tar.xz\"\npassphrase_file = []\n", "profiles.p.passphrase_file: expected a string"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_signing_for_takes_each_key_from_the_profile_else_binhost(tmp_path: Path) -> None:
    cfg = load(tmp_path, f"""
[binhost]
signing_key = "{FPR_A}"
gnupghome = "/site/gnupg"
passphrase_file = "/site/pass"
[profiles.plain]
stage = "stage3.tar.xz"
[profiles.own]
stage = "stage3.tar.xz"
signing_key = "{FPR_B.lower()}"
gnupghome = "own-gnupg"
[profiles.own_all]
stage = "stage3.tar.xz"
signing_key = "{FPR_B}"
gnupghome = "/own/gnupg"
passphrase_file = "/own/pass"
""")
    site = config.SigningSettings(FPR_A, Path("/site/gnupg"), Path("/site/pass"))
    assert config.signing_for(cfg, "plain") == site
    assert config.signing_for(cfg, cfg.profiles["plain"]) == site
    assert config.signing_for(cfg, "own") == config.SigningSettings(FPR_B, tmp_path / "own-gnupg", Path("/site/pass"))
    assert config.signing_for(cfg, "own_all") == config.SigningSettings(FPR_B, Path("/own/gnupg"), Path("/own/pass"))


def test_signing_for_is_none_without_any_key(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[binhost]\ngnupghome = "/g"\n[profiles.p]\nstage = "stage3.tar.xz"\ngnupghome = "/h"\n')
    assert config.signing_for(cfg, "p") is None
    cfg2 = load(tmp_path, f'[profiles.p]\nstage = "stage3.tar.xz"\nsigning_key = "{FPR_B}"\n')
    assert config.signing_for(cfg2, "p") == config.SigningSettings(FPR_B, None, None)
