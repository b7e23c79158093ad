"""fsutil.atomic_write, the one write-temp-then-rename: content, mode, no temporary left behind, never
through a planted symlink, and the old file kept when anything fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapshotter import fsutil


def test_replaces_the_file_with_the_exact_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    old_umask = os.umask(0o077)
    try:
        fsutil.atomic_write(target, b"new", durable=True)
        assert target.read_bytes() == b"new"
        assert target.stat().st_mode & 0o7777 == 0o644  # the umask does not narrow it
        fsutil.atomic_write(target, b"hook", mode=0o755, durable=False)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"hook"
    assert target.stat().st_mode & 0o7777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_symlink_planted_at_the_temporary_name_is_not_followed(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    target = tmp_path / "tree.cache"
    planted = tmp_path / ".tree.cache.tmp.planted"
    planted.symlink_to(victim)
    names = iter([planted, tmp_path / ".tree.cache.tmp.fresh"])
    monkeypatch.setattr(fsutil, "temp_name", lambda path: next(names))  # the attacker guessed the first name
    fsutil.atomic_write(target, b"data", durable=False)
    assert target.read_bytes() == b"data"
    assert victim.read_text() == "untouched"
    assert planted.is_symlink()  # skipped, not written through nor replaced


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "published"
    target.mkdir()
    (target / "inside").write_text("x")  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        fsutil.atomic_write(target, b"data", durable=True)
    assert (target / "inside").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["published"]


def test_temporary_names_are_recognised_for_cleaning_up(tmp_path: Path) -> None:
    fd, tmp = fsutil.create_temp(tmp_path / "gentoo-20260111.tar.xz")
    os.close(fd)
    assert fsutil.is_temp(tmp.name) and tmp.parent == tmp_path
    assert not fsutil.is_temp("gentoo-20260111.tar.xz")
