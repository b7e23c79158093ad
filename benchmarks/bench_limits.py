"""Benchmark of the bounds of issue 12 (hostile mirrors, hostile tarballs): memory and time stay bounded
whatever the input.

  * peak memory of an import whose snapshot holds one 1 GiB file (a 0.2 MB .tar.xz of zeros): the
    importer's peak RSS (getrusage) and git fast-import's (VmHWM, read from /proc while it runs: getrusage
    would count the parent's pages it was forked with) (target: both together <= 400 MB; before the member
    streaming the import held the whole member, 3.18 GB);
  * wall time of `snapshotter sync` against a mirror that drips the tarball one byte a second, with
    `sync.timeout = 3` and `sync.deadline = --deadline` (target: <= deadline + 10 s; before, the sync and
    its lock were held for as long as the mirror kept dripping).

Everything lives in a temporary directory (--work to keep it somewhere); the mirror is a fault-injecting
server on 127.0.0.1 (tests/helpers/faultserver.py).

    python benchmarks/bench_limits.py [--member-mib 1024] [--deadline 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helpers: keys, snapshots, the fault server
sys.path.insert(0, str(HERE.parent))

from helpers import testlib  # noqa: E402
from helpers.faultserver import serve_faults  # noqa: E402

SNAPSHOTTER = str(Path(sys.executable).parent / "snapshotter")
RSS_TARGET_MB = 400.0
DAY = date(2026, 11, 20)

# Run in a child so that its peak RSS is the import's alone; fast-import is its child.
_IMPORT = """
import resource, sys
from pathlib import Path
from snapshotter.git.repository import Repository
from snapshotter.sync.importer import Identity, import_tarball
from snapshotter.sync.tarstream import Limits
result = import_tarball(Repository(Path(sys.argv[1])), Path(sys.argv[2]), Identity("b", "b@localhost"),
                        limits=Limits(member=4 << 30, unpacked=8 << 30))
print(result.commit, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def big_member_tarball(path: Path, mib: int) -> None:
    """A snapshot .tar.xz: metadata/timestamp.x and one file of `mib` MiB of zeros, written as a stream."""
    ts = testlib.snapshot_time(DAY)
    stamp = testlib.timestamp_line(ts).encode()
    comp = lzma.LZMACompressor(preset=0)
    with open(path, "wb") as out:
        def put(data: bytes) -> None:
            out.write(comp.compress(data))

        for name, size in (("gentoo/metadata/timestamp.x", len(stamp)), ("gentoo/distfiles/big", mib << 20)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, ts, 0o644
            put(info.tobuf(tarfile.GNU_FORMAT))
            if size == len(stamp):
                put(stamp + b"\0" * (-len(stamp) % 512))
            else:
                block = bytes(1 << 20)
                for _ in range(mib):
                    put(block)
        put(b"\0" * 1024)
        out.write(comp.flush())


def bench_memory(work: Path, mib: int) -> dict[str, float]:
    tarball = work / "gentoo-20261120.tar.xz"
    log(f"writing a snapshot with one {mib} MiB file ...")
    big_member_tarball(tarball, mib)
    repo = work / "big.git"
    log(f"importing it ({tarball.stat().st_size / 1e6:.1f} MB compressed) ...")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", _IMPORT, str(repo), str(tarball)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    git_kb = 0
    while proc.poll() is None:  # fast-import's own high-water mark, read while it runs
        for pid in _descendants(proc.pid):
            git_kb = max(git_kb, _hwm_kb(pid))
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"import failed: {err}")
    _commit, own_kb, _children_kb = out.split()
    return {"member_mib": mib, "tarball_mb": tarball.stat().st_size / 1e6, "seconds": time.monotonic() - start,
            "importer_mb": int(own_kb) / 1024, "fast_import_mb": git_kb / 1024}


def _descendants(root: int) -> list[int]:
    """The processes below `root` (from /proc)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def _hwm_kb(pid: int) -> int:
    """A process's peak RSS so far (VmHWM), in KiB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def bench_drip(work: Path, deadline: float) -> dict[str, float]:
    key = testlib.make_key(work / "gpg")
    srv = serve_faults(work / "mirror")
    try:
        testlib.build_snapshot(srv.root, DAY, key=key)
        srv.plan(f"/snapshots/gentoo-{DAY:%Y%m%d}.tar.xz", "drip")
        config = work / "drip.toml"
        config.write_text(f"[sync]\ntimeout = 3\ndeadline = {deadline}\nretries = 4\n")
        now = int(datetime(2026, 11, 21, 12, tzinfo=UTC).timestamp())
        log(f"sync against a drip-feeding mirror, sync.deadline = {deadline:g} s ...")
        start = time.monotonic()
        proc = subprocess.run([SNAPSHOTTER, "--config", str(config), "sync", "--repo", str(work / "drip.git"),
                               "--keyring", str(key.public), "--fingerprint", key.fingerprint,
                               "--cache-dir", str(work / "cache"), "--mirror", srv.url],
                              capture_output=True, text=True, env={**__import__("os").environ,
                                                                   "SNAPSHOTTER_NOW": str(now)}, timeout=600)
        wall = time.monotonic() - start
    finally:
        srv.close()
        testlib.stop_agents()
    if proc.returncode != 1 or "sync.deadline" not in proc.stderr:
        raise SystemExit(f"the drip sync did not fail on its deadline: {proc.returncode} {proc.stderr}")
    return {"deadline": deadline, "seconds": wall, "error": proc.stderr.strip().splitlines()[-1]}  # type: ignore[dict-item]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--member-mib", type=int, default=1024)
    ap.add_argument("--deadline", type=float, default=10.0)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-limits-", dir=args.work) as tmp:
        work = Path(tmp)
        mem = bench_memory(work, args.member_mib)
        drip = bench_drip(work, args.deadline)
    peak = mem["importer_mb"] + mem["fast_import_mb"]
    ok_mem = peak <= RSS_TARGET_MB
    ok_drip = drip["seconds"] <= args.deadline + 10
    mib, dl = args.member_mib, args.deadline

    def row(label: str, value: float, target: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{label:<58} {value:>10.1f} {target:>10}  {verdict}")

    print(f"{'measure':<58} {'value':>10} {'target':>10}")
    row(f"import, one {mib} MiB file: importer peak RSS (MB)", mem["importer_mb"])
    row(f"import, one {mib} MiB file: git fast-import peak RSS (MB)", mem["fast_import_mb"])
    row("import, both together (MB)", peak, f"<= {RSS_TARGET_MB:g}", ok_mem)
    row("import wall time (s)", mem["seconds"])
    row(f"sync vs drip-feeding mirror, deadline {dl:g} s: wall (s)", drip["seconds"], f"<= {dl + 10:g}", ok_drip)
    print(f"  its error: {drip['error']}")
    if args.json:
        args.json.write_text(json.dumps({"memory": mem, "drip": drip}, indent=2))
    return 0 if ok_mem and ok_drip else 1


if __name__ == "__main__":
    sys.exit(main())
