"""Overlay build roots (chroot/overlay.py), as root with real mounts: the overlay exists only in the
building thread's own mount namespace, writes land in the upper layer, the lower layer (a cached stage)
is never written, and everything is gone once the thread leaves the namespace. No Portage needed."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import stage as test_stage

from chroot import builder, overlay
from chroot.mounts import mounts_under
from chroot.spec import BuildSpec, PortageSettings, Stage
from chroot.stage import extract_stage

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


class Onlooker:
    """A thread started before the build's namespace is made: it stays in the original namespace (as the
    host does) and says what it sees mounted under a path when asked."""

    def __init__(self) -> None:
        self._ask: queue.Queue[Path | None] = queue.Queue()
        self._answer: queue.Queue[list[str]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (path := self._ask.get()) is not None:
            self._answer.put(mounts_under(path))

    def mounts_under(self, path: Path) -> list[str]:
        self._ask.put(path)
        return self._answer.get(timeout=30)

    def stop(self) -> None:
        self._ask.put(None)
        self._thread.join()


def test_overlay_root_lives_in_the_thread_namespace_only(tmp_path: Path) -> None:
    lower = tmp_path / "stage"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc/make.conf").write_text("CFLAGS=-O2\n")
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    root = build_dir / "root"
    onlooker = Onlooker()
    with overlay.private_mount_namespace():
        overlay.mount_overlay(lower, build_dir, root)
        assert mounts_under(root) == [str(root)]  # this thread sees the overlay
        assert onlooker.mounts_under(tmp_path) == []  # the rest of the process (and the host) does not
        with open(root / "etc/make.conf", "a") as f:
            f.write('PKGDIR="/var/cache/binpkgs"\n')
        (root / "new").write_text("built\n")
        assert (root / "etc/make.conf").read_text() == 'CFLAGS=-O2\nPKGDIR="/var/cache/binpkgs"\n'
        overlay.unmount(root)
    assert mounts_under(tmp_path) == []
    onlooker.stop()
    assert (lower / "etc/make.conf").read_text() == "CFLAGS=-O2\n"  # the cached stage is untouched
    assert not (lower / "new").exists()
    assert (build_dir / "upper/new").read_text() == "built\n"  # the build's writes are in its own layer
    assert "PKGDIR" in (build_dir / "upper/etc/make.conf").read_text()


def test_leaving_the_namespace_drops_its_mounts(tmp_path: Path) -> None:
    """A build that never unmounts (an exception on the way out) leaves nothing mounted either."""
    lower = tmp_path / "stage"
    lower.mkdir()
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    onlooker = Onlooker()
    with pytest.raises(RuntimeError, match="boom"), overlay.private_mount_namespace():
        overlay.mount_overlay(lower, build_dir, build_dir / "root")
        raise RuntimeError("boom")
    assert mounts_under(tmp_path) == []
    assert onlooker.mounts_under(tmp_path) == []
    onlooker.stop()


def test_an_overlay_that_cannot_be_mounted_says_why(tmp_path: Path) -> None:
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    with overlay.private_mount_namespace():
        with pytest.raises(overlay.OverlayUnavailable, match="mount -t overlay"):
            overlay.mount_overlay(tmp_path / "no-such-stage", build_dir, build_dir / "root")
        with pytest.raises(overlay.OverlayUnavailable, match="cannot be passed"):
            overlay.mount_overlay(tmp_path, tmp_path / "odd,dir", tmp_path / "odd,dir" / "root")
    assert mounts_under(tmp_path) == []


@dataclass(frozen=True)
class DirTree:
    """A tree already in a directory (chroot.spec.TreeSource)."""

    name: str
    path: Path

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "url": "", "ref": "", "commit": ""}


@pytest.mark.portage
def test_overlay_unavailable_falls_back_to_extraction_and_says_so(tmp_path: Path) -> None:
    """The chroot library with the stand-in stage: when the overlay cannot be mounted (here: the unpacked
    stage it was handed is gone), the build extracts its stage instead, says so in build.log, records
    "extract" in build.json, and runs emerge as usual."""
    stage_file = test_stage.ensure_stage()
    tree = tmp_path / "gentoo"
    (tree / "profiles").mkdir(parents=True)
    (tree / "profiles/repo_name").write_text("gentoo\n")
    out = tmp_path / "out"
    out.mkdir()
    spec = BuildSpec(settings=PortageSettings(name="fallback", emerge_args=["--version"]), tag="2026-01-01",
                     commit="0" * 40, repo="test",
                     stage=Stage(stage_file, str(stage_file), None, unpacked=tmp_path / "vanished-stage"),
                     gentoo=DirTree("gentoo", tree), overlays=[], work_dir=tmp_path / "work", output=out,
                     build_id="2026-01-01.1", distfiles=tmp_path / "distfiles", stage4=False)
    result = builder.run_build(spec)
    log_text = (out / "build.log").read_text()
    assert result.ok, log_text[-3000:]
    assert "overlay root unavailable (mount -t overlay:" in log_text and "extracting the stage instead" in log_text
    assert "Portage" in log_text  # emerge --version ran in the extracted root
    man = json.loads((out / "build.json").read_text())
    assert man["root"]["method"] == "extract" and man["stage"]["sha256"]
    assert mounts_under(tmp_path) == [] and list((tmp_path / "work").iterdir()) == []


def test_a_stage_cannot_bring_overlayfs_attributes(tmp_path: Path) -> None:
    """A stage (a stage4 packed from an earlier build, say) with trusted.overlay.* attributes: they would
    steer the overlay it becomes the lower layer of (an opaque directory hides, a redirect moves), so the
    extraction drops them and keeps every other attribute."""
    src = tmp_path / "src"
    for d in ("usr", "etc"):
        (src / d).mkdir(parents=True)
    (src / "etc/f").write_text("x\n")
    os.setxattr(src / "etc", "trusted.overlay.opaque", b"y")
    os.setxattr(src / "etc/f", "user.keep", b"1")
    tarball = tmp_path / "stage.tar.xz"
    subprocess.run(["tar", "--xz", "--xattrs", "--xattrs-include=*", "-cf", str(tarball), "-C", str(src), "."],
                   check=True)
    extract_stage(tarball, tmp_path / "root")
    assert "trusted.overlay.opaque" not in os.listxattr(tmp_path / "root/etc")
    assert os.getxattr(tmp_path / "root/etc/f", "user.keep") == b"1"
