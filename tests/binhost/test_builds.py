"""Build ids: allocation by mkdir (unique, also across processes, never reused), reading build.json,
listing in (tag, N) order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import binhostlib

from snapshotter.binhost import builds
from snapshotter.errors import SnapshotterError

COMMIT = "a" * 40


def test_two_allocations_of_one_tag_differ(tmp_path: Path) -> None:
    a = builds.allocate(tmp_path, "basic", "2026-01-10")
    b = builds.allocate(tmp_path, "basic", "2026-01-10")
    c = builds.allocate(tmp_path, "basic", "2026-01-11")
    assert (a[0], b[0], c[0]) == ("2026-01-10.1", "2026-01-10.2", "2026-01-11.1")
    assert a[1] == tmp_path / "basic" / "2026-01-10.1" and a[1].is_dir() and not any(a[1].iterdir())


def test_concurrent_processes_never_share_an_id(tmp_path: Path) -> None:
    code = ("import sys\nfrom pathlib import Path\nfrom snapshotter.binhost import builds\n"
            "for _ in range(10):\n    print(builds.allocate(Path(sys.argv[1]), 'basic', '2026-01-10')[0], flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    ids = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        ids += out.split()
    assert len(ids) == 60
    assert len(set(ids)) == 60
    assert sorted(int(i.rsplit(".", 1)[1]) for i in ids) == list(range(1, 61))


def test_an_id_is_never_handed_out_again_after_a_purge(tmp_path: Path) -> None:
    build_id, path = builds.allocate(tmp_path, "basic", "2026-01-10")
    builds.tombstone(tmp_path, "basic", build_id)
    path.rmdir()
    assert builds.allocate(tmp_path, "basic", "2026-01-10")[0] == "2026-01-10.2"


@pytest.mark.parametrize("profile,tag", [("../x", "2026-01-10"), ("basic", "2026-13-45"), ("basic", "latest"),
                                         ("basic", "2026-01-10/..")])
def test_allocate_refuses_bad_names(tmp_path: Path, profile: str, tag: str) -> None:
    with pytest.raises(SnapshotterError):
        builds.allocate(tmp_path, profile, tag)
    assert not any(tmp_path.rglob("*"))


def test_states_and_listing_order(tmp_path: Path) -> None:
    out = tmp_path / "output"
    b2 = binhostlib.write_build(out, "basic", "2026-01-11", COMMIT)
    b1 = binhostlib.write_build(out, "basic", "2026-01-10", COMMIT, ok=False)
    b3 = binhostlib.write_build(out, "basic", "2026-01-10", COMMIT,
                                overlays=[{"name": "company", "url": "u", "ref": "r", "commit": "c" * 40}])
    incomplete = builds.allocate(out, "basic", "2026-01-12")[1]
    invalid = builds.allocate(out, "basic", "2026-01-12")[1]
    (invalid / "build.json").write_text("{not json")
    other = binhostlib.write_build(out, "other", "2026-01-09", COMMIT)
    # What is not a build: the builder's tag-named directories before ids, its staging directories.
    for legacy in ("2026-01-10", "2026-01-10.failed", ".2026-01-12.partial-99"):
        (out / "basic" / legacy).mkdir()
    listed = builds.list_builds(out, "basic")
    assert [(b.id, b.state) for b in listed] == [
        ("2026-01-10.1", "failed"), ("2026-01-10.2", "ok"), ("2026-01-11.1", "ok"),
        ("2026-01-12.1", "incomplete"), ("2026-01-12.2", "invalid")]
    assert listed[1].overlays == (("company", "c" * 40),) and listed[1].describe_overlays() == "company@cccccccccccc"
    assert (b1.state, b2.state, b3.state) == ("failed", "ok", "ok")
    assert b2.packages == 2 and b2.size == sum(p.stat().st_size for p in b2.packages_dir.rglob("*") if p.is_file())
    assert b2.commit == COMMIT
    assert "build.json" in listed[4].detail
    assert incomplete.name == "2026-01-12.1"
    assert [(b.profile, b.id) for b in builds.list_builds(out)] == [
        *[("basic", b.id) for b in listed], ("other", other.id)]


def test_a_build_json_of_another_build_is_invalid(tmp_path: Path) -> None:
    b = binhostlib.write_build(tmp_path, "basic", "2026-01-10", COMMIT)
    moved = tmp_path / "basic" / "2026-01-11.1"
    b.path.rename(moved)  # build.json still says tag 2026-01-10
    assert builds.read_build(moved).state == "invalid"
    data = json.loads((moved / "build.json").read_text())
    data["tag"] = "2026-01-11"
    if "id" in data:
        data["id"] = "2026-01-11.1"
    data["ok"] = "yes"  # only true is ok
    (moved / "build.json").write_text(json.dumps(data))
    assert builds.read_build(moved).state == "failed"


def test_find_build_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(SnapshotterError, match=r"^profile basic has no build 2026-01-10.1 \(see"):
        builds.find_build(tmp_path, "basic", "2026-01-10.1")
    with pytest.raises(SnapshotterError, match="not a build id"):
        builds.find_build(tmp_path, "basic", "../../etc")
