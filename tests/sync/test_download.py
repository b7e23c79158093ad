"""snapshotter.download against a hostile or broken mirror (tests/helpers/faultserver.py on 127.0.0.1):
deadlines, size caps, partial files that belong to one mirror and one version, Content-Encoding."""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.faultserver import FaultServer, serve_faults

from snapshotter.download import DeadlineExceeded, Downloader, FetchError, TooLarge
from snapshotter.errors import LockedError

PATH = "/snapshots/gentoo-20261120.tar.xz"
NAME = "gentoo-20261120.tar.xz"


@pytest.fixture
def content() -> bytes:
    return os.urandom(300_000)


@pytest.fixture
def mirror(tmp_path: Path, content: bytes) -> Iterator[FaultServer]:
    srv = serve_faults(tmp_path / "mirror")
    (srv.root / "snapshots").mkdir()
    (srv.root / "snapshots" / NAME).write_bytes(content)
    yield srv
    srv.close()


@pytest.fixture
def second(tmp_path: Path, content: bytes) -> Iterator[FaultServer]:
    srv = serve_faults(tmp_path / "mirror2")
    (srv.root / "snapshots").mkdir()
    (srv.root / "snapshots" / NAME).write_bytes(content)
    yield srv
    srv.close()


def downloader(tmp_path: Path, **kw: object) -> Downloader:
    kw.setdefault("retries", 2)
    kw.setdefault("backoff", 0.05)
    return Downloader(tmp_path / "cache", **kw)  # type: ignore[arg-type]


def test_a_drip_feeding_mirror_is_cut_off_at_the_deadline(tmp_path: Path, mirror: FaultServer) -> None:
    """One byte a second never trips the 3 s read timeout; the overall deadline stops it (300 KB would
    otherwise take three days)."""
    mirror.plan(PATH, "drip")
    dl = downloader(tmp_path, timeout=3, deadline=3)
    with pytest.raises(DeadlineExceeded, match="not complete within the download deadline"):
        dl.fetch(mirror.url + PATH, NAME)
    dl.close()
    assert not (tmp_path / "cache" / NAME).exists()


def test_retry_after_a_day_does_not_outlive_the_deadline(tmp_path: Path, mirror: FaultServer) -> None:
    mirror.plan(PATH, "retry-after")
    dl = downloader(tmp_path, timeout=3, deadline=2, retries=3)
    with pytest.raises(FetchError):
        dl.fetch(mirror.url + PATH, NAME)
    dl.close()
    assert len(mirror.requests(PATH)) <= 2  # the day-long wait was cut short and not retried after


def test_a_server_that_never_answers_fails_at_the_deadline_below_the_timeout(tmp_path: Path,
                                                                            mirror: FaultServer) -> None:
    mirror.plan(PATH, "stall")
    dl = downloader(tmp_path, timeout=600, deadline=2, retries=0)
    with pytest.raises(DeadlineExceeded):
        dl.fetch(mirror.url + PATH, NAME)
    dl.close()


def test_an_endless_side_file_is_capped_and_nothing_large_is_left(tmp_path: Path, mirror: FaultServer) -> None:
    mirror.plan(PATH + ".gpgsig", "endless")
    (mirror.root / "snapshots" / (NAME + ".gpgsig")).write_bytes(b"x")
    dl = downloader(tmp_path, side_max=64 << 10, side_key="sync.max_side_file_size")
    with pytest.raises(TooLarge, match=r"sync\.max_side_file_size \(65536 bytes\)"):
        dl.fetch_side(mirror.url + PATH + ".gpgsig", NAME + ".gpgsig")
    with pytest.raises(TooLarge, match=r"sync\.max_side_file_size"):
        dl.fetch_small(mirror.url + PATH + ".gpgsig")
    dl.close()
    assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir()) < 1 << 20


def test_a_content_length_over_the_cap_is_refused_before_reading(tmp_path: Path, mirror: FaultServer) -> None:
    dl = downloader(tmp_path, max_size=100_000, size_key="sync.max_tarball_size")
    with pytest.raises(TooLarge, match=r"300000 bytes, larger than sync\.max_tarball_size \(100000 bytes\)"):
        dl.fetch(mirror.url + PATH, NAME)
    dl.close()
    assert not list((tmp_path / "cache").glob(NAME + "*"))


def test_an_endless_body_is_cut_at_the_cap(tmp_path: Path, mirror: FaultServer) -> None:
    mirror.plan(PATH, "endless")
    dl = downloader(tmp_path, max_size=1 << 20, size_key="sync.max_tarball_size")
    with pytest.raises(TooLarge, match=r"larger than sync\.max_tarball_size"):
        dl.fetch(mirror.url + PATH, NAME)
    dl.close()
    assert not list((tmp_path / "cache").glob(NAME + "*"))


def test_a_reset_transfer_resumes_with_range_and_if_range(tmp_path: Path, mirror: FaultServer,
                                                          content: bytes) -> None:
    mirror.plan(PATH, "reset", "ok")
    dl = downloader(tmp_path)
    got = dl.fetch(mirror.url + PATH, NAME)
    dl.close()
    assert got.read_bytes() == content
    second = mirror.requests(PATH)[1]
    start = int(second["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= len(content) // 2  # what arrived before the reset (some may be lost with it)
    assert second["If-Range"] == '"' + hashlib.md5(content).hexdigest() + '"'  # the server's ETag
    assert not list((tmp_path / "cache").glob("*.part*"))


def test_a_partial_from_a_garbage_mirror_is_never_resumed_from_another(tmp_path: Path, mirror: FaultServer,
                                                                      second: FaultServer, content: bytes) -> None:
    """Failover: mirror 1 sends garbage and resets (its partial stays, recorded as mirror 1's); mirror 2 is
    asked for the whole file, not for the rest after mirror 1's garbage."""
    mirror.plan(PATH, "garbage-reset")
    dl = downloader(tmp_path, retries=0)
    with pytest.raises(FetchError):
        dl.fetch(mirror.url + PATH, NAME)
    assert (tmp_path / "cache" / (NAME + ".part")).stat().st_size > 0
    got = dl.fetch(second.url + PATH, NAME)
    dl.close()
    assert got.read_bytes() == content
    assert "Range" not in second.requests(PATH)[0]


def test_a_partial_of_an_older_version_is_not_stitched_to_the_new_one(tmp_path: Path, mirror: FaultServer) -> None:
    """The file changed on the mirror between the break and the resume: If-Range makes the server send
    the whole new file (200), which replaces the partial."""
    mirror.plan(PATH, "reset", "ok")
    dl = downloader(tmp_path, retries=0)
    with pytest.raises(FetchError):
        dl.fetch(mirror.url + PATH, NAME)
    new = os.urandom(200_000)
    (mirror.root / "snapshots" / NAME).write_bytes(new)
    got = dl.fetch(mirror.url + PATH, NAME)
    dl.close()
    assert got.read_bytes() == new
    assert "If-Range" in mirror.requests(PATH)[1]


def test_a_partial_without_its_record_is_downloaded_afresh(tmp_path: Path, mirror: FaultServer,
                                                           content: bytes) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / (NAME + ".part")).write_bytes(b"planted bytes from nowhere")
    dl = downloader(tmp_path)
    assert dl.fetch(mirror.url + PATH, NAME).read_bytes() == content
    dl.close()
    assert "Range" not in mirror.requests(PATH)[0]


@pytest.mark.parametrize("fault", ["lie-long", "reset"])
def test_broken_lengths_resume_to_the_right_bytes(tmp_path: Path, mirror: FaultServer, content: bytes,
                                                  fault: str) -> None:
    mirror.plan(PATH, fault, "ok")
    dl = downloader(tmp_path)
    assert dl.fetch(mirror.url + PATH, NAME).read_bytes() == content
    dl.close()


def test_a_short_lie_is_caught_as_a_short_file(tmp_path: Path, mirror: FaultServer, content: bytes) -> None:
    """Content-Length 10 bytes short: we get what it announced, the md5 check (sync) catches the rest."""
    mirror.plan(PATH, "lie-short")
    dl = downloader(tmp_path)
    assert dl.fetch(mirror.url + PATH, NAME).read_bytes() == content[:-10]
    dl.close()


def test_gzip_content_encoding_is_decoded_and_counted_on_the_wire(tmp_path: Path, mirror: FaultServer) -> None:
    text = b"0123456789abcdef  gentoo-20261120.tar.xz\n" * 5000  # compresses well: lengths differ a lot
    (mirror.root / "snapshots" / NAME).write_bytes(text)
    mirror.plan(PATH, "gzip")
    dl = downloader(tmp_path)
    assert dl.fetch(mirror.url + PATH, NAME).read_bytes() == text
    assert dl.fetch_small(mirror.url + PATH, limit=1 << 20) == text
    dl.close()
    assert mirror.requests(PATH)[0]["Accept-Encoding"] == "identity"
    assert len(gzip.compress(text)) < len(text) // 10


def test_a_gzip_bomb_meets_the_cap_not_the_memory(tmp_path: Path, mirror: FaultServer) -> None:
    """256 MiB of zeros are 250 KB of gzip: decoded a piece at a time, cut off at the side file cap."""
    (mirror.root / "snapshots" / (NAME + ".md5sum")).write_bytes(bytes(256 << 20))
    mirror.plan(PATH + ".md5sum", "gzip")
    dl = downloader(tmp_path, side_key="sync.max_side_file_size")
    with pytest.raises(TooLarge, match="sync.max_side_file_size"):
        dl.fetch_small(mirror.url + PATH + ".md5sum")
    with pytest.raises(TooLarge, match="sync.max_side_file_size"):
        dl.fetch_side(mirror.url + PATH + ".md5sum", NAME + ".md5sum")
    dl.close()
    assert not list((tmp_path / "cache").glob(NAME + "*"))


@pytest.mark.parametrize("fault", ["chunked", "chunked-gzip"])
def test_chunked_transfers_without_a_length(tmp_path: Path, mirror: FaultServer, content: bytes, fault: str) -> None:
    mirror.plan(PATH, fault)
    dl = downloader(tmp_path)
    assert dl.fetch(mirror.url + PATH, NAME).read_bytes() == content
    assert dl.fetch_small(mirror.url + PATH, limit=1 << 20) == content
    dl.close()


def test_a_redirect_to_another_server_is_followed(tmp_path: Path, mirror: FaultServer, second: FaultServer,
                                                 content: bytes) -> None:
    mirror.redirect_to = second.url
    mirror.plan(PATH, "redirect")
    dl = downloader(tmp_path)
    assert dl.fetch(mirror.url + PATH, NAME).read_bytes() == content
    dl.close()
    assert len(second.requests(PATH)) == 1


def test_two_downloaders_never_share_a_cache(tmp_path: Path, mirror: FaultServer) -> None:
    """The first holds the cache until it closes; the second waits, up to its deadline, then says so."""
    first = downloader(tmp_path)
    first.fetch(mirror.url + PATH, NAME)
    other = downloader(tmp_path, deadline=1)
    with pytest.raises(LockedError, match="download cache"):
        other.fetch(mirror.url + PATH, "other-name")
    first.close()
    assert other.fetch(mirror.url + PATH, "other-name").is_file()
    other.close()


def test_concurrent_fetches_of_one_name_in_one_cache_never_mix(tmp_path: Path, mirror: FaultServer,
                                                              content: bytes) -> None:
    results: list[bytes | BaseException] = []

    def one() -> None:
        dl = downloader(tmp_path, deadline=60)
        try:
            got = dl.fetch(mirror.url + PATH, NAME)
            results.append(got.read_bytes())
            got.unlink()  # as a sync does after its import, still holding the cache
        except BaseException as e:  # handed to the test
            results.append(e)
        finally:
            dl.close()

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [content] * 6


def test_a_local_mirror_has_the_same_caps(tmp_path: Path, mirror: FaultServer, content: bytes) -> None:
    url = (mirror.root / "snapshots" / NAME).as_uri()
    dl = downloader(tmp_path, max_size=100_000, size_key="sync.max_tarball_size", side_max=1000,
                    side_key="sync.max_side_file_size")
    with pytest.raises(TooLarge, match=r"sync\.max_tarball_size \(100000 bytes\)"):
        dl.fetch(url, NAME)
    with pytest.raises(TooLarge, match=r"sync\.max_side_file_size \(1000 bytes\)"):
        dl.fetch_small(url)
    assert dl.fetch(url, NAME, max_size=len(content)).read_bytes() == content
    dl.close()
