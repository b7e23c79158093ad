"""lock.flocked: exclusive and shared kernel locks, and a lock file removed while someone waits for it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from snapshotter.errors import LockedError
from snapshotter.lock import flocked


def test_shared_holders_coexist_and_exclude_an_exclusive_one(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with flocked(lock, "test", shared=True), flocked(lock, "test", shared=True):
        with pytest.raises(LockedError, match="test is locked by another process"), flocked(lock, "test"):
            pass
    with flocked(lock, "test"):  # all shared holders gone
        with pytest.raises(LockedError), flocked(lock, "test", shared=True):
            pass


def test_shared_holders_do_not_write_their_pid(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text("")
    os.utime(lock, (1000, 1000))
    with flocked(lock, "test", shared=True):
        assert lock.read_text() == "" and lock.stat().st_mtime == 1000
    with flocked(lock, "test"):
        assert lock.read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("shared", [False, True])
def test_waiter_relocks_a_lock_file_removed_meanwhile(tmp_path: Path, shared: bool) -> None:
    """The holder removes the lock file before releasing it (the tree cache does when it removes a tree):
    the waiter then locks the file the name names now, not the removed one nobody else would see."""
    lock = tmp_path / "x.lock"
    seen: list[bool] = []
    started = threading.Event()

    def waiter() -> None:
        started.set()
        with flocked(lock, "test", wait=30, shared=shared):
            seen.append(lock.exists())
            # and it is the real lock: nobody else gets the name now
            try:
                with flocked(lock, "test"):
                    seen.append(False)
            except LockedError:
                seen.append(True)

    with flocked(lock, "test"):
        t = threading.Thread(target=waiter)
        t.start()
        started.wait()
        time.sleep(0.3)  # the waiter opened the old file and is polling it
        lock.unlink()
    t.join(timeout=30)
    assert seen == [True, True]
