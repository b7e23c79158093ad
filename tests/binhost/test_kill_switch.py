"""kill -9 during a promotion leaves the edition at the old build or the new one, never broken: the real
`snapshotter promote` stops itself at each step of the switch (SNAPSHOTTER_TEST_STOP_AT) and is killed
there; the document root must then resolve to a complete root whose edition.json verifies, and the next
promotion must finish the job (stale directories and links cleaned, the history line written once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import binhostlib, testlib

from snapshotter.binhost import history, retention
from snapshotter.service import delivery

STEPS = ["publishable-made", "root-made", "root-signed", "link-made", "switched"]


def wait_stopped(proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"promote exited ({proc.returncode}) before stopping: {proc.stderr.read()}")
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.02)
    raise AssertionError("promote never reached its stop point")


def check_consistent(site: binhostlib.Site, old: str, new: str, tmp_path: Path) -> str:
    root = site.web_root / "production" / "basic"
    assert root.is_symlink()
    real = root.resolve()
    assert real.parent == site.web_root / ".snapshotter" / "roots" / "basic"
    ed = json.loads((root / "edition.json").read_text())
    home = tmp_path / f"verify-{os.urandom(4).hex()}"
    proc = binhostlib.gpg_verify(site.key, root / "edition.json", root / "edition.json.asc", home)
    assert proc.returncode == 0 and "[GNUPG:] GOODSIG" in proc.stdout
    assert ed["build"] in (old, new)
    served = root / ed["path"]
    for rel, sha in ed["files"].items():
        assert binhostlib.sha256(served / rel) == sha
    return ed["build"]


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_during_a_promotion(step: str, tmp_path: Path, gpg_key: testlib.Key) -> None:
    site = binhostlib.make_site(tmp_path / "site", gpg_key)
    b10, b11 = site.build("2026-01-10"), site.build("2026-01-11")
    delivery.promote(site.cfg, "basic", "production", build_id=b10.id)
    if step != "publishable-made":
        delivery.make_publishable(site.cfg, b11)
    env = {**os.environ, "SNAPSHOTTER_TEST_STOP_AT": step}
    env.pop("SNAPSHOTTER_CONFIG", None)
    proc = subprocess.Popen(["snapshotter", "--config", str(site.config_path), "promote", "basic", "--to",
                             "production", "--build", b11.id], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    at = check_consistent(site, b10.id, b11.id, tmp_path)
    assert at == (b11.id if step == "switched" else b10.id)
    hist = site.web_root / ".snapshotter" / "history.jsonl"
    assert [e.to_build for e in history.read(hist) if e.edition == "production"] == [b10.id]
    # The next promotion finishes the job; a purge removes what the killed one left.
    r = site.cli("promote", "basic", "--to", "production", "--build", b11.id)
    assert r.returncode == 0, r.stderr
    assert check_consistent(site, b10.id, b11.id, tmp_path) == b11.id
    assert [e.to_build for e in history.read(hist) if e.edition == "production"] == [b10.id, b11.id]
    assert not [p for p in (site.web_root / "production").iterdir() if p.name != "basic"]  # no temporary link
    assert not list((site.web_root / ".snapshotter" / "builds" / "basic").glob(".*partial*"))
    report = retention.purge(site.cfg)
    used = {os.path.basename(os.readlink(site.web_root / e / "basic")) for e in ("testing", "production")
            if (site.web_root / e / "basic").is_symlink()}
    assert sorted(os.listdir(site.web_root / ".snapshotter" / "roots" / "basic")) == sorted(used)
    assert not report.removed  # both builds are needed (current and previous of production)
