"""A throwaway PostgreSQL cluster (Debian's package) for the build queue's tests and benchmark.

`Cluster.create(base)` runs initdb and pg_ctl as the `postgres` user into a fresh directory; the
tests share one cluster per session (tests/service/conftest.py) and remove it at the end. Clients log
in the libpq way: role `snap` with a password (scram-sha-256) that only the cluster's pgpass file
holds, found through PGPASSFILE; connection strings never carry it. The superuser connects over the
cluster's own Unix socket (trust), to create a fresh database per test.

Server settings: fsync off for the tests (they crash the server, never the machine; the benchmark turns
it on), synchronous commits on (a job whose enqueue returned must survive `pg_ctl stop -m immediate`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _newest_bin() -> Path:
    """Debian's server binaries, of the newest PostgreSQL installed (15 on Debian 12)."""
    found = sorted((p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()),
                   key=lambda p: int(p.parent.name))
    return found[-1] if found else Path("/usr/lib/postgresql/15/bin")


BIN = _newest_bin()
ROLE = "snap"


def available() -> bool:
    """Can this machine run a cluster (Debian's postgresql package installed, a postgres user)?"""
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return (BIN / "initdb").exists() and (BIN / "pg_ctl").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C.UTF-8"}


class Cluster:
    def __init__(self, base: Path, port: int, fsync: bool = False) -> None:
        self.fsync = fsync
        self.base = base  # owned by postgres: data/, the socket, the log, the pgpass file
        self.data = base / "data"
        self.port = port
        self.listen = ["127.0.0.1"]
        self.pgpass = base / "pgpass"
        self._names = itertools.count(1)

    @classmethod
    def create(cls, prefix: str = "snapshotter-test-pg-", fsync: bool = False) -> Cluster:
        """A new cluster, started. `fsync`: as a server runs (the benchmark); off for the tests."""
        base = Path(tempfile.mkdtemp(prefix=prefix))
        shutil.chown(base, "postgres", "postgres")
        base.chmod(0o755)
        c = cls(base, free_port(), fsync)
        password = os.urandom(12).hex()
        c._as_postgres([str(BIN / "initdb"), "-D", str(c.data), "-U", "postgres", "--auth-local=trust",
                        "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions", "-N"])
        (c.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all 10.213.0.0/16 scram-sha-256\n")  # the build hosts of helpers/netns.py
        c.start()
        c.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'")
        c.pgpass.write_text(f"*:*:*:{ROLE}:{password}\n")
        c.pgpass.chmod(0o600)  # libpq ignores a pgpass file others can read
        return c

    def _as_postgres(self, argv: list[str]) -> None:
        proc = subprocess.run(argv, user="postgres", group="postgres", extra_groups=[], cwd=self.base, env=_env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = (self.base / "log").read_text()[-3000:] if (self.base / "log").exists() else ""
            raise RuntimeError(f"{' '.join(argv)}: {proc.stdout}{proc.stderr}{log}")

    def _options(self) -> str:
        return (f"-c port={self.port} -c listen_addresses={','.join(self.listen)} "
                f"-c unix_socket_directories={self.base} -c fsync={'on' if self.fsync else 'off'} "
                f"-c full_page_writes={'on' if self.fsync else 'off'} "
                "-c max_connections=200")

    def start(self) -> None:
        self._as_postgres([str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "log"), "-w", "-t", "60",
                           "-o", self._options(), "start"])

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (clients disconnected, clean shutdown) or `immediate` (a crash)."""
        self._as_postgres([str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])

    def restart(self, mode: str = "fast", listen: list[str] | None = None) -> None:
        if listen is not None:
            self.listen = listen
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def admin(self, sql: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(host=str(self.base), port=self.port, user="postgres", dbname=dbname,
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.encode())

    def conninfo(self, dbname: str, host: str = "127.0.0.1") -> str:
        """The URL a client uses: no password (it comes from PGPASSFILE)."""
        return f"postgresql://{ROLE}@{host}:{self.port}/{dbname}"

    def new_database(self, prefix: str = "q") -> str:
        name = f"{prefix}{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} OWNER {ROLE}")
        return name

    def remove(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
