"""The suite's own hygiene (tests/conftest.py, helpers/hostdirs.py): for the whole session every built-in
default path of the configuration is out of reach, and the check that fails the run when a host directory
changed sees every kind of change; and no test module imports another."""

from __future__ import annotations

import ast
import operator
import os
import shutil
from pathlib import Path

from helpers import hostdirs, testlib

from snapshotter import config


def test_the_session_config_moves_every_default_path(host_defaults_out_of_reach: Path):
    base = host_defaults_out_of_reach.parent
    cfg = config.load()  # what any command given no --config reads
    assert cfg.path == host_defaults_out_of_reach
    defaults = hostdirs.default_paths()
    assert {"repo", "state_dir", "sync.cache_dir", "build.work_dir", "build.output", "build.cache_dir"} <= set(defaults)
    for key in defaults:
        value = operator.attrgetter(key)(cfg)
        assert base in value.parents and not any(w == value or w in value.parents for w in hostdirs.watched()), key
    assert cfg.publish.out is not None and base in cfg.publish.out.parents


def test_every_default_path_is_watched():
    watched = hostdirs.watched()
    assert watched[:2] == [Path("/var/lib/snapshotter"), Path("/var/cache/snapshotter")]
    for key, path in hostdirs.default_paths().items():
        assert any(w == path or w in path.parents for w in watched), key


def test_a_command_without_config_stays_in_the_temporary_directory(host_defaults_out_of_reach: Path):
    """testlib.run_cli hands the session's $SNAPSHOTTER_CONFIG down (it used to drop it: built-in defaults)."""
    r = testlib.run_cli("status")
    assert str(host_defaults_out_of_reach.parent / "repo") in r.stdout + r.stderr, (r.stdout, r.stderr)


def test_changes_sees_creation_removal_resizing_and_touching(tmp_path: Path):
    root = tmp_path / "state"
    assert hostdirs.listing(root) is None
    assert hostdirs.changes(root, None, None) == []
    root.mkdir()
    (root / "queue.sqlite").write_bytes(b"x")
    (root / "old").write_bytes(b"o")
    assert hostdirs.changes(root, None, hostdirs.listing(root)) == [f"{root}: did not exist, now exists (3 entries)"]
    before = hostdirs.listing(root)
    assert hostdirs.changes(root, before, hostdirs.listing(root)) == []
    (root / "queue.sqlite").write_bytes(b"xy")
    (root / "old").unlink()
    (root / "sub").mkdir()
    (root / "sub" / "new").symlink_to("queue.sqlite")
    lines = hostdirs.changes(root, before, hostdirs.listing(root))
    assert f"{root / 'old'}: removed" in lines
    assert f"{root / 'sub'}: created" in lines and f"{root / 'sub' / 'new'}: created" in lines
    assert any(line.startswith(f"{root / 'queue.sqlite'}: size 1 -> 2") for line in lines), lines
    before = hostdirs.listing(root)
    st = (root / "queue.sqlite").stat()
    os.utime(root / "queue.sqlite", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, touched
    assert hostdirs.changes(root, before, hostdirs.listing(root)) == [f"{root / 'queue.sqlite'}: mtime changed"]
    shutil.rmtree(root)
    assert hostdirs.changes(root, before, hostdirs.listing(root)) == [f"{root}: existed, now gone"]


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers/ (and fixtures in a conftest.py): a test module that imports
    another runs that module's fixtures and module-level code in a place nobody reads it."""
    tests = Path(__file__).resolve().parent
    modules = {p.stem for p in tests.rglob("test_*.py")}
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        if "helpers" in path.relative_to(tests).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(tests)}: {n}" for n in names if n.split(".")[-1] in modules
                          or n.split(".")[0] in modules or n == "conftest"]
    assert offenders == []
