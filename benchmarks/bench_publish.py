"""Benchmark of `snapshotter publish` (issue 3): one tag of a real-sized tree against
`git archive TAG | xz -T0 -LEVEL` (target: publish <= 1.1x that).

Uses the day-1 tarball of the import benchmark (generated and cached under WORK/trees/ if missing),
imports it once into a snapshot repository WORK/publish/repo-*.git (kept for later runs), makes a throwaway signing key, then
times, in one run and alternating, N times each (best of N is reported):

  * `snapshotter publish --force TAG --out DIR --xz-level LEVEL` (the real command line, subprocess,
    including interpreter start-up, the md5 and the OpenPGP signature);
  * the baseline of issue 3: `git archive --format=tar TAG | xz -T0 -LEVEL > FILE`;
  * a fairer baseline with the block size publish uses at that level (`snapshotter.publish.xz_block_size`): with xz's default block
    size (3x the dictionary: 24 MiB at -6, 192 MiB at -9) a ~190 MB tar has too few blocks for
    `-T0` to use every core, so the literal baseline can be slower than publish's threaded xz.

    python benchmarks/bench_publish.py [--scale 1] [--work DIR] [--level 6] [--repeat 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_import  # noqa: E402

from snapshotter.publish.snapshots import xz_block_size  # noqa: E402

TARGET = 1.1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_key(home: Path) -> str:
    """A throwaway ed25519 signing key in its own GNUPGHOME; returns its fingerprint."""
    gpg = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    if not home.exists():
        home.mkdir(parents=True, mode=0o700)
        subprocess.run([*gpg, "--quick-gen-key", "Bench Publisher <infrastructure@gentoo.org>", "ed25519", "sign",
                        "never"], check=True, capture_output=True)
    out = subprocess.run([*gpg, "--with-colons", "--list-secret-keys"], check=True, capture_output=True,
                         text=True).stdout
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


def ensure_repository(repo: Path, tarball: Path) -> str:
    """Import the day-1 tarball once; return its tag."""
    from snapshotter.git.repository import Repository
    from snapshotter.sync.importer import Identity, import_tarball

    repository = Repository(repo)
    tag = repository.newest_tag() if repository.exists() else None
    if tag is not None:
        return tag.name
    shutil.rmtree(repo, ignore_errors=True)
    log(f"importing {tarball.name} into {repo} (once) ...")
    result = import_tarball(repository, tarball, Identity("Portage Snapshotter Bench", "bench@localhost"),
                            file_day=bench_import.DAY1)
    subprocess.run(["git", f"--git-dir={repo}", "gc", "-q"], env=bench_import.git_env(), check=True)
    return result.tag


def time_baseline(repo: Path, tag: str, level: int, out: Path, block_size: str | None) -> float:
    xz = ["xz", "-T0", f"-{level}", "-c"] + ([f"--block-size={block_size}"] if block_size else [])
    env = bench_import.git_env()
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        archive = subprocess.Popen(["git", f"--git-dir={repo}", "archive", "--format=tar", tag],
                                   stdout=subprocess.PIPE, env=env)
        assert archive.stdout is not None
        rc = subprocess.run(xz, stdin=archive.stdout, stdout=f).returncode
        archive.stdout.close()
        if archive.wait() != 0 or rc != 0:
            raise SystemExit("bench: git archive | xz failed")
        os.fsync(f.fileno())  # publish fsyncs its tarball too
    return time.perf_counter() - t0


def time_publish(repo: Path, tag: str, level: int, out: Path, key: str, gnupghome: Path, config: Path) -> float:
    cmd = ["snapshotter", "--config", str(config), "-q", "publish", "--repo", str(repo), "--out", str(out),
           "--signing-key", key, "--gnupghome", str(gnupghome), "--xz-level", str(level), "--xz-threads", "0",
           "--force", tag]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench: snapshotter publish failed: {proc.stderr.strip()}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--level", type=int, default=6, choices=range(10), metavar="0-9",
                    help="xz preset for both sides (default 6; publish's own default is 9)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, best reported (default 2)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    work = bench_import.disk_work_dir(args.work)
    if work is None:
        return 2
    fs = bench_import.fs_type(work)
    day1 = bench_import.day1_tarball(work, args.scale, args.seed)
    pub = work / "publish"
    repo = pub / f"repo-scale{args.scale:g}-seed{args.seed}.git"
    tag = ensure_repository(repo, day1)
    gnupghome = pub / "gnupg"
    key = make_key(gnupghome)
    config = pub / "empty.toml"
    config.write_text("# defaults only: the benchmark passes everything as flags\n")
    out = pub / "out"
    baseline_file = pub / "baseline.tar.xz"

    load_before = os.getloadavg()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    runs: dict[str, list[float]] = {"publish": [], "baseline": [], "baseline_fair": []}
    for i in range(args.repeat):
        log(f"run {i + 1}/{args.repeat} ...")
        runs["baseline"].append(time_baseline(repo, tag, args.level, baseline_file, None))
        runs["publish"].append(time_publish(repo, tag, args.level, out, key, gnupghome, config))
        runs["baseline_fair"].append(time_baseline(repo, tag, args.level, baseline_file, xz_block_size(args.level)))
    published = out / "snapshots" / f"gentoo-{tag.replace('-', '')}.tar.xz"
    best = {k: min(v) for k, v in runs.items()}
    fig = {
        "scale": args.scale, "level": args.level, "tag": tag, "work": str(work), "filesystem": fs,
        "machine": bench_import.machine(), "started": started,
        "runs": runs, "best": best, "published_bytes": published.stat().st_size,
        "baseline_bytes": baseline_file.stat().st_size,
        "load_before": load_before, "load_after": os.getloadavg(),
        "ratio": best["publish"] / best["baseline"], "ratio_fair": best["publish"] / best["baseline_fair"],
    }
    fig["ok"] = fig["ratio"] <= TARGET
    m = fig["machine"]
    print("\n".join([
        f"Publish benchmark, scale {args.scale:g}, tag {tag}, xz -{args.level}, {fig['started']}",
        f"machine: {m['cores']} cores {m['cpu']}; {m['xz']}; work dir {work} ({fs}); load average before "
        f"{load_before[0]:.2f}, after {fig['load_after'][0]:.2f}",
        "",
        f"{'step (best of ' + str(args.repeat) + ')':58} {'seconds':>8} {'output MB':>10}",
        f"{'snapshotter publish TAG (incl. start-up, md5, signature)':58} {best['publish']:8.2f} "
        f"{fig['published_bytes'] / 1e6:10.1f}",
        f"{'git archive TAG | xz -T0 -' + str(args.level):58} {best['baseline']:8.2f} "
        f"{fig['baseline_bytes'] / 1e6:10.1f}",
        f"{'git archive TAG | xz -T0 -' + str(args.level) + ' --block-size=' + xz_block_size(args.level):58} "
        f"{best['baseline_fair']:8.2f}",
        "",
        f"publish / (git archive | xz -T0 -{args.level}) = {fig['ratio']:.3f}x  (target <= {TARGET}x)  "
        f"{'PASS' if fig['ok'] else 'FAIL'}",
        f"publish / the same with --block-size={xz_block_size(args.level)} = {fig['ratio_fair']:.3f}x  (for information)",
        "all runs: " + ", ".join(f"{k} " + " ".join(f"{v:.2f}" for v in vs) for k, vs in runs.items()),
    ]))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1) + "\n")
    return 0 if fig["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
