"""Seeding a build from a build's stage4: `stage = "latest-build"` / `"build:ID"`, `seed_stage`; which
build is a seed (only good ones with a stage4 file), and the configuration errors, each naming its key.
The builds here are build directories as the builder leaves them (build.json + stage4.tar.zst); the real
chain of builds is in test_build_portage.py."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path

import pytest
from helpers import testlib

from snapshotter.config import parse_profile
from snapshotter.errors import ConfigError, SnapshotterError
from snapshotter.service.build import StageSource, resolve_stage

COMMIT = "c0ffee" * 6 + "c0ff"


def make_build(out: Path, build_id: str, *, ok: bool = True, stage4: bool = True, profile: str = "chain",
               file_present: bool = True) -> StageSource:
    d = out / profile / build_id
    d.mkdir(parents=True)
    data = f"stage4 of {build_id}\n".encode()
    sha = hashlib.sha256(data).hexdigest()
    if stage4 and file_present:
        (d / "stage4.tar.zst").write_bytes(data)
    man = {"id": build_id, "profile": profile, "tag": build_id.rsplit(".", 1)[0], "commit": COMMIT, "ok": ok,
           "format": 2, "packages": [], "packages_index": None, "signing_key": None,
           "stage4": {"file": "stage4.tar.zst", "sha256": sha, "size": len(data)} if stage4 else None}
    (d / "build.json").write_text(json.dumps(man))
    return StageSource(str(d / "stage4.tar.zst"), sha, build_id)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "stage3.tar.xz").write_bytes(b"x")
    return tmp_path


def test_latest_build_takes_the_newest_good_build_with_a_stage4(base):
    prof = parse_profile("chain", {"stage": "latest-build", "seed_stage": "stage3.tar.xz",
                                   "seed_stage_sha256": "ab" * 32}, base)
    assert prof.stage4 is True and prof.stage_build == "latest-build"
    out = base / "out"
    # No build yet: the configured seed (a chain starts, or is reset, from it).
    assert resolve_stage(prof, out) == StageSource(str(base / "stage3.tar.xz"), "ab" * 32, None)
    good = make_build(out, "2026-01-01.1")
    assert resolve_stage(prof, out) == good
    make_build(out, "2026-01-02.1", ok=False)  # failed (even with a stage4 file): never a seed
    make_build(out, "2026-01-02.2", stage4=False)  # good, built with stage4 = false
    make_build(out, "2026-01-03.1", file_present=False)  # its stage4 file is gone
    (out / "chain" / "2026-01-04.1").mkdir()  # incomplete (running or crashed)
    make_build(out, "2026-01-05.1", profile="other")  # another profile's
    assert resolve_stage(prof, out) == good
    newer = make_build(out, "2026-01-01.2")  # a rebuild of the same tag comes after .1
    assert resolve_stage(prof, out) == newer
    assert resolve_stage(prof, out).build == "2026-01-01.2"


def test_latest_build_without_a_good_build_or_seed_is_one_error(base):
    prof = parse_profile("chain", {"stage": "latest-build"}, base)
    make_build(base / "out", "2026-01-02.1", ok=False)
    with pytest.raises(ConfigError, match=r"^profiles\.chain\.stage: profile chain has no good build with a "
                                          r"stage4 .* and no seed_stage"):
        resolve_stage(prof, base / "out")


def test_build_id_stage(base):
    out = base / "out"
    good = make_build(out, "2026-01-01.1")
    make_build(out, "2026-01-02.1", ok=False)
    make_build(out, "2026-01-03.1", stage4=False)
    prof = parse_profile("chain", {"stage": "build:2026-01-01.1"}, base)
    assert prof.stage_build == "2026-01-01.1"
    assert resolve_stage(prof, out) == good
    for bid, words in (("2026-01-02.1", "is failed; only a good build seeds another"),
                       ("2026-01-03.1", "has no stage4"), ("2026-01-09.1", "has no build 2026-01-09.1")):
        p = parse_profile("chain", {"stage": f"build:{bid}"}, base)
        with pytest.raises(SnapshotterError, match=words):
            resolve_stage(p, out)


@pytest.mark.parametrize("table, key, words", [
    ({"stage": "build:yesterday"}, "profiles.p.stage", "expected \"build:YYYY-MM-DD.N\""),
    ({"stage": "latest-build", "stage_sha256": "ab" * 32}, "profiles.p.stage_sha256", "seed_stage_sha256"),
    ({"stage": "build:2026-01-01.1", "stage_sha256": "ab" * 32}, "profiles.p.stage_sha256", "build.json"),
    ({"stage": "stage3.tar.xz", "seed_stage": "stage3.tar.xz"}, "profiles.p.seed_stage", "only with stage"),
    ({"stage": "latest-build", "seed_stage": "nope.tar.xz"}, "profiles.p.seed_stage", "does not exist"),
    ({"stage": "latest-build", "seed_stage": "stage3.tar.xz", "seed_stage_sha256": "x"},
     "profiles.p.seed_stage_sha256", "64 hex digits"),
    ({"stage": "latest-build", "seed_stage_sha256": "ab" * 32}, "profiles.p.seed_stage_sha256", "set seed_stage"),
    ({"stage": "stage3.tar.xz", "stage4": "yes"}, "profiles.p.stage4", "true or false"),
])
def test_config_errors_name_the_key(base, table, key, words):
    with pytest.raises(ConfigError) as e:
        parse_profile("p", table, base)
    assert str(e.value).startswith(f"{key}: ") and words in str(e.value), str(e.value)


def test_stage4_can_be_switched_off(base):
    assert parse_profile("p", {"stage": "stage3.tar.xz", "stage4": False}, base).stage4 is False


def test_documented_daily_profile_parses(tmp_path):
    """The commented [profiles.daily] of examples/snapshotter.toml is valid once uncommented."""
    text = (testlib.REPO_ROOT / "examples/snapshotter.toml").read_text()
    lines = []
    for line in text[text.index("# [profiles.daily]"):].splitlines():
        if not line.startswith("#"):
            break
        lines.append(re.sub(r"^# ?", "", line))
    table = tomllib.loads("\n".join(lines).replace("<64 hex digits>", "0" * 64))["profiles"]["daily"]
    (tmp_path / "stage3.tar.xz").write_bytes(b"")
    table["seed_stage"] = str(tmp_path / "stage3.tar.xz")
    p = parse_profile("daily", table, tmp_path)
    assert p.stage_build == "latest-build" and p.seed_stage_sha256 == "0" * 64 and p.stage4
