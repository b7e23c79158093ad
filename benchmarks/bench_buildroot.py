"""Benchmark of build roots (issue 16): how long a build waits before emerge starts.

One run, on the disk under WORK, with the stand-in stage of the test suite (tests/helpers/stage.py:
Debian minbase + Portage, 174 MB unpacked; `python tests/helpers/stage.py` builds it once) and a
generated gentoo tree of about 114k files (benchmarks/treegen.py) committed and tagged in a bare
repository. Each build is `service.build.run_build` of a profile whose emerge is `emerge --version` (no
packages, no stage4), so what is timed is the build's own overhead:

  * root ready: from run_build() to the start of the namespace runner (emerge), i.e. tag and stage
    resolved, stage and trees in place, Portage configuration written;
  * overhead: the whole run_build() minus emerge's own time (build.json duration_seconds), which adds
    tearing the root down.

Measured, in this order, best of --repeat runs where caches are warm:
  1. first build, nothing cached: `root = "overlay"`, the stage is unpacked into the stage cache and
     the tree exported into the tree cache (what the first build of a new stage and tag pays);
  2. baseline: `root = "extract"`, the tree cached: every build extracts the stage (the old way);
  3. cached: `root = "overlay"`, stage and tree cached (every later build of that stage and tag).
Target (issue 16): a root ready in <= 1 s when stage and tree are cached. Peak RSS of this process and
its children is reported too. Exit status 1 when the target is missed, 2 for a setup error.

    python benchmarks/bench_buildroot.py [--work DIR] [--scale 1] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import treegen  # noqa: E402

from chroot import builder  # noqa: E402
from snapshotter import config as configmod  # noqa: E402
from snapshotter.service import build as buildsvc  # noqa: E402

TAG = "2026-01-01"
READY_MAX = 1.0  # seconds: a build root ready when stage and tree are cached
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@localhost", "GIT_AUTHOR_DATE": "1767225600 +0000",
           "GIT_COMMITTER_DATE": "1767225600 +0000"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_repo(work: Path, scale: float) -> Path:
    """A bare snapshot repository with one tag holding a generated tree (cached under WORK)."""
    repo = work / f"gentoo-{scale}.git"
    if (repo / "refs" / "tags" / TAG).exists():
        return repo
    gen = treegen.Tree(scale=scale, seed=1)
    tree = work / "tree-src"
    shutil.rmtree(tree, ignore_errors=True)
    treegen.write_dir(tree, gen.snapshot())
    shutil.rmtree(repo, ignore_errors=True)
    env = {**os.environ, **GIT_ENV}
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(repo)], check=True)
    wt = ["git", f"--git-dir={repo}", f"--work-tree={tree}"]
    subprocess.run([*wt, "add", "-A"], check=True, env=env)
    subprocess.run([*wt, "commit", "-q", "-m", f"Update portage tree to {TAG}"], check=True, env=env)
    subprocess.run(["git", f"--git-dir={repo}", "tag", TAG], check=True, env=env)
    shutil.rmtree(tree)
    return repo


def write_config(work: Path, repo: Path, stage: Path, sha: str, root: str) -> configmod.Config:
    path = work / f"snapshotter-{root}.toml"
    path.write_text(f"""
repo = "{repo}"
state_dir = "{work}/state"
[build]
work_dir = "{work}/builds"
output = "{work}/out"
cache_dir = "{work}/cache"
root = "{root}"
[profiles.bench]
stage = "{stage}"
stage_sha256 = "{sha}"
emerge_args = ["--version"]
stage4 = false
""")
    return configmod.load(path)


class Clock:
    """Times one run_build(): when it started and when the namespace runner (emerge) was started."""

    def __init__(self) -> None:
        self.emerge_at = 0.0
        self._orig = builder.run_in_namespace

        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.emerge_at = time.monotonic()
            return self._orig(*args, **kwargs)

        builder.run_in_namespace = timed  # type: ignore[assignment]


def one_build(cfg: configmod.Config, clock: Clock) -> dict[str, float]:
    start = time.monotonic()
    result = buildsvc.run_build(cfg, buildsvc.BuildRequest(profile="bench", tag=TAG, deliver=False))
    end = time.monotonic()
    man = json.loads(result.manifest.read_text())
    if man["exit_status"] != 0:
        raise SystemExit(f"emerge --version failed in the build root; see {result.log}")
    return {"ready": clock.emerge_at - start, "overhead": (end - start) - man["duration_seconds"],
            "method": man["root"]["method"]}  # type: ignore[dict-item]


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/snapshotter-bench-buildroot"))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        log("bench_buildroot: needs root (builds mount and chroot)")
        return 2
    from helpers import stage as test_stage
    stage = test_stage.ensure_stage()
    sha = hashlib.sha256(stage.read_bytes()).hexdigest()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log(f"tree: generating / reusing a tree of scale {args.scale} under {work}")
    repo = make_repo(work, args.scale)
    files = int(subprocess.run(["git", f"--git-dir={repo}", "ls-tree", "-r", "--name-only", TAG],
                               capture_output=True, check=True).stdout.count(b"\n"))
    for d in ("cache", "out", "builds", "state"):
        shutil.rmtree(work / d, ignore_errors=True)
    clock = Clock()
    overlay_cfg = write_config(work, repo, stage, sha, "overlay")
    extract_cfg = write_config(work, repo, stage, sha, "extract")
    log("1. first build: stage unpacked into the stage cache, tree exported into the tree cache")
    first = one_build(overlay_cfg, clock)
    if first["method"] != "overlay":
        log("overlayfs is not available here: the builds extract their stage (see build.log)")
    log("2. baseline: the stage extracted for every build, the tree cached")
    base = [one_build(extract_cfg, clock) for _ in range(args.repeat)]
    log("3. stage and tree cached, overlay root")
    cached = [one_build(overlay_cfg, clock) for _ in range(args.repeat)]
    b_ready, c_ready = min(r["ready"] for r in base), min(r["ready"] for r in cached)
    b_over, c_over = min(r["overhead"] for r in base), min(r["overhead"] for r in cached)
    rows = [
        ("first build (nothing cached)", first["ready"], first["overhead"]),
        ("baseline: extract the stage (tree cached)", b_ready, b_over),
        ("cached stage and tree, overlay root", c_ready, c_over),
    ]
    print(f"build roots: stand-in stage {stage.stat().st_size / 1e6:.0f} MB compressed, tree of {files} files, "
          f"best of {args.repeat}; {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'':46} {'root ready':>11} {'overhead':>9}")
    for name, ready, over in rows:
        print(f"{name:46} {ready:10.2f}s {over:8.2f}s")
    ok = c_ready <= READY_MAX and cached[0]["method"] == "overlay"
    print(f"cached / baseline: root ready {c_ready / b_ready:.2f}x, overhead {c_over / b_over:.2f}x")
    print(f"target: root ready <= {READY_MAX:.1f} s when cached: {c_ready:.2f} s {'PASS' if ok else 'FAIL'}")
    print(f"peak RSS (this process or a child): {peak_rss_mb():.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"first": first, "baseline": base, "cached": cached, "files": files,
                                         "peak_rss_mb": peak_rss_mb()}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
