"""Fetching snapshot files from Gentoo mirrors over HTTP(S) (or file:// for a local mirror).

requests with timeouts and urllib3 retries (exponential backoff) for connections and 5xx answers;
downloads go to `<name>.part` in the cache directory and resume from there with a Range request when a
transfer breaks, and the size must match Content-Length. A 404 means "not on this mirror"; an HTML error
page, a short body or a connection reset is a failed download, never something to import.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import unquote, urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import ConnectionPool
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from snapshotter import __version__
from snapshotter.errors import FetchError

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class NotFound(FetchError):
    """The mirror answered that the file does not exist (404/410)."""


class Unreachable(FetchError):
    """The mirror could not be reached (refused, timed out, unknown host, retries exhausted)."""


Progress = Callable[[int, int | None], None]


class _ReportingRetry(Retry):
    """urllib3's Retry, saying one line of ours per retry (`URL: HTTP 503; retry 1 of 4`).

    urllib3's own "Retrying (Retry(total=3, ...))" warning is only shown with -vv (see logs.py).
    """

    def increment(self, method: str | None = None, url: str | None = None,
                  response: BaseHTTPResponse | None = None, error: Exception | None = None,
                  _pool: ConnectionPool | None = None, _stacktrace: TracebackType | None = None) -> Self:
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


class Downloader:
    def __init__(self, cache_dir: Path, timeout: float = 60.0, retries: int = 4, backoff: float = 1.0) -> None:
        self.cache_dir = cache_dir
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session = requests.Session()
        retry = _ReportingRetry(total=retries, connect=retries, read=retries, status=retries,
                                backoff_factor=backoff, status_forcelist=(429, 500, 502, 503, 504),
                                allowed_methods=("GET",), raise_on_status=False, respect_retry_after_header=True)
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = f"portage-snapshotter/{__version__}"

    def close(self) -> None:
        self.session.close()

    def fetch_small(self, url: str, limit: int = 1 << 16) -> bytes:
        """GET a small text file (.md5sum) into memory."""
        if url.startswith("file://"):
            return self._local(url).read_bytes()[:limit]
        resp = self._get(url, {})
        with resp:
            data = resp.raw.read(limit + 1, decode_content=True)
        if len(data) > limit:
            raise FetchError(f"{url}: larger than {limit} bytes, not what was asked for")
        return data

    def fetch(self, url: str, name: str, progress: Progress | None = None) -> Path:
        """Download `url` to `cache_dir/name`, resuming a `.part` left by an earlier try; return the path."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        dest = self.cache_dir / name
        part = dest.with_name(name + ".part")
        if url.startswith("file://"):
            shutil.copyfile(self._local(url), part)
            os.replace(part, dest)
            return dest
        for attempt in range(self.retries + 1):
            try:
                self._fetch_once(url, part, progress)
                os.replace(part, dest)
                return dest
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.Timeout) as e:
                if attempt == self.retries:
                    raise FetchError(f"{url}: {_reason(e)}") from None
                wait = self.backoff * 2 ** attempt
                log.warning("%s: %s; resuming in %.0f s", url, _reason(e), wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _fetch_once(self, url: str, part: Path, progress: Progress | None) -> None:
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        resp = self._get(url, headers)
        with resp:
            if resp.status_code == 416 and have:  # the part file is already complete (or bogus)
                if _range_total(resp.headers.get("Content-Range", "")) == have:
                    return
                part.unlink()
                raise requests.ConnectionError("range not satisfiable; restarting")
            if resp.status_code == 206 and have:
                start = _range_start(resp.headers.get("Content-Range", ""))
                if start != have:
                    raise FetchError(f"{url}: server resumed at byte {start}, not {have}")
                mode = "ab"
            else:
                have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            expected = int(length) if length is not None and length.isdigit() else None
            total = have + expected if expected is not None else None
            got = 0
            with open(part, mode) as out:
                for chunk in resp.iter_content(CHUNK):
                    out.write(chunk)
                    got += len(chunk)
                    if progress is not None:
                        progress(have + got, total)
                out.flush()
                os.fsync(out.fileno())
            if expected is not None and got != expected:
                raise requests.ConnectionError(f"short read: {got} of {expected} bytes")

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            resp = self.session.get(url, headers=headers, stream=True, timeout=self.timeout, allow_redirects=True)
        except (requests.exceptions.RetryError, requests.ConnectionError, requests.Timeout) as e:
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


def _reason(e: Exception) -> str:
    """A short human reason from a requests/urllib3 exception chain."""
    text = str(e)
    for key, nice in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                      ("Connection reset", "connection reset"), ("Name or service not known", "unknown host"),
                      ("Max retries exceeded", "gave up after retries"), ("short read", "short read"),
                      ("IncompleteRead", "connection closed early (incomplete read)"),
                      ("RemoteDisconnected", "connection closed by the server"),
                      ("Connection aborted", "connection aborted")):
        if key in text:
            return nice
    return text.splitlines()[0][:200] if text else type(e).__name__
