"""Fetching snapshot files from Gentoo mirrors over HTTP(S) (or file:// for a local mirror).

requests with timeouts and urllib3 retries (exponential backoff) for connections and 5xx answers;
downloads go to `<name>.part` in the cache directory and resume from there with a Range request when a
transfer breaks, and the size must match Content-Length. A 404 means "not on this mirror"; an HTML error
page, a short body or a connection reset is a failed download, never something to import.

Every download is bounded (docs/security.md, "Limits and deadlines"):
- in time: one overall deadline per file (`deadline`, sync.deadline) covers the connection, every retry
  and backoff (a server's Retry-After included) and every byte; a mirror that drips a byte a second is cut
  off when it passes (a watchdog shuts the socket down, so no read outlives it) with DeadlineExceeded;
- in size: `max_size` for a file (sync.max_tarball_size), `side_max` for a side file (.md5sum, .gpgsig:
  sync.max_side_file_size); a larger Content-Length is refused before reading, a body that grows past the
  cap is cut off; the errors name the key.

Bytes are counted as they come over the wire: Content-Length is compared with what the server sent, not
with what a `Content-Encoding` decoded to. We ask for `Accept-Encoding: identity`; a server that
compresses anyway (gzip, deflate) is decoded, and that body is not resumed.

A partial file belongs to the mirror URL and the validator (strong ETag or Last-Modified, and the size) it
came from, recorded next to it in `<name>.part.json`. It is resumed only from the same URL with
`If-Range`, so a changed file or another mirror starts afresh (failover never stitches two mirrors'
bytes). A Downloader holds the cache directory's lock (`.snapshotter-downloads.lock`) from its first
download until `close()`: two processes sharing a cache never share a partial or a finished file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self
from urllib.parse import unquote, urlparse

import requests
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import ConnectionPool
from urllib3.exceptions import MaxRetryError
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from snapshotter import __version__
from snapshotter.errors import FetchError
from snapshotter.fsutil import atomic_write
from snapshotter.lock import flocked

log = logging.getLogger(__name__)

CHUNK = 1 << 20
DEFAULT_DEADLINE = 1800.0  # seconds for one file, retries included (sync.deadline)
DEFAULT_MAX_SIZE = 4 << 30  # bytes; a stage or a snapshot tarball (sync.max_tarball_size is lower)
DEFAULT_SIDE_MAX = 64 << 10  # bytes; .md5sum, .gpgsig (sync.max_side_file_size)
LOCK_NAME = ".snapshotter-downloads.lock"


class NotFound(FetchError):
    """The mirror answered that the file does not exist (404/410)."""


class Unreachable(FetchError):
    """The mirror could not be reached (refused, timed out, unknown host, retries exhausted)."""


class DeadlineExceeded(Unreachable):
    """The download did not complete within its overall deadline (a stuck or drip-feeding server)."""


class TooLarge(FetchError):
    """The file is larger than its configured cap."""


class _Broken(Exception):
    """A transfer that broke half-way: worth a retry (resuming where the partial file allows)."""


Progress = Callable[[int, int | None], None]


class _Clock:
    """The deadline of the download in progress (monotonic), shared with the retry policy."""

    def __init__(self) -> None:
        self.until: float | None = None

    def remaining(self) -> float:
        return float("inf") if self.until is None else self.until - time.monotonic()


class _ReportingRetry(Retry):
    """urllib3's Retry, saying one line of ours per retry (`URL: HTTP 503; retry 1 of 4`), and stopping
    at the download's deadline: no retry starts after it, no backoff or Retry-After sleeps past it.

    urllib3's own "Retrying (Retry(total=3, ...))" warning is only shown with -vv (see logs.py).
    """

    clock: _Clock | None = None

    def new(self, **kw: Any) -> Self:
        new = super().new(**kw)
        new.clock = self.clock
        return new

    def _left(self) -> float:
        return max(0.0, self.clock.remaining()) if self.clock is not None else float("inf")

    def get_backoff_time(self) -> float:
        return min(super().get_backoff_time(), self._left())

    def get_retry_after(self, response: BaseHTTPResponse) -> float | None:
        after = super().get_retry_after(response)
        return None if after is None else min(after, self._left())

    def increment(self, method: str | None = None, url: str | None = None,
                  response: BaseHTTPResponse | None = None, error: Exception | None = None,
                  _pool: ConnectionPool | None = None, _stacktrace: TracebackType | None = None) -> Self:
        if self.clock is not None and self.clock.remaining() <= 0:
            raise MaxRetryError(_pool, url or "", error or urllib3.exceptions.ResponseError("deadline passed"))  # type: ignore[arg-type]
        new = super().increment(method, url, response, error, _pool, _stacktrace)  # raises when exhausted
        if error is None and (response is None or response.get_redirect_location()):
            return new
        where = url or "?"
        if _pool is not None:
            port = f":{_pool.port}" if _pool.port else ""
            where = f"{_pool.scheme}://{_pool.host}{port}{url or ''}"
        why = _reason(error) if error is not None else f"HTTP {response.status if response else '?'}"
        attempt = len(new.history)
        total = new.total
        limit = f" of {attempt + total}" if isinstance(total, int) and not isinstance(total, bool) else ""
        wait = new.get_backoff_time()
        if response is not None and self.respect_retry_after_header:
            wait = new.get_retry_after(response) or wait
        log.warning("%s: %s; retry %d%s%s", where, why, attempt, limit, f" in {wait:.0f} s" if wait >= 1 else "")
        return new


def _lookup(host: str, port: int, timeout: float | None) -> list[str]:
    """The addresses of `host`, from a name lookup given at most `timeout` seconds.

    getaddrinfo(3) blocks for as long as the resolver's own timeouts say (5 s per try and name server by
    default, and urllib3 retries it), and no socket timeout or watchdog reaches it. It runs in a daemon
    thread here; when it has not answered in time the connection fails at once (TimeoutError), and the
    thread is left to end with the resolver's timeout."""
    answer: dict[str, Any] = {}

    def run() -> None:
        try:
            answer["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            answer["error"] = e

    t = threading.Thread(target=run, name=f"lookup {host}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"DNS lookup of {host} did not answer within {timeout:.0f} s")
    if "error" in answer:
        raise answer["error"]
    return list(dict.fromkeys(info[4][0] for info in answer["infos"]))


class _BoundedLookup:
    """A connection whose name lookup is bounded by its connect timeout (`_lookup`): it then connects to
    each address in turn, while TLS still checks the certificate against the host name."""

    def _new_conn(self) -> socket.socket:
        conn: Any = self
        host = conn._dns_host
        timeout = conn.timeout if isinstance(conn.timeout, int | float) else None
        try:
            addresses = _lookup(host, conn.port, timeout)
        except socket.gaierror as e:
            raise urllib3.exceptions.NameResolutionError(conn.host, conn, e) from e
        except TimeoutError as e:
            raise urllib3.exceptions.ConnectTimeoutError(conn, str(e)) from e
        last: BaseException | None = None
        for address in addresses:
            conn._dns_host = address
            try:
                sock: socket.socket = super()._new_conn()  # type: ignore[misc]
                return sock
            except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError) as e:
                last = e
            finally:
                conn._dns_host = host
        assert last is not None
        raise last


class _HTTPConnection(_BoundedLookup, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_BoundedLookup, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _BoundedLookupAdapter(HTTPAdapter):
    """requests' adapter with connections whose name lookup cannot outlive the connect timeout."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class Downloader:
    """Downloads into `cache_dir`, each file within `deadline` seconds and `max_size` bytes (see the module doc).

    `timeout` bounds each connect and each read; `retries` the attempts per request and per file.
    """

    def __init__(self, cache_dir: Path, timeout: float = 60.0, retries: int = 4, backoff: float = 1.0, *,
                 deadline: float = DEFAULT_DEADLINE, max_size: int = DEFAULT_MAX_SIZE,
                 side_max: int = DEFAULT_SIDE_MAX, size_key: str = "the download size limit",
                 side_key: str = "the side file size limit", deadline_key: str = "the download deadline") -> None:
        self.cache_dir = cache_dir
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.deadline = deadline
        self.max_size, self.size_key = max_size, size_key
        self.side_max, self.side_key = side_max, side_key
        self.deadline_key = deadline_key
        self._clock = _Clock()
        self._locks = contextlib.ExitStack()
        self._locked = False
        self.session = requests.Session()
        retry = _ReportingRetry(total=retries, connect=retries, read=retries, status=retries,
                                backoff_factor=backoff, status_forcelist=(429, 500, 502, 503, 504),
                                allowed_methods=("GET",), raise_on_status=False, respect_retry_after_header=True)
        retry.clock = self._clock
        adapter = _BoundedLookupAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = f"portage-snapshotter/{__version__}"
        # Bytes as the server has them: Content-Length then counts what we read (see _Body for servers
        # that compress anyway).
        self.session.headers["Accept-Encoding"] = "identity"

    @classmethod
    def for_sync(cls, sync: Any) -> Downloader:
        """A Downloader with the limits of the [sync] section (config.SyncSettings)."""
        return cls(sync.cache_dir, sync.timeout, sync.retries, deadline=sync.deadline,
                   max_size=sync.max_tarball_size, side_max=sync.max_side_file_size,
                   size_key="sync.max_tarball_size", side_key="sync.max_side_file_size",
                   deadline_key="sync.deadline")

    def close(self) -> None:
        self.session.close()
        self._locks.close()
        self._locked = False

    # -- public -------------------------------------------------------------------------------------------

    def fetch_small(self, url: str, limit: int | None = None) -> bytes:
        """GET a small text file (.md5sum) into memory, at most `limit` bytes (default: the side file cap)."""
        limit, key = (self.side_max, self.side_key) if limit is None else (limit, f"{limit} bytes")
        if url.startswith("file://"):
            path = self._local(url)
            if path.stat().st_size > limit:
                raise TooLarge(f"{url}: larger than {key} ({limit} bytes)")
            return path.read_bytes()
        self._clock.until = time.monotonic() + self.deadline
        try:
            for attempt in range(self.retries + 1):
                out = bytearray()
                try:
                    resp = self._get(url, {})
                    with resp:
                        body = _Body(resp, self._clock)
                        for chunk in body.chunks():
                            out += chunk
                            if len(out) > limit:
                                raise TooLarge(f"{url}: larger than {key} ({limit} bytes)")
                        body.check_length()
                    return bytes(out)
                except _Broken as e:
                    self._after_break(url, e, attempt, "retry")
            raise AssertionError("unreachable")
        finally:
            self._clock.until = None

    def fetch_side(self, url: str, name: str) -> Path:
        """`fetch` of a side file (.gpgsig): capped at the side file limit."""
        return self.fetch(url, name, max_size=self.side_max, size_key=self.side_key)

    def fetch(self, url: str, name: str, progress: Progress | None = None, *, max_size: int | None = None,
              size_key: str | None = None) -> Path:
        """Download `url` to `cache_dir/name` within the deadline and `max_size` (default: the Downloader's);
        resume a `.part` that an earlier try left from the same URL and validator; return the path."""
        cap, key = (self.max_size, self.size_key) if max_size is None else (max_size, size_key or f"{max_size} bytes")
        self._lock_cache()
        dest = self.cache_dir / name
        part = dest.with_name(name + ".part")
        if url.startswith("file://"):
            src = self._local(url)
            if src.stat().st_size > cap:
                raise TooLarge(f"{url}: larger than {key} ({cap} bytes)")
            try:
                with open(src, "rb") as fin, _open_new(part) as fout:
                    while chunk := fin.read(CHUNK):
                        fout.write(chunk)
                        if fout.tell() > cap:  # it grew since the check
                            raise TooLarge(f"{url}: larger than {key} ({cap} bytes)")
            except BaseException:
                _discard(part)
                raise
            os.replace(part, dest)
            return dest
        self._clock.until = time.monotonic() + self.deadline
        try:
            for attempt in range(self.retries + 1):
                try:
                    self._fetch_once(url, part, progress, cap, key)
                    os.replace(part, dest)
                    _meta_path(part).unlink(missing_ok=True)
                    return dest
                except _Broken as e:
                    self._after_break(url, e, attempt, "resuming")
                except TooLarge:
                    _discard(part)
                    raise
            raise AssertionError("unreachable")
        finally:
            self._clock.until = None

    # -- internals ----------------------------------------------------------------------------------------

    def _lock_cache(self) -> None:
        """Take the cache directory's lock for this Downloader's lifetime (waiting up to the deadline)."""
        if self._locked:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._locks.enter_context(flocked(self.cache_dir / LOCK_NAME, f"download cache {self.cache_dir}",
                                          wait=self.deadline))
        self._locked = True

    def _after_break(self, url: str, e: _Broken, attempt: int, what: str) -> None:
        """After a broken transfer: give up (retries or deadline spent) or wait the backoff."""
        left = self._clock.remaining()
        if left <= 0:
            raise self._late(url) from None
        if attempt == self.retries:
            raise FetchError(f"{url}: {_reason(e)}") from None
        wait = min(self.backoff * 2 ** attempt, left)
        log.warning("%s: %s; %s in %.0f s", url, _reason(e), what, wait)
        time.sleep(wait)
        if self._clock.remaining() <= 0:
            raise self._late(url) from None

    def _late(self, url: str) -> DeadlineExceeded:
        return DeadlineExceeded(f"{url}: not complete within {self.deadline_key} ({self.deadline:.0f} s); "
                                "the server is too slow or stuck")

    def _fetch_once(self, url: str, part: Path, progress: Progress | None, cap: int, key: str) -> None:
        have, meta = _partial(part, url)
        headers: dict[str, str] = {}
        if have:
            headers["Range"] = f"bytes={have}-"
            headers["If-Range"] = meta["validator"]
        resp = self._get(url, headers)
        with resp:
            validator = _validator(resp)
            if resp.status_code == 416 and have:  # the part file is already complete (or bogus)
                if _range_total(resp.headers.get("Content-Range", "")) == have == meta.get("size"):
                    return
                _discard(part)
                raise _Broken("range not satisfiable; restarting")
            if resp.status_code == 206 and have:
                start = _range_start(resp.headers.get("Content-Range", ""))
                if start != have or (validator is not None and validator != meta["validator"]):
                    _discard(part)
                    raise _Broken(f"server resumed at byte {start} of another version; restarting")
                mode = "ab"
            else:
                have, mode = 0, "wb"
            body = _Body(resp, self._clock)
            expected = body.length
            total = have + expected if expected is not None and not body.encoded else None
            if total is not None and total > cap:
                raise TooLarge(f"{url}: {total} bytes, larger than {key} ({cap} bytes)")
            if mode == "wb":
                _discard(part)
                if validator is not None and not body.encoded and total is not None:
                    # This partial belongs to this URL and this version of the file (see the module doc).
                    atomic_write(_meta_path(part), json.dumps(
                        {"url": url, "validator": validator, "size": total}).encode(), durable=False)
            written = have
            if body.encoded and mode == "ab":  # a compressed answer to a Range request: start afresh
                _discard(part)
                raise _Broken("the server compressed a resumed transfer; restarting")
            with _open_new(part) if mode == "wb" else _open_append(part) as out:
                try:
                    for chunk in body.chunks():
                        written += len(chunk)
                        if written > cap:
                            raise TooLarge(f"{url}: larger than {key} ({cap} bytes)")
                        out.write(chunk)
                        if progress is not None:
                            progress(written, total)
                finally:
                    out.flush()
                    os.fsync(out.fileno())
            if body.encoded:  # a decoded body cannot be resumed: a break starts afresh
                try:
                    body.check_length()
                except _Broken:
                    _discard(part)
                    raise
            else:
                body.check_length()

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        left = self._clock.remaining()
        if left <= 0:
            raise self._late(url)
        wait = min(self.timeout, left)
        try:
            resp = self.session.get(url, headers=headers, stream=True, timeout=(wait, wait), allow_redirects=True)
        except (requests.exceptions.RetryError, requests.ConnectionError, requests.Timeout) as e:
            if self._clock.remaining() <= 0:
                raise self._late(url) from None
            raise Unreachable(f"{url}: {_reason(e)}") from None
        except requests.RequestException as e:
            raise FetchError(f"{url}: {e}") from None
        if resp.status_code in (404, 410):
            resp.close()
            raise NotFound(f"{url}: not found ({resp.status_code})")
        if resp.status_code >= 400 and resp.status_code != 416:
            resp.close()
            raise FetchError(f"{url}: HTTP {resp.status_code} {resp.reason}")
        ctype = resp.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
            resp.close()
            raise FetchError(f"{url}: the server sent an HTML page ({ctype}), not the file")
        return resp

    @staticmethod
    def _local(url: str) -> Path:
        path = Path(unquote(urlparse(url).path))
        if not path.is_file():
            raise NotFound(f"{url}: not found")
        return path


class _Body:
    """A response body read as raw bytes off the wire, within the clock's deadline.

    `chunks()` yields the content (decoded when the server used a Content-Encoding anyway); `length` is
    the Content-Length, compared by `check_length()` with the raw bytes read. A watchdog shuts the socket
    down when the deadline passes, so that no blocking read outlives it.
    """

    def __init__(self, resp: requests.Response, clock: _Clock) -> None:
        self.resp, self.clock = resp, clock
        enc = resp.headers.get("Content-Encoding", "").strip().lower()
        self.encoded = enc not in ("", "identity")
        self._decoder: Any = None
        if enc in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS)
        elif self.encoded:
            raise FetchError(f"{resp.url}: unsupported Content-Encoding {enc!r}")
        length = resp.headers.get("Content-Length")
        self.length = int(length) if length is not None and length.isdigit() else None
        self.raw_bytes = 0

    def chunks(self) -> Any:
        raw = self.resp.raw
        raw.enforce_content_length = False  # we compare ourselves, on raw bytes, and resume
        left = self.clock.remaining()
        if left <= 0:
            raise _Broken("timed out")
        watchdog = threading.Timer(left, _shutdown, (raw,))
        watchdog.daemon = True
        watchdog.start()
        try:
            while True:
                if self.clock.remaining() <= 0:
                    raise _Broken("timed out")
                try:
                    chunk = raw.read1(CHUNK, decode_content=False)
                except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                    raise _Broken(str(e) or type(e).__name__) from None
                if not chunk:
                    break
                self.raw_bytes += len(chunk)
                if self._decoder is None:
                    yield chunk
                    continue
                while chunk:  # at most CHUNK decoded bytes at a time: a gzip bomb meets the caps, not the memory
                    try:
                        out = self._decoder.decompress(chunk, CHUNK)
                    except zlib.error as e:
                        raise FetchError(f"{self.resp.url}: bad {self.resp.headers.get('Content-Encoding')} "
                                         f"body ({e})") from None
                    chunk = self._decoder.unconsumed_tail
                    if out:
                        yield out
            if self.clock.remaining() <= 0:
                raise _Broken("timed out")
            if self._decoder is not None:
                tail = self._decoder.flush()
                if not self._decoder.eof and self.length is not None and self.raw_bytes >= self.length:
                    raise FetchError(f"{self.resp.url}: truncated {self.resp.headers.get('Content-Encoding')} body")
                if tail:
                    yield tail
        finally:
            watchdog.cancel()

    def check_length(self) -> None:
        if self.length is not None and self.raw_bytes != self.length:
            raise _Broken(f"short read: {self.raw_bytes} of {self.length} bytes")


def _shutdown(raw: Any) -> None:
    """The watchdog: wake a read blocked past the deadline by shutting the connection's socket down."""
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is None:
        sock = getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.shutdown(socket.SHUT_RDWR)


def _validator(resp: requests.Response) -> str | None:
    """What identifies this version of the file for If-Range: a strong ETag, else Last-Modified."""
    etag = resp.headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified", "").strip() or None


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _partial(part: Path, url: str) -> tuple[int, dict[str, Any]]:
    """(bytes to resume from, the partial's record) — (0, {}) unless `part` came from `url` with a validator."""
    try:
        meta = json.loads(_meta_path(part).read_bytes())
        have = os.lstat(part).st_size
        ok = (isinstance(meta, dict) and meta.get("url") == url and isinstance(meta.get("validator"), str)
              and isinstance(meta.get("size"), int) and 0 < have <= meta["size"])
    except (OSError, ValueError):
        ok = False
    if not ok:
        _discard(part)
        return 0, {}
    return have, meta


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)


def _open_new(path: Path) -> BinaryIO:
    """`path` created afresh for writing, never through a symlink planted under its name."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "wb")


def _open_append(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    return os.fdopen(fd, "ab")


def _range_start(content_range: str) -> int:
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _range_total(content_range: str) -> int:
    try:
        return int(content_range.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return -1


def _reason(e: BaseException) -> str:
    """A short human reason from a requests/urllib3 exception chain."""
    text = str(e)
    dns = re.search(r"DNS lookup of \S+ did not answer within [0-9.]+ s", text)
    if dns:
        return dns[0]
    for key, nice in (("CERTIFICATE_VERIFY_FAILED", "TLS: the server's certificate was not accepted (certificate "
                                                     "verify failed)"),
                      ("SSLError", "TLS handshake failed"),
                      ("Connection refused", "connection refused"), ("timed out", "timed out"),
                      ("Connection reset", "connection reset"), ("Name or service not known", "unknown host"),
                      ("Max retries exceeded", "gave up after retries"), ("short read", "short read"),
                      ("IncompleteRead", "connection closed early (incomplete read)"),
                      ("RemoteDisconnected", "connection closed by the server"),
                      ("Connection aborted", "connection aborted")):
        if key in text:
            return nice
    return text.splitlines()[0][:200] if text else type(e).__name__
