"""Benchmark of the snapshot import (issue 2): our importer against `xz -dc` and the seed's procedure.

Builds (once, cached under WORK/trees/) day 1, day 2 and a heavy day of a realistic generated tree
(benchmarks/treegen.py), then measures in one run, on the disk under WORK:

  * our first import (day 1 into an empty bare repository), our daily import (day 2) and a heavy day,
    each a call of snapshotter.importer.import_tarball() in a fresh child process; best of --repeat
    runs (3), each starting from a copy of the previous day's repository; one more run, not timed,
    samples the resident memory of the process and its children (git fast-import) from /proc every 10 ms;
  * before each of those runs, `xz -dc TARBALL > /dev/null` of its tarball: the baseline the targets are
    relative to (best of as many runs; interleaved, so both see the machine in the same state);
  * the seed's procedure (seeds/001): extract day 1 + `git add -A` + commit + tag; then extract day 2,
    `rsync -a --delete --exclude=/.git` it over the work tree, `git add -A` + commit + tag;
  * the size of our repository after `git gc` following day 1 and day 2 (growth per typical day).

It prints a table with the ratios against the baselines measured in the same run and PASS/FAIL for
each target of issue 2; the exit status is 1 when a target is missed (2 for a setup error).

    python benchmarks/bench_import.py [--scale 1] [--work DIR] [--heavy 20000] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import treegen  # noqa: E402

DAY1 = treegen.FIRST_DAY
DAY2 = date.fromordinal(DAY1.toordinal() + 1)
DAY3 = date.fromordinal(DAY1.toordinal() + 2)

# Targets of issue 2.
DAILY_MAX = 1.5  # daily import <= 1.5 x `xz -dc` of that day's tarball
FIRST_MAX = 4.0  # first import <= 4 x `xz -dc` of its tarball
SEED_MIN = 20.0  # the seed's daily procedure >= 20 x slower than our daily import
RSS_MAX_MB = 150.0
GROWTH_MAX = 0.03  # repo growth per typical day after gc <= 3 % of the day's tarball

SEED_ENV = {
    "GIT_AUTHOR_NAME": "Seed Procedure", "GIT_AUTHOR_EMAIL": "seed@localhost",
    "GIT_COMMITTER_NAME": "Seed Procedure", "GIT_COMMITTER_EMAIL": "seed@localhost",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the measured child: one import_tarball() call in a fresh interpreter ----------------------------

class TreeRss:
    """Samples the resident memory of this process and all its descendants every `interval` seconds.

    getrusage() cannot tell the children's peak here: a child started with vfork/fork inherits the
    parent's high-water mark at exec time, so ru_maxrss of the children is at least the parent's RSS
    when the last child was started. Sampling /proc gives the peak of the whole tree at one moment.
    """

    def __init__(self, interval: float = 0.01) -> None:
        import threading

        self.interval = interval
        self.peak = 0  # bytes
        self.at_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._exe = os.readlink("/proc/self/exe")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self, pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                for tid in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
        return out

    def sample(self) -> None:
        total, parts = 0, {}
        me = os.getpid()
        for p in self._tree(me):
            try:
                # a child between fork/vfork and exec still shows our memory: not counted twice
                if p != me and os.readlink(f"/proc/{p}/exe") == self._exe:
                    continue
                with open(f"/proc/{p}/statm") as f:
                    rss = int(f.read().split()[1]) * self._page
                with open(f"/proc/{p}/comm") as f:
                    name = f.read().strip()
            except (OSError, IndexError, ValueError):
                continue
            total += rss
            parts[name] = parts.get(name, 0) + rss
        if total > self.peak:
            self.peak, self.at_peak = total, parts

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def child(params: dict) -> None:
    """Run in a fresh interpreter: time one import and print figures as JSON on stdout."""
    from snapshotter.git.repository import Repository
    from snapshotter.sync.importer import Identity, import_tarball

    repo = Repository(Path(params["repo"]))
    identity = Identity("Portage Snapshotter Bench", "bench@localhost")
    tarball = Path(params["tarball"])
    day = date.fromisoformat(params["day"])
    profiler = None
    if params.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # The sampler costs the importing process about 0.14 CPU-s on a first import (and the GIL every
    # 10 ms): the timed runs go without it, a separate run measures the memory.
    rss = TreeRss() if params.get("sample_rss") else None
    with rss or contextlib.nullcontext():
        t0 = time.perf_counter()
        result = import_tarball(repo, tarball, identity, file_day=day)
        seconds = time.perf_counter() - t0
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
        Path(params["profile"]).write_text(out.getvalue())
    print(json.dumps({
        "seconds": seconds,
        "cpu_self": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
        "cpu_children": (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime),
        "maxrss_self_mb": r1.ru_maxrss / 1024,  # Linux: KiB
        "peak_tree_mb": rss.peak / 2**20 if rss else 0.0,  # sampled: this process + descendants at one moment
        "peak_tree_parts_mb": {k: round(v / 2**20, 1) for k, v in rss.at_peak.items()} if rss else {},
        "tag": result.tag, "commit": result.commit, "changed": result.changed,
    }))


def best_import(repo: Path, tarball: Path, day: date, repeat: int, profile: Path | None = None) -> tuple[dict, float]:
    """Import `tarball` into `repo` `repeat` times, each time starting again from the state `repo` is
    in now (a copy; a fresh repository when there is none), and keep the fastest run; return it and the
    fastest of the `xz -dc` baseline runs, one of which runs just before each import, so that both
    see the machine in the same state (its speed drifts by 10-20 % over minutes). Starting over from a
    copy matters: fast-import skips blobs that are already in the repository, so importing the same
    day twice into one repository would be faster than the real thing. One more run, from the same
    state and not timed, samples the memory. `repo` ends in the state of that run."""
    before = repo.with_name(repo.name + ".before")
    shutil.rmtree(before, ignore_errors=True)
    if repo.exists():
        shutil.copytree(repo, before, symlinks=True)
    runs, baseline = [], []
    for i in range(repeat + 1):  # the last run samples the memory and is not timed
        if i:
            shutil.rmtree(repo)
            if before.exists():
                shutil.copytree(before, repo, symlinks=True)
        if i < repeat:
            baseline.append(time_cmd(["xz", "-dc", str(tarball)]))
        runs.append(run_import(repo, tarball, day, profile if i == 0 else None, sample_rss=i == repeat))
    shutil.rmtree(before, ignore_errors=True)
    memory = runs.pop()
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["all_seconds"] = [r["seconds"] for r in runs]
    best["peak_tree_mb"] = memory["peak_tree_mb"]
    best["maxrss_self_mb"] = max(r["maxrss_self_mb"] for r in [*runs, memory])
    best["peak_tree_parts_mb"] = memory["peak_tree_parts_mb"]
    best["memory_run_seconds"] = memory["seconds"]
    best["xz_dc_all_seconds"] = baseline
    return best, min(baseline)


def run_import(repo: Path, tarball: Path, day: date, profile: Path | None = None, *, sample_rss: bool) -> dict:
    os.sync()
    params = {"repo": str(repo), "tarball": str(tarball), "day": day.isoformat(), "sample_rss": sample_rss}
    if profile is not None:
        params["profile"] = str(profile)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(params)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: import of {tarball.name} failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- baselines -----------------------------------------------------------------------------------------

def time_cmd(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
             stdout=subprocess.DEVNULL) -> float:
    os.sync()  # the previous step's dirty pages are written back before, not during, this one
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, stdout=stdout, check=True)
    return time.perf_counter() - t0


def git_env() -> dict[str, str]:
    from snapshotter.git.repository import git_env as env

    return env(SEED_ENV)


def seed_commit_tag(wt: Path, tag: str, env: dict[str, str]) -> float:
    """The seed's `git commit` and `git tag -a`, timed. The `git gc --auto` that `git commit` would start in
    the background (after `git add -A` of a whole tree: >6,700 loose objects) runs untimed in the foreground
    afterwards instead: it is not counted for the seed, and it does not run into the next timed step of
    either side (in a background it did, and deleted objects/ directories under a later cleanup)."""
    t0 = time.perf_counter()
    subprocess.run(["git", "-c", "gc.auto=0", "commit", "-q", "-m", f"Update portage tree to {tag}"],
                   cwd=wt, env=env, check=True)
    subprocess.run(["git", "-c", "gc.auto=0", "tag", "-a", "-m", f"Tagging {tag}", tag], cwd=wt, env=env, check=True)
    seconds = time.perf_counter() - t0
    subprocess.run(["git", "-c", "gc.autoDetach=false", "gc", "--auto", "--quiet"], cwd=wt, env=env, check=True)
    return seconds


def seed_procedure(work: Path, day1: Path, day2: Path, heavy: Path | None) -> dict[str, dict[str, float]]:
    """The seed's manual procedure, step by step (seeds/001: emerge-webrsync into a checkout, add, commit,
    tag). emerge-webrsync extracts the tarball to a temporary directory and rsyncs it over the tree."""
    env = git_env()
    wt = work / "seed"
    shutil.rmtree(wt, ignore_errors=True)
    wt.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=wt, env=env, check=True)

    def commit(tag: str) -> tuple[float, float]:
        add = time_cmd(["git", "add", "-A"], cwd=wt, env=env)
        return add, seed_commit_tag(wt, tag, env)

    out: dict[str, dict[str, float]] = {}
    # As the seed's user (not root): files are not chowned to portage (250) on extraction or rsync.
    extract = time_cmd(["tar", "-xJf", str(day1), "--no-same-owner", "--strip-components=1", "-C", str(wt)])
    add, com = commit(DAY1.isoformat())
    out["first"] = {"extract": extract, "add": add, "commit": com, "total": extract + add + com}
    for label, tarball, day in (("daily", day2, DAY2), ("heavy", heavy, DAY3)):
        if tarball is None:
            continue
        tmp = work / "seed-extract"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        extract = time_cmd(["tar", "-xJf", str(tarball), "--no-same-owner", "-C", str(tmp)])
        (top,) = list(tmp.iterdir())
        rsync = time_cmd(["rsync", "-a", "--no-owner", "--no-group", "--delete", "--exclude=/.git",
                          f"{top}/", f"{wt}/"])
        add, com = commit(day.isoformat())
        out[label] = {"extract": extract, "rsync": rsync, "add": add, "commit": com,
                      "total": extract + rsync + add + com}
        shutil.rmtree(tmp)
    shutil.rmtree(wt)
    return out


def repo_bytes(repo: Path) -> int:
    """Bytes of the repository's object store (packs and loose objects)."""
    return sum(p.stat().st_size for p in (repo / "objects").rglob("*") if p.is_file())


def new_objects_bytes(repo: Path, old: str, new: str) -> int:
    """On-disk bytes of the objects reachable from `new` but not from `old` (after gc). git stores the
    newest version of an object whole and older ones as deltas against it, so this is an upper bound of
    what the day costs; the old versions shrink into deltas at the same time."""
    objs = subprocess.run(["git", f"--git-dir={repo}", "rev-list", "--objects", new, f"^{old}"],
                          capture_output=True, env=git_env(), check=True).stdout
    ids = b"".join(line.split(b" ", 1)[0] + b"\n" for line in objs.splitlines())
    sizes = subprocess.run(["git", f"--git-dir={repo}", "cat-file", "--batch-check=%(objectsize:disk)"],
                           input=ids, capture_output=True, env=git_env(), check=True).stdout
    return sum(int(x) for x in sizes.split())


def fresh_pack_bytes(repo: Path, rev: str) -> int:
    """Bytes of one pack of everything reachable from `rev`, deltas computed afresh (`--no-reuse-delta`,
    like `git gc --aggressive` but with the default window): independent of how earlier packs were made."""
    proc = subprocess.run(["git", f"--git-dir={repo}", "pack-objects", "--revs", "--stdout", "-q",
                           "--no-reuse-delta", "--no-reuse-object", "--delta-base-offset"],
                          input=f"{rev}\n".encode(), capture_output=True, env=git_env(), check=True)
    return len(proc.stdout)


def gc(repo: Path) -> int:
    subprocess.run(["git", f"--git-dir={repo}", "gc", "-q"], env=git_env(), check=True)
    return repo_bytes(repo)


# --- environment -------------------------------------------------------------------------------------

def _mount(path: Path) -> tuple[str, str]:
    """(device, filesystem type) of the mount holding `path` (longest mount point prefix)."""
    path = path.resolve()
    best, found = "", ("?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, typ, *_ = line.split()
            mnt = mnt.replace("\\040", " ")
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, found = mnt, (dev, typ)
    return found


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path`."""
    return _mount(path)[1]


def disk_work_dir(path: Path) -> Path | None:
    """WORK resolved and created, or None (said on stderr) when it is on a RAM file system: the targets are
    for a real disk."""
    work = path.resolve()
    work.mkdir(parents=True, exist_ok=True)
    fs = fs_type(work)
    if fs in ("tmpfs", "ramfs"):
        log(f"bench: error: {work} is on {fs}; the targets are for a real disk (use --work)")
        return None
    return work


def day1_tarball(work: Path, scale: float, seed: int) -> Path:
    """Day 1's tarball of the generated tree: from any cached set of this scale and seed (day 1 does not
    depend on the heavy day), else generated."""
    cached = sorted((work / "trees").glob(f"scale{scale:g}-seed{seed}-heavy*-v*/info.json"))
    cached = [c for c in cached if c.parent.name.endswith(f"-v{treegen.GENERATOR_VERSION}")]
    if cached:
        return cached[0].parent / treegen.tarball_name(DAY1)
    return ensure_tarballs(work, scale, seed, 0)[0][0]


NO_JOURNAL_WARNING = (
    "warning: the work directory is on ext4 WITHOUT a journal. There ext4 will not reuse an inode freed in the\n"
    "last 1-5 minutes (fs/ext4/ialloc.c, recently_deleted(), checked only without a journal), so extracting\n"
    "114k files right after the previous day's were deleted is several times slower than on a journaled\n"
    "ext4, the default and what a mirror server has. The seed's figures then say more about this file system\n"
    "than about the procedure; use --work on a journaled file system (a loop-mounted image will do).")


def filesystem(path: Path) -> str:
    """The file system under `path` for the report: its type, and for ext4 whether it has a journal
    (a journaled ext4 has a jbd2 entry `<device>-<inode>` in /proc/fs/jbd2)."""
    dev, typ = _mount(path)
    if typ != "ext4":
        return typ
    try:
        name = os.path.basename(os.path.realpath(dev))
        journaled = any(e.startswith(name + "-") for e in os.listdir("/proc/fs/jbd2"))
    except OSError:
        journaled = False
    return "ext4" if journaled else "ext4, no journal"


def code_revision() -> str:
    """The commit of the code under test, `+dirty` when snapshotter/ has uncommitted changes."""
    root = HERE.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "snapshotter"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, object]:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    version = lambda cmd: subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]  # noqa: E731
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "git": version(["git", "--version"]), "xz": version(["xz", "--version"]),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


# --- main ----------------------------------------------------------------------------------------------

def ensure_tarballs(work: Path, scale: float, seed: int, heavy: int) -> tuple[list[Path], dict]:
    d = work / "trees" / f"scale{scale:g}-seed{seed}-heavy{heavy}-v{treegen.GENERATOR_VERSION}"
    days = [DAY1, DAY2] + ([DAY3] if heavy else [])
    tarballs = [d / treegen.tarball_name(day) for day in days]
    info_file = d / "info.json"
    if all(t.exists() for t in tarballs) and info_file.exists():
        log(f"using cached tarballs in {d}")
        return tarballs, json.loads(info_file.read_text())
    log(f"generating tarballs in {d} (once; cached afterwards)")
    treegen.generate(d, scale, seed, heavy=heavy, days=2, log=log)
    return tarballs, json.loads(info_file.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="tree size relative to the real tree (default 1)")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="work directory ON DISK (default "
                    "benchmarks/work)")
    ap.add_argument("--heavy", type=int, default=20000, help="md5-cache entries the heavy day rewrites at "
                    "scale 1, multiplied by --scale (default 20000; 0: no heavy day)")
    ap.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    ap.add_argument("--no-seed-procedure", action="store_true", help="skip the (slow) seed procedure")
    ap.add_argument("--profile", type=Path, metavar="DIR", help="run our imports under cProfile, write the "
                    "top functions to DIR/<step>.txt")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each import, the fastest counts, as for "
                    "the xz -dc baseline (default 3; each run starts from a copy of the previous day's repository)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    fs = fs_type(work)
    if fs in ("tmpfs", "ramfs"):
        log(f"bench: error: {work} is on {fs}; the targets are for a real disk (use --work)")
        return 2
    heavy = round(args.heavy * args.scale)
    tarballs, info = ensure_tarballs(work, args.scale, args.seed, heavy)
    day1, day2 = tarballs[0], tarballs[1]
    day3 = tarballs[2] if heavy else None
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    repeat = max(1, args.repeat)

    fig: dict[str, object] = {"code": code_revision(), "scale": args.scale, "seed": args.seed, "heavy_entries": heavy, "work": str(work),
                              "repeat": repeat,
                              "filesystem": filesystem(work), "machine": machine(), "tree": info,
                              "started": datetime.now(UTC).isoformat(timespec="seconds")}
    fig["tarball_bytes"] = {"first": day1.stat().st_size, "daily": day2.stat().st_size,
                            **({"heavy": day3.stat().st_size} if day3 else {})}

    log("our imports, each run after an `xz -dc` of its tarball ...")
    runs = work / "run"
    repo = runs / "ours.git"
    shutil.rmtree(repo, ignore_errors=True)
    prof = (lambda name: args.profile / f"{name}.txt") if args.profile else (lambda name: None)
    ours, xz = {}, {}
    ours["first"], xz["first"] = best_import(repo, day1, DAY1, repeat, prof("first"))
    size1 = gc(repo)
    ours["daily"], xz["daily"] = best_import(repo, day2, DAY2, repeat, prof("daily"))
    size2 = gc(repo)
    if day3:
        ours["heavy"], xz["heavy"] = best_import(repo, day3, DAY3, repeat, prof("heavy"))
        fig["repo_bytes_after_heavy_gc"] = gc(repo)
    fig["ours"], fig["xz_dc"] = ours, xz
    log("repacking day 1 and day 2 with fresh deltas ...")
    fig["repo_bytes"] = {"day1_gc": size1, "day2_gc": size2,
                         "day1_fresh": fresh_pack_bytes(repo, ours["first"]["commit"]),
                         "day2_fresh": fresh_pack_bytes(repo, ours["daily"]["commit"]),
                         "day2_new_objects": new_objects_bytes(repo, ours["first"]["commit"],
                                                               ours["daily"]["commit"])}
    shutil.rmtree(repo)

    if not args.no_seed_procedure:
        log("the seed's procedure ...")
        fig["seed_procedure"] = seed_procedure(runs, day1, day2, day3)
    fig["load_before"], fig["load_after"] = load_before, os.getloadavg()

    checks = evaluate(fig)
    fig["checks"] = checks
    print(report(fig))
    if "seed_procedure" in fig and fig["filesystem"] == "ext4, no journal":
        print(NO_JOURNAL_WARNING)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1) + "\n")
    return 0 if all(c["ok"] for c in checks) else 1


def evaluate(fig: dict) -> list[dict]:
    xz, ours = fig["xz_dc"], fig["ours"]
    checks = [
        {"name": "first import / xz -dc day 1", "value": ours["first"]["seconds"] / xz["first"],
         "limit": FIRST_MAX, "op": "<=", "unit": "x"},
        {"name": "daily import / xz -dc day 2", "value": ours["daily"]["seconds"] / xz["daily"],
         "limit": DAILY_MAX, "op": "<=", "unit": "x"},
    ]
    if "heavy" in ours:
        checks.append({"name": "heavy-day import / xz -dc of it", "value": ours["heavy"]["seconds"] / xz["heavy"],
                       "limit": DAILY_MAX, "op": "<=", "unit": "x"})
    if "seed_procedure" in fig:
        checks.append({"name": "seed's daily procedure / our daily import",
                       "value": fig["seed_procedure"]["daily"]["total"] / ours["daily"]["seconds"],
                       "limit": SEED_MIN, "op": ">=", "unit": "x"})
    rss = max(max(r["maxrss_self_mb"], r["peak_tree_mb"]) for r in ours.values())
    checks.append({"name": "peak RSS of an import (process tree)", "value": rss, "limit": RSS_MAX_MB,
                   "op": "<=", "unit": " MB"})
    rb = fig["repo_bytes"]
    growth = max(rb["day2_gc"] - rb["day1_gc"], rb["day2_fresh"] - rb["day1_fresh"])
    checks.append({"name": "repo growth per typical day after gc / tarball",
                   "value": 100 * growth / fig["tarball_bytes"]["daily"], "limit": 100 * GROWTH_MAX,
                   "op": "<=", "unit": " %"})
    for c in checks:
        c["ok"] = c["value"] <= c["limit"] if c["op"] == "<=" else c["value"] >= c["limit"]
    return checks


def report(fig: dict) -> str:
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    m, xz, ours, tb = fig["machine"], fig["xz_dc"], fig["ours"], fig["tarball_bytes"]
    shape = fig["tree"]["days"][0].get("shape", {})
    lines = [
        f"Import benchmark, scale {fig['scale']:g} (seed {fig['seed']}), code {fig['code']}, {fig['started']}",
        f"machine: {m['cores']} cores {m['cpu']}, {m['mem_gb']} GB; {m['git']}; {m['xz']}",
        f"work dir: {fig['work']} ({fig['filesystem']}); load average before {fig['load_before'][0]:.2f}, "
        f"after {fig['load_after'][0]:.2f}",
        f"tree: {shape.get('files', '?'):,} files, {shape.get('packages', '?'):,} packages, "
        f"{shape.get('ebuilds', '?'):,} ebuilds; tarballs: day 1 {mb(tb['first'])}, day 2 {mb(tb['daily'])}"
        + (f", heavy day ({fig['heavy_entries']:,} md5-cache rewrites) {mb(tb['heavy'])}" if "heavy" in tb else ""),
        "",
        f"{'step':44} {'seconds':>8} {'x xz -dc':>9} {'peak RSS MB':>12} {'files changed':>14}",
    ]
    labels = {"first": "day 1", "daily": "day 2", "heavy": "heavy day"}
    for k in xz:
        name = f"xz -dc {labels[k]} > /dev/null (best of {len(ours[k]['xz_dc_all_seconds'])})"
        lines.append(f"{name:44} {xz[k]:8.2f} {1:9.2f}")
    for k, r in ours.items():
        name = {"first": "our first import (day 1)", "daily": "our daily import (day 2)",
                "heavy": "our heavy-day import"}[k] + f" (best of {len(r['all_seconds'])})"
        rss = f"{max(r['maxrss_self_mb'], r['peak_tree_mb']):.0f}"
        lines.append(f"{name:44} {r['seconds']:8.2f} {r['seconds'] / xz[k]:9.2f} {rss:>12} {r['changed']:14,}")
    for k, s in fig.get("seed_procedure", {}).items():
        steps = " + ".join(f"{n} {v:.1f}" for n, v in s.items() if n != "total")
        name = {"first": "seed: extract day 1, add, commit, tag", "daily": "seed: extract day 2, rsync, add, "
                "commit, tag", "heavy": "seed: the same for the heavy day"}[k]
        lines.append(f"{name:44} {s['total']:8.2f} {s['total'] / xz[k]:9.2f}   ({steps})")
    rb = fig["repo_bytes"]
    lines.append(f"{'repo after day 1 + git gc':44} {mb(rb['day1_gc']):>8}")
    lines.append(f"{'repo after day 2 + git gc':44} {mb(rb['day2_gc']):>8}   "
                 f"(growth {(rb['day2_gc'] - rb['day1_gc']) / 1e3:.0f} kB; the day's new objects as stored: "
                 f"{rb['day2_new_objects'] / 1e3:.0f} kB = {100 * rb['day2_new_objects'] / tb['daily']:.1f} % "
                 "of the tarball, an upper bound)")
    lines.append(f"{'the same packed with fresh deltas':44} {mb(rb['day1_fresh']):>8} -> {mb(rb['day2_fresh'])}   "
                 f"(growth {(rb['day2_fresh'] - rb['day1_fresh']) / 1e3:.0f} kB)")
    if "repo_bytes_after_heavy_gc" in fig:
        lines.append(f"{'repo after heavy day + git gc':44} {mb(fig['repo_bytes_after_heavy_gc']):>8}")
    lines += ["", f"{'target':52} {'measured':>10} {'limit':>10}  result"]
    notes = ["growth: the larger of (object store after day 2 + `git gc`) - (after day 1 + `git gc`) and the "
             "same difference of packs made with fresh deltas (git gc reuses old deltas, so its difference "
             "depends on history and can be negative)",
             "every run, xz -dc / our import: " + "; ".join(
                 f"{k} " + ", ".join(f"{x:.2f}/{v:.2f}" for x, v in zip(r["xz_dc_all_seconds"], r["all_seconds"], strict=True))
                 for k, r in ours.items()),
             "peak RSS: the importing process and its children (git fast-import, ...) sampled every 10 ms in a run of its own "
             "(not timed: sampling slows the import by 1-5 %), summed at the same moment (at least ru_maxrss of the importing process)",
             "at the peak: " + "; ".join(k + " " + ", ".join(f"{n} {v:.0f}" for n, v in r["peak_tree_parts_mb"].items())
                                         for k, r in ours.items())]
    for c in fig["checks"]:
        val = f"{c['value']:.2f}{c['unit']}"
        lim = f"{c['op']} {c['limit']:g}{c['unit']}"
        lines.append(f"{c['name']:52} {val:>10} {lim:>10}  {'PASS' if c['ok'] else 'FAIL'}")
    return "\n".join(lines + notes)


if __name__ == "__main__":
    sys.exit(main())
