"""Benchmark of the tree export (issue 16, "Fast build roots"): `export_tree` and the tree cache against
`git archive TAG | tar -x` of the same tag (target: first export <= 1.5x that).

Uses the day-1 tarball of the import benchmark (generated and cached under WORK/trees/ if missing),
imported once into WORK/publish/repo-*.git (the publish benchmark's repository, kept). Then, in one
run and alternating, N times each (best of N reported; every run into a fresh directory, all removed
only at the end: on ext4 without a journal, creating files right after 137k were deleted costs
several times more system time (bench_import.NO_JOURNAL_WARNING); `sync` before each run so that no
run pays for the previous one's writeback):

  * the baseline: `git archive --format=tar TAG | tar -x -C DIR` (two processes, a pipe);
  * `export_tree(repo, TAG, DIR)`: the first export (names, layout and links checked, `git archive |
    tar -x`, the result checked), in a fresh interpreter (start-up not counted);
  * `TreeCache.tree(repo, TAG)` on a tree id already cached: what each later build pays.

Each export is compared with the baseline run just before it, and the median of those ratios is the
verdict (PASS/FAIL; exit status 1 on FAIL): on a shared machine the best of N of each side can come
from different machine states (the same `tar -x` took 20 s or 80 s of system time within minutes
here). The ratio of the bests is printed too, and the CPU seconds of both (user + system, git and tar
included) are reported. Peak memory: the resident memory of the export's process tree (python, git, tar), sampled every 10 ms
(bench_import.TreeRss) in one more, untimed export.

    python benchmarks/bench_export.py [--scale 1] [--work DIR] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_import  # noqa: E402
import bench_publish  # noqa: E402

TARGET = 1.5  # first export <= 1.5 x `git archive | tar -x`


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def child(params: dict) -> None:
    """In a fresh interpreter: one export_tree (or a cached TreeCache.tree) timed, figures on stdout."""
    from snapshotter.git.export import export_tree
    from snapshotter.git.treecache import TreeCache

    repo, tag, dest = Path(params["repo"]), params["tag"], Path(params["dest"])
    rss = bench_import.TreeRss() if params.get("sample_rss") else None
    c0 = cpu_seconds()
    with rss or _null():
        t0 = time.perf_counter()
        if params["what"] == "export":
            export_tree(repo, tag, dest)
            entries = None
        else:
            with TreeCache(dest, keep=8).tree(repo, tag) as tree:
                entries = len(os.listdir(tree))
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "cpu": cpu_seconds() - c0, "peak_tree_mb": rss.peak / 2**20 if rss else 0.0,
                      "peak_tree_parts_mb": {k: round(v / 2**20, 1) for k, v in rss.at_peak.items()} if rss else {},
                      "top_entries": entries}))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run_child(what: str, repo: Path, tag: str, dest: Path, *, sample_rss: bool = False) -> dict:
    os.sync()
    params = {"what": what, "repo": str(repo), "tag": tag, "dest": str(dest), "sample_rss": sample_rss}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(params)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {what} failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children so far."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def time_baseline(repo: Path, tag: str, dest: Path) -> tuple[float, float]:
    dest.mkdir()
    os.sync()
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    archive = subprocess.Popen(["git", f"--git-dir={repo}", "archive", "--format=tar", tag], stdout=subprocess.PIPE,
                               env=bench_import.git_env())
    assert archive.stdout is not None
    rc = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout).returncode
    archive.stdout.close()
    if archive.wait() != 0 or rc != 0:
        raise SystemExit("bench: git archive | tar -x failed")
    return time.perf_counter() - t0, cpu_seconds() - c0


def count(dest: Path) -> int:
    return sum(len(d) + len(f) for _, d, f in os.walk(dest))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, best reported (default 3)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    work = bench_import.disk_work_dir(args.work)
    if work is None:
        return 2
    day1 = bench_import.day1_tarball(work, args.scale, args.seed)
    repo = work / "publish" / f"repo-scale{args.scale:g}-seed{args.seed}.git"
    tag = bench_publish.ensure_repository(repo, day1)
    out = work / "export"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    fs = bench_import.filesystem(work)
    if fs == "ext4, no journal":
        log(bench_import.NO_JOURNAL_WARNING)

    load_before = os.getloadavg()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    runs: dict[str, list[float]] = {"baseline": [], "export": [], "cached": []}
    cpu: dict[str, list[float]] = {"baseline": [], "export": []}
    entries = {}
    cache = out / "cache" / "trees"
    for i in range(args.repeat):
        log(f"run {i + 1}/{args.repeat} ...")
        run = out / f"run{i}"
        run.mkdir()
        seconds, cpu_used = time_baseline(repo, tag, run / "baseline")
        runs["baseline"].append(seconds)
        cpu["baseline"].append(cpu_used)
        entries["baseline"] = count(run / "baseline")
        r = run_child("export", repo, tag, run / "export")
        runs["export"].append(r["seconds"])
        cpu["export"].append(r["cpu"])
        entries["export"] = count(run / "export")
        if i == 0:
            run_child("cached", repo, tag, cache)  # the cache's own export, not timed
        runs["cached"].append(run_child("cached", repo, tag, cache)["seconds"])
    memory = run_child("export", repo, tag, out / "memory", sample_rss=True)
    log(f"removing {out} ...")
    shutil.rmtree(out)
    best = {k: min(v) for k, v in runs.items()}
    fig = {
        "scale": args.scale, "tag": tag, "work": str(work), "filesystem": fs, "machine": bench_import.machine(),
        "started": started, "runs": runs, "best": best, "entries": entries,
        "peak_tree_mb": memory["peak_tree_mb"], "peak_tree_parts_mb": memory["peak_tree_parts_mb"],
        "memory_run_seconds": memory["seconds"], "load_before": load_before, "load_after": os.getloadavg(),
    }
    ratio = best["export"] / best["baseline"]
    paired = statistics.median(e / b for e, b in zip(runs["export"], runs["baseline"], strict=True))
    cpu_ratio = min(cpu["export"]) / min(cpu["baseline"])
    fig.update({"cpu": cpu, "ratio_best": ratio, "ratio_paired_median": paired, "ratio_cpu": cpu_ratio})
    # The verdict goes by the paired ratio: on a shared machine the same `tar -x` takes 20 s or 80 s of
    # system time within minutes, and the best of N then compares different machine states.
    ok = paired <= TARGET and entries["export"] == entries["baseline"]
    print(f"tree export, tag {tag} ({entries['export']} entries; git archive | tar -x wrote {entries['baseline']}), "
          f"best of {args.repeat}, {fs} at {work}")
    print("| | seconds | / baseline |")
    print("| --- | ---: | ---: |")
    print(f"| `git archive TAG \\| tar -x` (baseline) | {best['baseline']:.2f} | 1.00x |")
    print(f"| `export_tree` (first export), best of the runs | {best['export']:.2f} | {ratio:.2f}x |")
    print(f"| median of each run's export / the baseline just before it | | **{paired:.2f}x "
          f"{'PASS' if ok else 'FAIL'}** (target <= {TARGET}x) |")
    print(f"| CPU seconds (user + system, all processes), least of the runs: baseline | {min(cpu['baseline']):.2f} | |")
    print(f"| CPU seconds, export | {min(cpu['export']):.2f} | {cpu_ratio:.2f}x |")
    print(f"| `TreeCache.tree()`, tree cached | {best['cached']:.3f} | {best['cached'] / best['baseline']:.3f}x |")
    print(f"peak RSS of the export (python + git + tar, sampled): {memory['peak_tree_mb']:.0f} MB "
          f"{memory['peak_tree_parts_mb']}")
    print("all runs: " + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in runs.items()))
    print(f"load average {load_before[0]:.1f} before, {fig['load_after'][0]:.1f} after")  # type: ignore[index]
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
