"""Fixtures of the service tests: a throwaway PostgreSQL cluster for the whole session (started on first
use, removed at the end; tests/helpers/pglib.py) and a fresh database in it per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import pglib


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pglib.Cluster]:
    if not pglib.available():
        pytest.skip("PostgreSQL 15 is not installed (tests/run.sh installs the postgresql package)")
    cluster = pglib.Cluster.create()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PGPASSFILE", str(cluster.pgpass))  # how every client here logs in: the libpq way
            for name in ("PGPASSWORD", "PGSERVICE", "PGSERVICEFILE", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
                mp.delenv(name, raising=False)
            yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def pg_url(pg_cluster: pglib.Cluster) -> str:
    """The URL (no password) of a new, empty database owned by the queue's role; the cluster is running."""
    if not pg_cluster.running():
        pg_cluster.start()  # a test that stopped it failed before starting it again
    return pg_cluster.conninfo(pg_cluster.new_database())
