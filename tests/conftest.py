"""Fixtures for every test under tests/ (subdirectories included). Shared helper code lives in the
`helpers` package (`from helpers import testlib`); test modules do not import each other."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import hostdirs, testlib

from snapshotter import config


@pytest.fixture(scope="session", autouse=True)
def host_defaults_out_of_reach(tmp_path_factory: pytest.TempPathFactory):
    """No test writes outside its temporary directories. For the whole session $SNAPSHOTTER_CONFIG names a
    configuration whose every path is under a temporary directory, so a command run without --config never
    falls back on /var/lib/snapshotter and the other built-in defaults (testlib.run_cli and every other
    child inherit it). A test's own config file must set the paths it uses (state_dir, ...) itself: at the
    end the run fails if anything under those host directories changed (created, removed, resized or
    touched), /var/lib/snapshotter and /var/cache/snapshotter included."""
    base = tmp_path_factory.mktemp("host-defaults")
    cfg = base / "snapshotter.toml"
    cfg.write_text(hostdirs.safe_config(base))
    watched = hostdirs.watched()
    before = {d: hostdirs.listing(d) for d in watched}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(config.CONFIG_ENV, str(cfg))
        yield cfg
    changed = [line for d in watched for line in hostdirs.changes(d, before[d], hostdirs.listing(d))]
    if changed:
        pytest.fail("the test session wrote to the host's directories (a test reached a built-in default):\n  "
                    + "\n  ".join(changed[:20]) + (f"\n  ... and {len(changed) - 20} more" if len(changed) > 20 else ""),
                    pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _stop_gpg_agents():
    """Tests sign with throwaway keyrings; leave no gpg-agent of theirs running."""
    yield
    testlib.stop_agents()


@pytest.fixture(scope="session")
def gpg_key(tmp_path_factory: pytest.TempPathFactory) -> testlib.Key:
    """A throwaway signing key whose uid carries <infrastructure@gentoo.org> (what emerge-webrsync looks up)."""
    return testlib.make_key(tmp_path_factory.mktemp("gpg") / "home")


@pytest.fixture(scope="session")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> testlib.Key:
    return testlib.make_key(tmp_path_factory.mktemp("gpg-other") / "home", uid="Mallory <infrastructure@gentoo.org>")


@pytest.fixture
def http_mirror(tmp_path: Path):
    m = testlib.serve(tmp_path / "mirror")
    yield m
    m.server.shutdown()
    m.server.server_close()
