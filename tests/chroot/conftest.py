"""Fixtures of the real-Portage chroot build tests (test_build_portage, test_rebuild_portage): the module's
environment (helpers/buildenv.py) and the leak checks after each test."""

from __future__ import annotations

import os
import stat

import pytest
from helpers import buildenv, signkeys

from chroot.mounts import mounts_under


@pytest.fixture(scope="module")
def env(tmp_path_factory, gpg_key):
    yield from buildenv.portage_env(tmp_path_factory, gpg_key)


@pytest.fixture
def no_leak(env):
    """Checks after each test of a module that asks for it: no mount, /dev intact, no gpg-agent left."""
    dev_before = sorted(os.listdir("/dev"))
    yield
    assert mounts_under(env["base"]) == [] and mounts_under(env["work"]) == []
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(os.listdir("/dev")) == dev_before
    # No gpg-agent outlives a build: not one in a root (the PID namespace took it), not one the signing
    # check started on the host for the key's home.
    assert signkeys.agents_under(env["work"]) == []
    assert signkeys.agents_for(env["basic_key"].home) == [] and signkeys.agents_for(env["trouble_key"].home) == []
