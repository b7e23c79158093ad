"""Network steps of a build have deadlines: an overlay server that accepts and never answers fails the
fetch (and so the build, and its job) instead of holding it forever; a drip-fed stage download too."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.faultserver import serve_faults, stalling_tcp

from snapshotter.config import Overlay
from snapshotter.download import DeadlineExceeded
from snapshotter.errors import SnapshotterError
from snapshotter.service.build import fetch_overlay, fetch_stage


@pytest.mark.parametrize("scheme", ["http", "git"])
def test_an_overlay_url_that_never_answers_fails_at_the_deadline(tmp_path: Path, scheme: str) -> None:
    with stalling_tcp() as stuck:
        url = f"{scheme}://127.0.0.1:{stuck.port}/overlay.git"
        with pytest.raises(SnapshotterError, match=r"overlay extra: fetching .* failed: git fetch timed out after 2 s"):
            fetch_overlay(Overlay("extra", url, "main"), tmp_path / "cache", timeout=2)
        assert stuck.accepted


def test_a_drip_fed_stage_download_fails_at_the_deadline(tmp_path: Path) -> None:
    srv = serve_faults(tmp_path / "mirror")
    try:
        (srv.root / "stages").mkdir()
        (srv.root / "stages" / "stage3.tar.xz").write_bytes(b"\0" * 100_000)
        srv.plan("/stages/stage3.tar.xz", "drip")
        with pytest.raises(DeadlineExceeded, match=r"sync.deadline \(2 s\)"):
            fetch_stage(f"{srv.url}/stages/stage3.tar.xz", tmp_path / "cache", None, timeout=5, retries=0,
                        deadline=2)
    finally:
        srv.close()
