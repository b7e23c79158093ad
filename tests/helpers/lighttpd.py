"""The real lighttpd (Debian's lighttpd + lighttpd-mod-openssl) for tests: a PKI, endpoints on 127.0.0.x,
the configuration `snapshotter web-config lighttpd` writes, the server started and stopped by the test,
and HTTPS requests with or without a client certificate.

Missing lighttpd is a test failure with one clear line (tests/run.sh installs it), never a skip.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

MOD_OPENSSL = Path("/usr/lib/lighttpd/mod_openssl.so")


def require_lighttpd() -> str:
    """The lighttpd binary; the calling test fails (no skip) when lighttpd or its TLS module is missing."""
    binary = shutil.which("lighttpd") or ("/usr/sbin/lighttpd" if os.path.exists("/usr/sbin/lighttpd") else None)
    if binary is None or not MOD_OPENSSL.exists():
        pytest.fail("lighttpd with mod_openssl is not installed: apt-get install lighttpd lighttpd-mod-openssl "
                    "(tests/run.sh installs them)", pytrace=False)
    return binary


def free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def check_config(conf: Path) -> subprocess.CompletedProcess[str]:
    """`lighttpd -tt -f CONF` (loads the modules and the certificates too)."""
    return subprocess.run([require_lighttpd(), "-tt", "-f", str(conf)], capture_output=True, text=True,
                          timeout=30)


class Lighttpd:
    """lighttpd -D -f CONF in the foreground of a child process, listening on `addresses`."""

    def __init__(self, conf: Path, addresses: list[tuple[str, int]]) -> None:
        self.conf = conf
        self.addresses = addresses
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = conf.with_name(conf.name + ".stderr")

    def start(self) -> Lighttpd:
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen([require_lighttpd(), "-D", "-f", str(self.conf)],
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 20  # a readiness wait, not a timing assertion
        pending = list(self.addresses)
        while pending:
            if self.proc.poll() is not None:
                raise AssertionError(f"lighttpd exited with {self.proc.returncode}: {self.stderr.read_text()}")
            try:
                socket.create_connection(pending[0], timeout=1).close()
                pending.pop(0)
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"lighttpd does not listen on {pending[0]}") from None
                time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


def https_get(ip: str, port: int, path: str, *, ca: Path, cert: Path | None = None, key: Path | None = None,
              timeout: float = 20) -> Response:
    """GET https://IP:PORT/PATH checking the server against `ca` (hostname = the IP, from the SAN), with the
    client certificate `cert`/`key` if given. A refused handshake raises ssl.SSLError (its reason is the
    server's TLS alert, e.g. TLSV1_ALERT_UNKNOWN_CA)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    conn = http.client.HTTPSConnection(ip, port, context=ctx, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return Response(resp.status, resp.read())
    finally:
        conn.close()


def refusal(ip: str, port: int, path: str, **kwargs: Path | None) -> str:
    """The TLS alert with which the server refuses this client (ssl.SSLError.reason); an AssertionError
    if it answers with HTTP instead."""
    try:
        resp = https_get(ip, port, path, **kwargs)  # type: ignore[arg-type]
    except ssl.SSLError as e:
        return str(e.reason)
    raise AssertionError(f"expected a refused handshake, got HTTP {resp.status}")
