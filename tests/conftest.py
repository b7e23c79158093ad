"""Fixtures for every test under tests/ (subdirectories included). Shared helper code lives in the
`helpers` package (`from helpers import testlib`); test modules do not import each other."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import testlib


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
