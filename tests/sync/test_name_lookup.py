"""Name lookups of downloads. A name server that takes queries and never answers: the download's name
lookup is bounded by its connect timeout (no socket timeout or watchdog reaches getaddrinfo), and the
error says what hung. And a TLS mirror named by host name is still verified against that name.

The download runs in a child process with a mount namespace of its own, whose /etc/resolv.conf names a
silent server on a 127.0.0.x address of this test (a UDP and a TCP socket on port 53 that read and never
reply): the host's resolver configuration is not touched."""

from __future__ import annotations

import functools
import http.server
import os
import random
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.download import Downloader
from snapshotter.errors import FetchError

CHILD = """
import sys
from pathlib import Path
from snapshotter.download import Downloader
from snapshotter.errors import FetchError
d = Downloader(Path(sys.argv[1]), timeout=2.0, retries=1, deadline=6.0)
try:
    d.fetch_small("http://mirror.example.org/snapshots/gentoo-20261120.tar.xz.md5sum")
except FetchError as e:
    print(f"{type(e).__name__}: {e}")
finally:
    d.close()
"""


@pytest.fixture
def silent_name_server() -> Iterator[str]:
    address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((address, 53))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind((address, 53))
    tcp.listen(8)
    queries: list[bytes] = []
    stop = threading.Event()

    def swallow() -> None:
        udp.settimeout(0.2)
        while not stop.is_set():
            try:
                queries.append(udp.recvfrom(4096)[0])
            except (TimeoutError, OSError):
                continue

    t = threading.Thread(target=swallow, daemon=True)
    t.start()
    yield address
    stop.set()
    t.join()
    udp.close()
    tcp.close()
    assert queries, "the resolver never asked the silent name server"


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace for resolv.conf needs root")
def test_a_name_server_that_never_answers_fails_the_download_in_its_connect_timeout(
        tmp_path: Path, silent_name_server: str) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"nameserver {silent_name_server}\n")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         'mount --bind "$1" /etc/resolv.conf && exec "$2" "$3" "$4"', "sh",
         str(conf), sys.executable, str(script), str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    # Without the bounded lookup the resolver's own timeouts decide, and the reason is a resolver error.
    assert "DNS lookup of mirror.example.org did not answer within 2 s" in out, out
    assert out.startswith(("Unreachable:", "DeadlineExceeded:")), out


def test_a_tls_mirror_by_name_is_checked_against_that_name(tmp_path: Path) -> None:
    """The bounded lookup connects to the address it found, but TLS still sends and verifies the host
    name: a certificate for `localhost` is accepted at https://localhost:PORT, refused for another name
    that resolves to the same address."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "file.md5sum").write_text("d41d8cd98f00b204e9800998ecf8427e  file\n")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    old = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(cert)
    try:
        d = Downloader(tmp_path / "cache", timeout=5.0, retries=0, deadline=20.0)
        try:
            assert d.fetch_small(f"https://localhost:{port}/file.md5sum").startswith(b"d41d8cd9")
            with pytest.raises(FetchError, match="certificate was not accepted"):
                d.fetch_small(f"https://127.0.0.1:{port}/file.md5sum")  # the address: not the certificate's name
        finally:
            d.close()
    finally:
        server.shutdown()
        server.server_close()
        if old is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = old
