"""A publishable build carries the stage4 its build packed: stages/stage4-PROFILE-ID.tar.zst (a hard link
to the build's file), its .sha256 and a detached signature by the profile's key; the edition lists them.
A stage4 that is missing or does not match build.json stops the publishing, nothing half made."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers import binhostlib, testlib

from snapshotter.binhost import builds, editions, retention
from snapshotter.errors import SnapshotterError
from snapshotter.service import delivery


@pytest.fixture
def site(tmp_path: Path, gpg_key: testlib.Key) -> binhostlib.Site:
    return binhostlib.make_site(tmp_path / "site", gpg_key)


def with_stage4(site: binhostlib.Site, tag: str, data: bytes, *, recorded: bytes | None = None,
                profile: str = "basic") -> builds.Build:
    """A good build that packed `data` as its stage4 (build.json says `recorded`'s sha256, default the same)."""
    b = site.build(tag, profile=profile)
    (b.path / "stage4.tar.zst").write_bytes(data)
    man = json.loads((b.path / "build.json").read_text())
    man["stage4"] = {"file": "stage4.tar.zst", "sha256": hashlib.sha256(recorded or data).hexdigest(),
                     "size": len(data)}
    (b.path / "build.json").unlink()  # the builder writes it once; here the fixture's is redone
    (b.path / "build.json").write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    return builds.read_build(b.path)


def test_the_stage4_is_published_with_sha256_and_signature(site: binhostlib.Site, tmp_path: Path) -> None:
    data = os.urandom(4096)
    b = with_stage4(site, "2026-01-10", data)
    pub = delivery.make_publishable(site.cfg, b)
    name = f"stage4-basic-{b.id}.tar.zst"
    s4 = pub / "stages" / name
    assert s4.stat().st_ino == (b.path / "stage4.tar.zst").stat().st_ino  # a hard link, not a copy
    sha = hashlib.sha256(data).hexdigest()
    assert (pub / "stages" / f"{name}.sha256").read_text() == f"{sha}  {name}\n"
    proc = binhostlib.gpg_verify(site.key, s4, s4.with_name(f"{name}.asc"), tmp_path / "verify")
    assert proc.returncode == 0 and f"VALIDSIG {site.key.fingerprint}" in proc.stdout, proc.stdout + proc.stderr
    files = json.loads((pub.parent / f"{b.id}.files.json").read_text())
    assert files[f"stages/{name}"] == sha
    assert {f"stages/{name}.sha256", f"stages/{name}.asc"} <= set(files)
    # A build without a stage4 publishes no stages/ at all.
    plain = delivery.make_publishable(site.cfg, site.build("2026-01-10"))
    assert not (plain / "stages").exists()


@pytest.mark.parametrize("case", ["mismatch", "missing"])
def test_a_bad_stage4_is_not_published(site: binhostlib.Site, case: str) -> None:
    b = with_stage4(site, "2026-01-10", b"the real bytes\n", recorded=b"other bytes\n" if case == "mismatch" else None)
    if case == "missing":
        (b.path / "stage4.tar.zst").unlink()
    words = "does not have the sha256 of build.json" if case == "mismatch" else "is missing"
    with pytest.raises(SnapshotterError, match=words):
        delivery.make_publishable(site.cfg, b)
    lay = editions.layout(site.cfg)
    assert not lay.publishable("basic", b.id).exists()
    assert list(lay.builds_dir("basic").glob(f".{b.id}.partial-*")) == []


def test_purge_keeps_the_seed_of_a_chain(tmp_path: Path, gpg_key: testlib.Key) -> None:
    """keep_builds = 1 and newer failed builds: the good build whose stage4 seeds profile chain's next build
    (stage = "latest-build") stays; the same builds of a profile with a stage3 file go."""
    site = binhostlib.make_site(tmp_path / "site", gpg_key, extra="keep_builds = 1\nrollback_days = 0",
                                profiles=("basic", "chain"))
    text = site.config_path.read_text()
    head, sep, chain = text.partition("[profiles.chain]\n")
    site.config_path.write_text(head + sep + f'stage = "latest-build"\nseed_stage = "{tmp_path / "site" / "stage3.tar.xz"}"\n'
                                + "\n".join(line for line in chain.splitlines() if not line.startswith("stage")) + "\n")
    for profile in ("basic", "chain"):
        with_stage4(site, "2026-01-10", b"stage4\n", profile=profile)
        site.build("2026-01-11", profile=profile, ok=False)
        site.build("2026-01-12", profile=profile, ok=False)
    report = retention.purge(site.cfg)
    assert report.exit_status == 0
    assert sorted(f"{b.profile} {b.id}" for b in report.removed) == [
        "basic 2026-01-10.1", "basic 2026-01-11.1", "chain 2026-01-11.1"]
    kept = {f"{k.build.profile} {k.build.id}": k.reasons for k in report.kept}
    assert kept["chain 2026-01-10.1"] == ["seeds the profile's next build (its stage4)"]
    assert (site.output / "chain" / "2026-01-10.1" / "stage4.tar.zst").is_file()


def test_while_a_build_of_a_chain_runs_every_stage4_of_it_is_kept(tmp_path: Path, gpg_key: testlib.Key) -> None:
    """A running build may have resolved an older seed before a newer good build landed (another host): purge
    keeps every good stage4 of a seeded profile while the profile's build lock is held, and not after."""
    from snapshotter.lock import flocked

    site = binhostlib.make_site(tmp_path / "site", gpg_key, extra="keep_builds = 1\nrollback_days = 0",
                                profiles=("chain",))
    text = site.config_path.read_text()
    head, sep, chain = text.partition("[profiles.chain]\n")
    site.config_path.write_text(head + sep + f'stage = "latest-build"\nseed_stage = "{tmp_path / "site" / "stage3.tar.xz"}"\n'
                                + "\n".join(line for line in chain.splitlines() if not line.startswith("stage")) + "\n")
    older = with_stage4(site, "2026-01-10", b"stage4 one\n", profile="chain")
    with_stage4(site, "2026-01-11", b"stage4 two\n", profile="chain")
    cfg = site.cfg
    with flocked(builds.build_lock_path(cfg, "chain"), "build profile chain"):
        report = retention.purge(cfg)
    assert report.removed == []
    kept = {k.build.id: k.reasons for k in report.kept}
    assert kept[older.id] == ["a build of the profile is running (its stage4 may be that build's seed)"]
    assert [b.id for b in retention.purge(cfg).removed] == [older.id]  # lock free: only the newest seed stays

