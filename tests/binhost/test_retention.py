"""`snapshotter purge`: the newest keep_builds, what editions point at (and their previous build), what they
pointed at within rollback_days; never what an edition needs; --dry-run changes nothing; disk use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import binhostlib, testlib

from snapshotter.binhost import builds, editions, retention
from snapshotter.service import delivery

DAY = 86400
T0 = 1780000000  # "now" of the first switches


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def at(monkeypatch: pytest.MonkeyPatch, t: int) -> None:
    monkeypatch.setenv("SNAPSHOTTER_NOW", str(t))


def test_purge_keeps_what_editions_need(tmp_path: Path, gpg_key: testlib.Key,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    site = binhostlib.make_site(tmp_path / "site", gpg_key, extra="keep_builds = 1\nrollback_days = 7",
                                profiles=("basic", "other"))
    at(monkeypatch, T0)
    old = site.build("2026-01-10")  # production points at it
    delivery.promote(site.cfg, "basic", "production", build_id=old.id)
    expired = site.build("2026-01-11")  # testing pointed at it until T0 + 10 days: outside the window
    failed = site.build("2026-01-11", ok=False)
    delivery.on_build_success(site.cfg, "basic", expired.id)
    window = site.build("2026-01-12")  # testing pointed at it until T0 + 19 days: inside the window
    at(monkeypatch, T0 + 10 * DAY)
    delivery.on_build_success(site.cfg, "basic", window.id)
    prev = site.build("2026-01-12")  # the previous build of testing's current root
    at(monkeypatch, T0 + 19 * DAY)
    delivery.on_build_success(site.cfg, "basic", prev.id)
    current = site.build("2026-01-12")
    delivery.on_build_success(site.cfg, "basic", current.id)
    other_old = site.build("2026-01-10", profile="other")
    other_new = site.build("2026-01-10", profile="other")
    _, crashed = builds.allocate(site.output, "basic", "2026-01-11")
    at(monkeypatch, T0 + 20 * DAY)  # the window starts at T0 + 13 days
    before_out, before_www = listing(site.output), listing(site.web_root)
    dry = retention.purge(site.cfg, dry_run=True)
    assert (listing(site.output), listing(site.web_root)) == (before_out, before_www)
    removed = sorted((b.profile, b.id) for b in dry.removed)
    assert removed == sorted([("basic", expired.id), ("basic", failed.id), ("basic", crashed.name),
                              ("other", other_old.id)])
    kept = {(k.build.profile, k.build.id): k.reasons for k in dry.kept}
    assert kept == {
        ("basic", old.id): ["production points at it"],
        ("basic", window.id): ["in 7-day rollback window"],
        ("basic", prev.id): ["previous build of testing", "in 7-day rollback window"],
        ("basic", current.id): ["newest 1", "testing points at it", "in 7-day rollback window"],
        ("other", other_new.id): ["newest 1"],
    }
    assert dry.roots_removed == ["basic/testing.1", "basic/testing.2", "basic/testing.3"]
    assert [c.split("/")[1] for c in dry.snapshots_removed] == [site.commits["2026-01-11"]]
    report = retention.purge(site.cfg)
    assert sorted((b.profile, b.id) for b in report.removed) == removed
    for profile, build_id in removed:
        assert not (site.output / profile / build_id).exists()
        assert not (site.web_root / ".snapshotter" / "builds" / profile / build_id).exists()
        assert (site.output / profile / ".purged" / build_id).is_file()
    # Every edition still serves a complete, consistent set.
    for edition in ("testing", "production"):
        root = site.web_root / edition / "basic"
        ed = editions.current(editions.Layout(site.web_root), "basic", edition)
        assert ed.record is not None
        for rel, sha in ed.record["files"].items():
            assert binhostlib.sha256(root / ed.record["path"] / rel) == sha
        if ed.previous:
            assert (root / "b" / ed.previous / "packages" / "Packages").is_file()
    used = {editions.current(editions.Layout(site.web_root), "basic", e).root for e in ("testing", "production")}
    assert set(os.listdir(site.web_root / ".snapshotter" / "roots" / "basic")) == used
    # The cached snapshot of 2026-01-11 went with the last build linking it; 2026-01-10's stays (old).
    snaps = {p.name for p in (site.web_root / ".snapshotter" / "snapshots").rglob("gentoo-*.tar.xz")}
    assert snaps == {"gentoo-20260110.tar.xz", "gentoo-20260112.tar.xz"}
    assert [c.split("/")[1] for c in report.snapshots_removed] == [site.commits["2026-01-11"]]
    # A second purge finds nothing, and a new build of a purged tag gets a new id.
    again = retention.purge(site.cfg)
    assert not again.removed and not again.roots_removed and not again.snapshots_removed
    assert site.build("2026-01-11").id == "2026-01-11.4"


def test_an_incomplete_build_of_a_running_profile_is_kept(tmp_path: Path, gpg_key: testlib.Key) -> None:
    from snapshotter.lock import flocked
    site = binhostlib.make_site(tmp_path / "site", gpg_key, extra="keep_builds = 1")
    site.build("2026-01-11")
    _, running = builds.allocate(site.output, "basic", "2026-01-10")
    cfg = site.cfg
    with flocked(builds.build_lock_path(cfg, "basic"), "build profile basic"):
        report = retention.purge(cfg)
    assert not report.removed and running.is_dir()
    assert [k.reasons for k in report.kept if k.build.id == running.name] == [["a build of the profile is running"]]
    assert [b.id for b in retention.purge(cfg).removed] == [running.name]


def test_purge_without_a_web_root_and_disk_use(tmp_path: Path, gpg_key: testlib.Key) -> None:
    site = binhostlib.make_site(tmp_path / "site", gpg_key, extra="keep_builds = 2")
    cfg = site.cfg
    cfg.binhost.web_root = None
    big = {"app-misc/big/big-1-1.gpkg.tar": os.urandom(2_000_000)}
    bs = [site.build(t) for t in ("2026-01-10", "2026-01-11")] + [site.build("2026-01-12", packages=big)]
    use = retention.disk_use(cfg)
    assert use.output_builds == 3 and use.output_bytes >= sum(b.size for b in bs) and use.web_root_bytes is None
    assert [b.id for b in retention.purge(cfg).removed] == [bs[0].id]
    cfg.binhost.web_root = site.web_root
    delivery.on_build_success(cfg, "basic", bs[2].id)
    use2 = retention.disk_use(cfg)
    assert use2.output_builds == 2 and use2.web_root_bytes is not None
    # The packages are hard links: the web root adds the snapshot, settings and metadata, not the packages.
    assert use2.output_bytes > 2_000_000 > use2.web_root_bytes > 0
    assert use2.output_bytes < use.output_bytes
