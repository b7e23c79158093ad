"""The real `snapshotter builds | promote | rollback | editions | purge` and the disk line of `status`:
what they print, one-line errors, exit statuses (0, 1, 75), --help with examples."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import binhostlib, testlib

from snapshotter.lock import flocked


@pytest.fixture
def site(tmp_path: Path, gpg_key: testlib.Key) -> binhostlib.Site:
    return binhostlib.make_site(tmp_path / "site", gpg_key)


def ok(site: binhostlib.Site, *args: str, env: dict[str, str] | None = None) -> list[str]:
    r = site.cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def error(site: binhostlib.Site, *args: str, status: int = 1) -> str:
    r = site.cli(*args)
    assert r.returncode == status, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("snapshotter:")]
    assert len(errors) == 1 and errors[0].startswith("snapshotter: error: "), r.stderr
    assert r.stderr.splitlines()[-1] == errors[0] and "Traceback" not in r.stderr
    return errors[0].removeprefix("snapshotter: error: ")


@pytest.mark.parametrize("command", ["builds", "promote", "rollback", "editions", "purge"])
def test_help_has_an_example_and_the_exit_statuses(command: str) -> None:
    r = testlib.run_cli(command, "--help")
    assert r.returncode == 0
    assert "Example" in r.stdout and f"snapshotter {command}" in r.stdout and "Exit status: 0" in r.stdout


def test_the_daily_workflow(site: binhostlib.Site) -> None:
    b10, b11 = site.build("2026-01-10"), site.build("2026-01-11")
    failed = site.build("2026-01-12", ok=False)
    env = {"SUDO_USER": "alice"}
    assert ok(site, "promote", "basic", "--to", "testing", "--build", b10.id, env=env) == [
        f"basic/testing: nothing -> {b10.id} (promote)"]
    assert ok(site, "promote", "basic", "--to", "production", env=env) == [
        f"basic/production: nothing -> {b10.id} (promote)"]
    assert ok(site, "promote", "basic", "--to", "testing", "--build", b11.id)[0].endswith(f"-> {b11.id} (promote)")
    assert ok(site, "promote", "basic", "--to", "production", "--from", "testing")[0] == (
        f"basic/production: {b10.id} -> {b11.id} (promote)")
    assert ok(site, "rollback", "basic", "--edition", "production")[0] == (
        f"basic/production: {b11.id} -> {b10.id} (rollback)")
    lines = ok(site, "builds", "--profile", "basic")
    assert lines[0].startswith(f"basic  {b10.id}  ok  tag 2026-01-10  2 packages  ")
    assert lines[0].endswith("editions production")
    assert lines[1].endswith("editions testing")
    assert lines[2].startswith(f"basic  {failed.id}  failed  ") and lines[2].endswith("editions -")
    lines = ok(site, "editions")
    assert lines[0] == f"basic/testing     {b11.id}  tag 2026-01-11  (root testing.2, previous {b10.id})"
    assert lines[1] == f"basic/production  {b10.id}  tag 2026-01-10  (root production.3, previous {b11.id})"
    assert lines[2] == "history:"
    assert lines[3].endswith(f"alice  promote  basic/testing  - -> {b10.id}")
    assert lines[-1].endswith(f"rollback  basic/production  {b11.id} -> {b10.id}")
    assert len(ok(site, "editions", "--history", "1")) == 4
    lines = ok(site, "purge", "--dry-run")
    assert "would remove root basic/production.1" in lines
    assert any(line.startswith(f"kept build basic {b10.id}: ") for line in lines)
    status = ok(site, "status")
    assert status[-1].startswith("disk: build output ") and "(3 builds); web root " in status[-1]


def test_errors_are_one_line(site: binhostlib.Site) -> None:
    b = site.build("2026-01-10")
    failed = site.build("2026-01-11", ok=False)
    assert error(site, "promote", "basic", "--to", "staging") == \
        "unknown edition 'staging' (editions: testing, production)"
    assert error(site, "promote", "basic", "--to", "production", "--build", failed.id) == \
        f"build basic {failed.id} failed; refusing to promote it"
    assert error(site, "promote", "basic", "--to", "production", "--build", "yesterday") == \
        "not a build id (YYYY-MM-DD.N): 'yesterday'"
    assert error(site, "promote", "basic", "--to", "production") == \
        "basic/testing points at no build; nothing to promote"
    assert error(site, "rollback", "basic", "--edition", "production") == \
        "basic/production points at no build; nothing to roll back"
    assert error(site, "builds", "--profile", "../etc").startswith("profiles.../etc: not a valid profile name")
    with flocked(site.web_root / ".snapshotter" / "lock", "test"):
        msg = error(site, "promote", "basic", "--to", "production", "--build", b.id, status=75)
        assert msg.startswith(f"the web root {site.web_root} is locked by another process")
        assert "locked" in error(site, "purge", status=75)
    assert not (site.web_root / "production").exists()
    r = site.cli("promote", "basic", "--to")
    assert r.returncode == 2


def test_builds_says_what_an_incremental_build_reused(site: binhostlib.Site) -> None:
    full = site.build("2026-01-10")
    inc = binhostlib.write_build(site.output, "basic", "2026-01-11", site.commits["2026-01-11"], incremental={
        "base": full.id, "reused": ["sys-apps/tool/tool-2-1.gpkg.tar"], "rebuilt": ["app-misc/hello/hello-1.0-1.gpkg.tar"]})
    assert (inc.base, inc.reused) == (full.id, 1) and (full.base, full.reused) == ("", 0)
    lines = ok(site, "builds")
    assert f"basic  {inc.id}  ok  tag 2026-01-11  2 packages (1 reused from {full.id})  " in lines[-1]
    assert lines[0].startswith(f"basic  {full.id}  ok  tag 2026-01-10  2 packages  ")
