"""A fault-injecting HTTP mirror on 127.0.0.1 for the download and sync tests.

`serve_faults(root)` serves the files under `root` as a real mirror does (strong ETag, Last-Modified,
Range with If-Range, 416) and lets a test plan what each request for a path gets:

    srv.plan("/snapshots/x.tar.xz", "garbage-reset", "ok")   # first request, second and later ones

Behaviours (`ok` is the default):
- `ok`: the file, honouring Range/If-Range;
- `drip`: the headers, then one byte every `srv.drip_interval` seconds (until the client goes or the body ends);
- `reset`: half the body, then a TCP reset;
- `garbage-reset`: half the body's length of garbage (with the real validators), then a TCP reset;
- `endless`: a body without Content-Length that never ends (zeros; stops when the client goes, or after
  `srv.endless_cap` bytes);
- `lie-long`: a Content-Length 1000 bytes larger than the body, then close; `lie-short`: 10 bytes smaller;
- `gzip`: gzip-compressed body with `Content-Encoding: gzip` (whatever Accept-Encoding said), Content-Length
  of the compressed bytes (nginx's `gzip_static`/`gzip on` with a length);
- `chunked`: `Transfer-Encoding: chunked` without a Content-Length (nginx proxying, dynamic servers);
  `chunked-gzip`: the same, gzip-compressed;
- `redirect`: 302 to the same path on `srv.redirect_to` (another server) or, without it, to `/r/PATH`
  (served as PATH);
- `stall`: accept the request and never answer (until the client goes, bounded by `srv.stall_cap` s);
- `retry-after`: 503 with `Retry-After: 86400`; `500`: a server error; `html`: an error page with 200;
  `404`: not found.

Every request loop is bounded (bytes, time) and stops when the server is shut down (`srv.close()`).
`stalling_tcp()` is a bare TCP port that accepts and never says anything (for git fetch).
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import hashlib
import http.server
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FaultServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: C901 (one branch per behaviour)
        srv = self.server
        path = self.path.split("?", 1)[0]
        if path.startswith("/r/"):
            path = path[2:]
        with srv.lock:
            srv.log.append((self.path, dict(self.headers)))
            steps = srv.plans.get(path)
            how = (steps.pop(0) if len(steps) > 1 else steps[0]) if steps else "ok"
        if how == "stall":
            srv.stop.wait(srv.stall_cap)
            self.close_connection = True
            return
        if how == "404":
            self._simple(404, b"not found")
            return
        if how == "500":
            self._simple(500, b"server error")
            return
        if how == "retry-after":
            self._simple(503, b"busy", {"Retry-After": "86400"})
            return
        if how == "html":
            self._simple(200, b"<html><body>Repository maintenance</body></html>", {"Content-Type": "text/html"})
            return
        if how == "redirect":
            target = (srv.redirect_to.rstrip("/") + path) if srv.redirect_to else "/r" + path
            self._simple(302, b"", {"Location": target})
            return
        file = srv.root / path.lstrip("/")
        if not file.is_file():
            self._simple(404, b"not found")
            return
        data = file.read_bytes()
        etag = '"' + hashlib.md5(data).hexdigest() + '"'
        modified = email.utils.formatdate(file.stat().st_mtime, usegmt=True)
        validators = {"ETag": etag, "Last-Modified": modified}
        if how == "endless":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            sent, block = 0, b"\0" * 65536
            with contextlib.suppress(OSError):
                while sent < srv.endless_cap and not srv.stop.is_set():
                    self.wfile.write(block)
                    sent += len(block)
            return
        if how in ("chunked", "chunked-gzip"):
            body = gzip.compress(data, mtime=0) if how == "chunked-gzip" else data
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            if how == "chunked-gzip":
                self.send_header("Content-Encoding", "gzip")
            for k, v in validators.items():
                self.send_header(k, v)
            self.end_headers()
            with contextlib.suppress(OSError):
                for i in range(0, len(body), 7777):
                    piece = body[i:i + 7777]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            return
        if how == "gzip":
            body = gzip.compress(data, mtime=0)
            self._simple(200, body, {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream",
                                     "Vary": "Accept-Encoding", **validators})
            return
        start = 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and rng.startswith("bytes=") and how == "ok" and if_range in (None, etag, modified):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self._simple(416, b"", {"Content-Range": f"bytes */{len(data)}", **validators})
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if how == "garbage-reset":
            body = os.urandom(len(body))
        length = len(body) + {"lie-long": 1000, "lie-short": -10}.get(how, 0)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for k, v in validators.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            if how in ("reset", "garbage-reset"):
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self._reset()
                return
            if how == "drip":
                self.wfile.flush()
                for i in range(len(body)):
                    if srv.stop.wait(srv.drip_interval):
                        break
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body[:length] if how == "lie-short" else body)
            if how.startswith("lie-"):
                self.wfile.flush()
                self.close_connection = True
        except OSError:
            self.close_connection = True

    def _simple(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Type" not in (headers or {}):
            self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a crashed server or a middlebox does."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()


class FaultServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.lock = threading.Lock()
        self.plans: dict[str, list[str]] = {}
        self.log: list[tuple[str, dict[str, str]]] = []
        self.stop = threading.Event()
        self.drip_interval = 1.0
        self.endless_cap = 1 << 30
        self.stall_cap = 120.0
        self.redirect_to = ""

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that went away (the downloader cutting a drip off) is what these tests do

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def plan(self, path: str, *steps: str) -> None:
        """What the next requests for `path` get, in order; the last step stays."""
        with self.lock:
            self.plans[path] = list(steps)

    def requests(self, path: str | None = None) -> list[dict[str, str]]:
        """The headers of each request (for `path` only, when given)."""
        with self.lock:
            return [h for p, h in self.log if path is None or p.split("?", 1)[0].removeprefix("/r") == path]

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


def serve_faults(root: Path) -> FaultServer:
    """Start a FaultServer for `root` in a daemon thread; `close()` it when done."""
    root.mkdir(parents=True, exist_ok=True)
    srv = FaultServer(root)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@dataclass
class StallingTcp:
    """A TCP port that accepts connections and never sends a byte (a stuck git or HTTP server)."""

    sock: socket.socket
    stop: threading.Event = field(default_factory=threading.Event)
    accepted: list[socket.socket] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for c in self.accepted:
            c.close()


@contextlib.contextmanager
def stalling_tcp(cap: float = 120.0) -> Iterator[StallingTcp]:
    """Yield a StallingTcp on 127.0.0.1; connections are held (not read) until the block ends or `cap` s."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    st = StallingTcp(sock)
    until = time.monotonic() + cap

    def accept() -> None:
        while not st.stop.is_set() and time.monotonic() < until:
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            st.accepted.append(conn)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield st
    finally:
        st.close()
        t.join(5)
