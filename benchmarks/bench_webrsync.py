"""The seed's procedure with the real tools, against `snapshotter sync`, end to end (issue 2).

bench_import.py models the seed's procedure with tar, rsync and git. This script runs it as seeds/001
writes it, with the real `emerge-webrsync` (portage from PyPI, in this virtualenv) fetching from a mirror
on 127.0.0.1 and checking md5 and OpenPGP signature, then `git add -A`, commit and tag; and on the other
side the real `snapshotter sync --date D --no-push` from the same mirror, with the same checks. Both
start from the previous day's result and end with a tagged commit; both include their start-up, the
download over loopback and the verification. Not part of the test suite.

    python benchmarks/bench_webrsync.py             # warm page cache
    python benchmarks/bench_webrsync.py --cold      # caches dropped before each step (root; disturbs the machine)

It uses the tarballs bench_import.py generated (`benchmarks/work/trees/`; generated if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helpers: a throwaway key and an HTTP mirror
sys.path.insert(0, str(HERE))

import bench_import  # noqa: E402
from helpers import testlib  # noqa: E402

BIN = Path(sys.executable).parent  # emerge-webrsync, emaint and snapshotter live in the same virtualenv
DAYS = (bench_import.DAY1, bench_import.DAY2, bench_import.DAY3)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def drop_caches(cold: bool) -> None:
    os.sync()
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: list[str], *, cold: bool, **kw: object) -> float:
    drop_caches(cold)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd[:2])} failed ({proc.returncode}):\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return seconds


def seed_day(work: Path, tree: Path, url: str, key: testlib.Key, day: date, tag: str, cold: bool) -> dict[str, float]:
    """seeds/001: emerge-webrsync into the git checkout, git add -A, commit, tag (no push)."""
    for d in ("configroot", "distfiles", "home"):
        (work / d).mkdir(parents=True, exist_ok=True)
    portage_tmp = Path(tempfile.mkdtemp(prefix="ew-", dir=work))  # on the disk under test
    env = {
        "PATH": os.pathsep.join([str(BIN), "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]),
        "HOME": str(work / "home"), "LC_ALL": "C", "TZ": "UTC",
        "PORTAGE_CONFIGROOT": str(work / "configroot"), "GENTOO_MIRRORS": url,
        "PORTAGE_TMPDIR": str(portage_tmp), "DISTDIR": str(work / "distfiles"), "PKGDIR": str(work / "pkgdir"),
        "FEATURES": "-usersync -news", "PORTAGE_GPG_KEY": str(key.public),
        "PORTAGE_REPOSITORIES": f"[DEFAULT]\nmain-repo = gentoo\n[gentoo]\nlocation = {tree}\n",
        "PORTAGE_RSYNC_EXTRA_OPTS": "--exclude=/.git --exclude=/.gitignore",  # as the seed sets it
    }
    try:
        webrsync = timed([str(BIN / "emerge-webrsync"), f"--revert={day:%Y%m%d}"], cold=cold, env=env)
    finally:
        shutil.rmtree(portage_tmp, ignore_errors=True)
    genv = bench_import.git_env()  # the seed's identity, no user or system git config: as bench_import
    add = timed(["git", "add", "-A"], cold=cold, cwd=tree, env=genv)
    drop_caches(cold)
    commit = bench_import.seed_commit_tag(tree, tag, genv)
    return {"webrsync": webrsync, "add": add, "commit": commit, "total": webrsync + add + commit}


def ours_day(work: Path, repo: Path, url: str, key: testlib.Key, day: date, cold: bool) -> dict[str, float]:
    config = work / "empty.toml"
    config.write_text("")
    cmd = [str(BIN / "snapshotter"), "--config", str(config), "sync", "--repo", str(repo), "--mirror", url,
           "--keyring", str(key.public), "--fingerprint", key.fingerprint, "--date", f"{day:%Y%m%d}",
           "--no-push", "--cache-dir", str(work / "cache")]
    return {"total": timed(cmd, cold=cold, env={**os.environ, "SNAPSHOTTER_CONFIG": str(config)})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--heavy", type=int, default=20000)
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every timed step (root)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (BIN / "emerge-webrsync").is_file() or shutil.which("rsync") is None:
        raise SystemExit("bench: needs emerge-webrsync in this virtualenv (pip install portage==3.0.83) and rsync")
    if args.cold and os.geteuid() != 0:
        raise SystemExit("bench: --cold needs root (it writes /proc/sys/vm/drop_caches)")
    args.work.mkdir(parents=True, exist_ok=True)
    if bench_import.fs_type(args.work) in ("tmpfs", "ramfs"):
        print(f"bench: {args.work} is on tmpfs; the targets are for a disk (use --work)", file=sys.stderr)
        return 2
    heavy = round(args.heavy * args.scale)
    tarballs, _ = bench_import.ensure_tarballs(args.work, args.scale, args.seed, heavy)
    work = args.work / "webrsync"
    shutil.rmtree(work, ignore_errors=True)
    mirror = work / "mirror"
    (mirror / "snapshots").mkdir(parents=True)
    key = testlib.make_key(work / "gnupg")
    for tarball in tarballs:
        target = mirror / "snapshots" / tarball.name
        os.link(tarball, target)
        testlib.write_side_files(target, key)
    server = testlib.serve(mirror)
    tree, repo = work / "seed", work / "ours.git"
    tree.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=tree, env=bench_import.git_env(), check=True)
    fig: dict[str, object] = {"code": bench_import.code_revision(), "cold": args.cold, "scale": args.scale,
                              "machine": bench_import.machine(), "load_before": os.getloadavg()[0],
                              "work": str(args.work.resolve()), "filesystem": bench_import.filesystem(args.work)}
    try:
        for label, tarball, tag_day in zip(("first", "daily", "heavy"), tarballs, DAYS, strict=False):
            file_day = tag_day  # gentoo-D.tar.xz carries timestamp.x of D + 1 00:45: tag D
            log(f"{label}: {tarball.name} ...")
            fig[f"ours_{label}"] = ours_day(work, repo, server.url, key, file_day, args.cold)
            fig[f"seed_{label}"] = seed_day(work, tree, server.url, key, file_day, tag_day.isoformat(), args.cold)
            ours_tree = subprocess.run(["git", f"--git-dir={repo}", "rev-parse", f"{tag_day}^{{tree}}"],
                                       capture_output=True, text=True, check=True).stdout.strip()
            seed_tree = subprocess.run(["git", "rev-parse", f"{tag_day}^{{tree}}"], cwd=tree, capture_output=True,
                                       text=True, check=True).stdout.strip()
            fig[f"same_tree_{label}"] = ours_tree == seed_tree
    finally:
        server.server.shutdown()
        testlib.stop_agents()
    fig["load_after"] = os.getloadavg()[0]
    print(report(fig))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    same = all(v for k, v in fig.items() if k.startswith("same_tree_"))
    ratio = fig["seed_daily"]["total"] / fig["ours_daily"]["total"]  # type: ignore[index]
    print(f"target: the seed's daily procedure >= {bench_import.SEED_MIN:g}x `snapshotter sync`: {ratio:.1f}x "
          f"{'PASS' if ratio >= bench_import.SEED_MIN else 'FAIL'}; same trees: {'yes' if same else 'NO'}")
    if fig["filesystem"] == "ext4, no journal":
        print(bench_import.NO_JOURNAL_WARNING)
    return 0 if same and ratio >= bench_import.SEED_MIN else 1


def report(fig: dict) -> str:
    m = fig["machine"]
    lines = [f"The seed's procedure (real emerge-webrsync + git) against `snapshotter sync`, code {fig['code']}, "
             f"{'cold' if fig['cold'] else 'warm'} page cache",
             f"machine: {m['cores']} cores, load average before {fig['load_before']:.2f}, after {fig['load_after']:.2f}",
             f"work dir: {fig['work']} ({fig['filesystem']})",
             "",
             f"{'day':8} {'seed total':>11} {'(webrsync + add + commit/tag)':>32} {'snapshotter sync':>17} {'ratio':>7}  same tree"]
    for label in ("first", "daily", "heavy"):
        if f"seed_{label}" not in fig:
            continue
        s, o = fig[f"seed_{label}"], fig[f"ours_{label}"]
        parts = f"({s['webrsync']:.1f} + {s['add']:.1f} + {s['commit']:.1f})"
        lines.append(f"{label:8} {s['total']:10.2f}s {parts:>32} {o['total']:16.2f}s {s['total'] / o['total']:6.1f}x  "
                     f"{'yes' if fig[f'same_tree_{label}'] else 'NO'}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
