"""Editions with real git, gpg and xz: a build made publishable (packages hard-linked, the tag's snapshot
as `snapshotter publish` makes it, signed settings), atomic switches with a signed edition.json,
promotion, rollback, the automatic forward-only rule, history, refusals."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
from helpers import binhostlib, testlib

from chroot import manifest as manifestmod
from snapshotter.binhost import editions, history
from snapshotter.errors import ConfigError, SnapshotterError
from snapshotter.openpgp import SigningError
from snapshotter.service import delivery


@pytest.fixture
def site(tmp_path: Path, gpg_key: testlib.Key) -> binhostlib.Site:
    return binhostlib.make_site(tmp_path / "site", gpg_key)


def doc_root(site: binhostlib.Site, edition: str, profile: str = "basic") -> Path:
    return site.web_root / edition / profile


def edition_of(site: binhostlib.Site, edition: str) -> dict:
    return json.loads((doc_root(site, edition) / "edition.json").read_text())


def verify(site: binhostlib.Site, data: Path, tmp_path: Path) -> str:
    home = tmp_path / f"verify-{os.urandom(4).hex()}"
    proc = binhostlib.gpg_verify(site.key, data, data.with_name(data.name + ".asc"), home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_a_publishable_build(site: binhostlib.Site, tmp_path: Path) -> None:
    b = site.build("2026-01-10")
    pub = delivery.make_publishable(site.cfg, b)
    assert pub == site.web_root / ".snapshotter" / "builds" / "basic" / b.id
    for rel in ("Packages", "app-misc/hello/hello-1.0-1.gpkg.tar", "sys-apps/tool/tool-2-1.gpkg.tar"):
        assert (pub / "packages" / rel).stat().st_ino == (b.packages_dir / rel).stat().st_ino  # hard links
    # The snapshot is the tag exactly as `snapshotter publish` makes it.
    out = tmp_path / "published"
    r = testlib.run_cli("publish", "--repo", str(site.repo), "--out", str(out), "--signing-key",
                        site.key.fingerprint, "--gnupghome", str(site.key.home), "--xz-threads", "1", "2026-01-10")
    assert r.returncode == 0, r.stderr
    for name in ("gentoo-20260110.tar.xz", "gentoo-20260110.tar.xz.md5sum"):
        assert (pub / "snapshots" / name).read_bytes() == (out / "snapshots" / name).read_bytes()
    snap = pub / "snapshots" / "gentoo-20260110.tar.xz"
    proc = binhostlib.gpg_verify(site.key, snap, snap.with_name(snap.name + ".gpgsig"), tmp_path / "v1")
    assert "[GNUPG:] GOODSIG" in proc.stdout
    assert "[GNUPG:] GOODSIG" in verify(site, pub / "portage" / "portage_settings-20260110.tar.xz", tmp_path)
    files = json.loads((pub.parent / f"{b.id}.files.json").read_text())
    assert files == editions.hash_files(pub)
    assert sorted(files) == [
        "packages/Packages", "packages/app-misc/hello/hello-1.0-1.gpkg.tar", "packages/sys-apps/tool/tool-2-1.gpkg.tar",
        "portage/portage_settings-20260110.tar.xz", "portage/portage_settings-20260110.tar.xz.asc",
        "snapshots/gentoo-20260110.tar.xz", "snapshots/gentoo-20260110.tar.xz.gpgsig",
        "snapshots/gentoo-20260110.tar.xz.md5sum"]
    # Made once: a second call changes nothing; a rebuild of the tag reuses the cached snapshot.
    before = {p: p.stat().st_ino for p in pub.rglob("*")}
    assert delivery.make_publishable(site.cfg, b) == pub
    assert {p: p.stat().st_ino for p in pub.rglob("*")} == before
    b2 = site.build("2026-01-10")
    pub2 = delivery.make_publishable(site.cfg, b2)
    assert (pub2 / "snapshots" / snap.name).stat().st_ino == snap.stat().st_ino


def test_switch_publishes_a_signed_edition_json_listing_every_file(site: binhostlib.Site, tmp_path: Path) -> None:
    b = site.build("2026-01-10", overlays=[{"name": "company", "url": "u", "ref": "r", "commit": "c" * 40}])
    report = delivery.on_build_success(site.cfg, "basic", b.id)
    assert (report.changed, report.from_build, report.to_build, report.edition) == (True, None, b.id, "testing")
    root = doc_root(site, "testing")
    assert os.readlink(root) == "../.snapshotter/roots/basic/testing.1"
    assert "[GNUPG:] GOODSIG" in verify(site, root / "edition.json", tmp_path)
    ed = edition_of(site, "testing")
    assert {k: ed[k] for k in ("profile", "edition", "build", "tag", "commit", "path", "previous_build",
                               "signing_key")} == {
        "profile": "basic", "edition": "testing", "build": b.id, "tag": "2026-01-10",
        "commit": site.commits["2026-01-10"], "path": f"b/{b.id}", "previous_build": None,
        "signing_key": site.key.fingerprint}
    assert ed["overlays"] == [{"name": "company", "commit": "c" * 40}]
    served = root / ed["path"]
    assert ed["files"] == {p.relative_to(served).as_posix(): binhostlib.sha256(p)
                           for p in sorted(served.rglob("*")) if p.is_file()}
    text = (root / "edition.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    # A signature over another edition.json fails: the client can tell.
    (tmp_path / "forged.json").write_text(text.replace(b.id, "2026-01-10.9"))
    (tmp_path / "forged.json.asc").write_bytes((root / "edition.json.asc").read_bytes())
    assert binhostlib.gpg_verify(site.key, tmp_path / "forged.json", tmp_path / "forged.json.asc",
                                 tmp_path / "v2").returncode != 0


def test_promote_rollback_and_history(site: binhostlib.Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    b10 = site.build("2026-01-10")
    delivery.on_build_success(site.cfg, "basic", b10.id)
    r = delivery.promote(site.cfg, "basic", "production")
    assert (r.changed, r.to_build, r.action) == (True, b10.id, "promote")
    b11 = site.build("2026-01-11")
    delivery.on_build_success(site.cfg, "basic", b11.id)
    assert edition_of(site, "testing")["build"] == b11.id
    assert edition_of(site, "production")["build"] == b10.id  # production stays
    r = delivery.promote(site.cfg, "basic", "production")
    assert (r.from_build, r.to_build) == (b10.id, b11.id)
    prod = doc_root(site, "production")
    assert sorted(os.listdir(prod / "b")) == [b10.id, b11.id]  # the previous build stays for clients mid-update
    assert (prod / "b" / b10.id / "packages" / "Packages").is_file()
    again = delivery.promote(site.cfg, "basic", "production")
    assert not again.changed and "already at build" in again.message
    monkeypatch.setenv("SUDO_USER", "bob")
    r = delivery.rollback(site.cfg, "basic", "production")
    assert (r.from_build, r.to_build, r.action) == (b11.id, b10.id, "rollback")
    assert edition_of(site, "production")["build"] == b10.id
    r = delivery.rollback(site.cfg, "basic", "production")  # undoes the rollback
    assert r.to_build == b11.id
    r = delivery.rollback(site.cfg, "basic", "production", to=b10.id)
    assert r.to_build == b10.id
    r = delivery.promote(site.cfg, "basic", "production", build_id=b11.id)
    assert r.to_build == b11.id
    entries = history.read(site.web_root / ".snapshotter" / "history.jsonl")
    assert [(e.action, e.edition, e.from_build, e.to_build, e.user) for e in entries] == [
        ("automatic", "testing", None, b10.id, "alice"),
        ("promote", "production", None, b10.id, "alice"),
        ("automatic", "testing", b10.id, b11.id, "alice"),
        ("promote", "production", b10.id, b11.id, "alice"),
        ("rollback", "production", b11.id, b10.id, "bob"),
        ("rollback", "production", b10.id, b11.id, "bob"),
        ("rollback", "production", b11.id, b10.id, "bob"),
        ("promote", "production", b10.id, b11.id, "bob"),
    ]
    assert all(e.root == f"{e.edition}.{n}" for e, n in zip(entries, [1, 1, 2, 2, 3, 4, 5, 6], strict=True))
    rep = editions.editions_report(site.cfg, "basic", limit=3)
    assert [(s.edition, s.build, s.previous) for s in rep.states] == [
        ("testing", b11.id, b10.id), ("production", b11.id, b10.id)]
    assert [e.to_build for e in rep.history] == [b11.id, b10.id, b11.id]
    rows = editions.builds_report(site.cfg, "basic").rows
    assert [(row.build.id, row.editions) for row in rows] == [(b10.id, []), (b11.id, ["testing", "production"])]


def test_the_automatic_edition_moves_only_forward(site: binhostlib.Site) -> None:
    b11 = site.build("2026-01-11")
    assert delivery.on_build_success(site.cfg, "basic", b11.id).changed
    late = site.build("2026-01-10")  # a late build of an older tag
    r = delivery.on_build_success(site.cfg, "basic", late.id)
    assert not r.changed and "stays at 2026-01-11.1" in r.message
    assert edition_of(site, "testing")["build"] == b11.id
    rebuild = site.build("2026-01-11")  # a rebuild of the same tag (an overlay push) wins
    assert delivery.on_build_success(site.cfg, "basic", rebuild.id).to_build == "2026-01-11.2"
    assert edition_of(site, "testing")["build"] == "2026-01-11.2"
    assert not (site.web_root / ".snapshotter" / "builds" / "basic" / late.id).exists()  # never made publishable
    assert not doc_root(site, "production").exists()


def test_no_web_root_or_no_automatic_edition_publishes_nothing(tmp_path: Path, gpg_key: testlib.Key) -> None:
    s = binhostlib.make_site(tmp_path / "a", gpg_key, extra='automatic_edition = ""')
    b = s.build("2026-01-10")
    r = delivery.on_build_success(s.cfg, "basic", b.id)
    assert not r.changed and "no automatic edition" in r.message and not s.web_root.exists()
    cfg = s.cfg
    cfg.binhost.web_root = None
    assert "no [binhost] web_root" in delivery.on_build_success(cfg, "basic", b.id).message
    with pytest.raises(ConfigError, match=r"no web root: set \[binhost\] web_root"):
        delivery.promote(cfg, "basic", "production", build_id=b.id)


def test_refusals(site: binhostlib.Site) -> None:
    cfg = site.cfg
    failed = site.build("2026-01-10", ok=False)
    with pytest.raises(SnapshotterError, match=f"^build basic {failed.id} failed; refusing to promote it$"):
        delivery.promote(cfg, "basic", "production", build_id=failed.id)
    assert delivery.on_build_success(cfg, "basic", site.build("2026-01-11").id).changed
    from snapshotter.binhost import builds
    _, incomplete = builds.allocate(site.output, "basic", "2026-01-12")
    with pytest.raises(SnapshotterError, match="is incomplete"):
        delivery.promote(cfg, "basic", "production", build_id=incomplete.name)
    with pytest.raises(SnapshotterError, match="^profile basic has no build 2026-01-09.1"):
        delivery.promote(cfg, "basic", "production", build_id="2026-01-09.1")
    with pytest.raises(ConfigError, match=r"^unknown edition 'staging' \(editions: testing, production\)$"):
        delivery.promote(cfg, "basic", "staging")
    with pytest.raises(ConfigError, match="--from or --build, not both"):
        delivery.promote(cfg, "basic", "production", from_edition="testing", build_id="2026-01-11.1")
    with pytest.raises(ConfigError, match="--from and --to are both testing"):
        delivery.promote(cfg, "basic", "testing")
    with pytest.raises(SnapshotterError, match="^basic/production points at no build; nothing to promote$"):
        delivery.promote(cfg, "basic", "testing", from_edition="production")
    with pytest.raises(SnapshotterError, match="has no earlier build to roll back to"):
        delivery.rollback(cfg, "basic", "testing")
    with pytest.raises(SnapshotterError, match="points at no build; nothing to roll back"):
        delivery.rollback(cfg, "basic", "production")
    with pytest.raises(SnapshotterError, match="is at build 2026-01-11.1 already"):
        delivery.rollback(cfg, "basic", "testing", to="2026-01-11.1")
    (site.web_root / "production").mkdir()
    (site.web_root / "production" / "basic").mkdir()  # something else where the document root belongs
    with pytest.raises(SnapshotterError, match="exists and is not a symlink; move it away"):
        delivery.promote(cfg, "basic", "production")
    cfg.binhost.signing_key = ""
    with pytest.raises(SigningError, match=r"no signing key for profile basic: set \[binhost\] signing_key"):
        delivery.promote(cfg, "basic", "production")
    assert edition_of(site, "testing")["build"] == "2026-01-11.1"


def test_a_build_signed_with_another_key_is_refused(site: binhostlib.Site, other_key: testlib.Key) -> None:
    b = site.build("2026-01-10", signing_key=other_key.fingerprint)
    with pytest.raises(SnapshotterError, match=f"was signed with {other_key.fingerprint}, but the profile's signing "
                                               f"key is now {site.key.fingerprint}"):
        delivery.promote(site.cfg, "basic", "testing", build_id=b.id)
    r = delivery.on_build_success(site.cfg, "basic", b.id)
    assert r.exit_status == 1 and "but the profile's signing key is now" in r.message
    ok = site.build("2026-01-10", signing_key=site.key.fingerprint)
    assert delivery.on_build_success(site.cfg, "basic", ok.id).changed
    if manifestmod.FORMAT >= 2:  # build.json says whether the packages are signed
        unsigned = site.build("2026-01-11", signing_key=None)
        with pytest.raises(SnapshotterError, match="has unsigned packages .clients refuse them.; refusing to promote"):
            delivery.promote(site.cfg, "basic", "production", build_id=unsigned.id)
        r = delivery.on_build_success(site.cfg, "basic", unsigned.id)  # the build succeeded: a report, no raise
        assert (r.changed, r.exit_status) == (False, 1)
        assert r.message == (f"build basic {unsigned.id} not published to testing: build basic {unsigned.id} has "
                             "unsigned packages (clients refuse them); refusing to publish it")


def test_a_passphrase_protected_key_signs_with_passphrase_file(tmp_path: Path) -> None:
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    testlib.HOMES.append(home)
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase",
                    "s3cret words", "--quick-gen-key", "Binhost <binhost@example.org>", "ed25519", "sign", "never"],
                   check=True, capture_output=True)
    out = subprocess.run(["gpg", "--homedir", str(home), "--with-colons", "--list-secret-keys"], check=True,
                         capture_output=True, text=True).stdout
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    public = home / "public.asc"
    public.write_bytes(subprocess.run(["gpg", "--homedir", str(home), "--armor", "--export", fpr], check=True,
                                      capture_output=True).stdout)
    key = testlib.Key(home, fpr, public)
    pass_file = tmp_path / "passphrase"
    pass_file.write_text("s3cret words\n")
    no_pass = binhostlib.make_site(tmp_path / "a", key)
    b = no_pass.build("2026-01-10")
    with pytest.raises(SigningError, match=f"signing .* with {fpr} failed"):
        delivery.promote(no_pass.cfg, "basic", "testing", build_id=b.id)
    assert delivery.on_build_success(no_pass.cfg, "basic", b.id).exit_status == 1
    assert not (no_pass.web_root / "testing").exists()
    site = binhostlib.make_site(tmp_path / "b", key, extra=f'passphrase_file = "{pass_file}"')
    b = site.build("2026-01-10")
    assert delivery.on_build_success(site.cfg, "basic", b.id).changed
    assert "[GNUPG:] GOODSIG" in verify(site, doc_root(site, "testing") / "edition.json", tmp_path)


def test_a_lost_history_line_is_written_by_the_next_switch(site: binhostlib.Site) -> None:
    b10, b11 = site.build("2026-01-10"), site.build("2026-01-11")
    delivery.on_build_success(site.cfg, "basic", b10.id)
    delivery.on_build_success(site.cfg, "basic", b11.id)
    hist = site.web_root / ".snapshotter" / "history.jsonl"
    lines = hist.read_text().splitlines(keepends=True)
    hist.write_text(lines[0] + lines[1][:20])  # the second line lost mid-write
    delivery.promote(site.cfg, "basic", "production")
    assert [(e.edition, e.to_build) for e in history.read(hist)] == [
        ("testing", b10.id), ("testing", b11.id), ("production", b11.id)]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_across_file_systems_packages_are_copied_with_one_warning(
        site: binhostlib.Site, caplog: pytest.LogCaptureFixture) -> None:
    site.web_root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(site.web_root)], check=True)
    try:
        b = site.build("2026-01-10")
        with caplog.at_level(logging.WARNING):
            pub = delivery.make_publishable(site.cfg, b)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "another file system" in warnings[0].getMessage()
        for rel in ("Packages", "app-misc/hello/hello-1.0-1.gpkg.tar"):
            assert (pub / "packages" / rel).read_bytes() == (b.packages_dir / rel).read_bytes()
            assert (pub / "packages" / rel).stat().st_dev != (b.packages_dir / rel).stat().st_dev
    finally:
        subprocess.run(["umount", str(site.web_root)], check=True)
