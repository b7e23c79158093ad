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
        for conn in stuck.accepted:  # git and its helper (git-remote-http) were killed: the peer is gone
            conn.settimeout(30)
            try:
                while conn.recv(65536):
                    pass
            except ConnectionResetError:
                pass


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


def test_snapshotter_build_with_a_stuck_overlay_fails_in_one_line(tmp_path: Path) -> None:
    """What a worker's build child runs: the build ends (so its job is completed as failed, not leased
    forever) with one line, and nothing is built."""
    from helpers import ebuild_repo, testlib

    ebuild_repo.git_repo_with_tags(tmp_path / "mirror.git", [("2026-01-01", ebuild_repo.tree_files())])
    (tmp_path / "stage3.tar.xz").write_bytes(b"never reached")
    with stalling_tcp() as stuck:
        cfg = tmp_path / "snapshotter.toml"
        cfg.write_text(f'repo = "mirror.git"\n[sync]\ndeadline = 2\n'
                       f'[build]\nwork_dir = "work"\noutput = "out"\ncache_dir = "cache"\n'
                       f'[profiles.p]\nstage = "stage3.tar.xz"\n'
                       f'overlays = [{{ name = "extra", url = "http://127.0.0.1:{stuck.port}/o.git", ref = "v1" }}]\n')
        r = testlib.run_cli("--config", str(cfg), "build", "--profile", "p", timeout=60)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("snapshotter: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "overlay extra: fetching" in errors[0] and "timed out after 2 s" in errors[0]
    assert not (tmp_path / "out" / "p").exists() or not list((tmp_path / "out" / "p").iterdir())
