"""`snapshotter rebuild`: rebuild a build from the inputs its build.json pinned, as a new build, and
compare the two by content (docs/build.md, "Reproducibility check").

The pinned inputs are taken from the original's build.json, not from today's configuration: the stage
(source and sha256), the tag's commit (the tag must still point at it), each overlay's commit, the
Portage profile, the world and the emerge command. The profile's make_conf and signing key come from
the configuration (build.json records the resulting make.conf only as a whole file): the rebuild's
make.conf is compared with the original's afterwards and a difference is reported as a changed input.
portage_confdir is a directory on the host: its hash must still match, else nothing is built.

The rebuild is an ordinary build through service.build.run_build (its own id TAG.N+1, its own directory,
the profile's lock), except that it never moves an edition. The comparison is binhost.compare's.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from chroot import manifest as manifestmod
from snapshotter.binhost import compare
from snapshotter.binhost.builds import BUILD_JSON, PACKAGES, find_build, is_id
from snapshotter.config import Config
from snapshotter.errors import BuildFailed, ConfigError, SnapshotterError
from snapshotter.fsutil import atomic_write, tree_hash
from snapshotter.git.repository import Repository
from snapshotter.service.build import BuildRequest, resolve_profile, run_build

log = logging.getLogger(__name__)

REPORT_PREFIX = "rebuild-of-"


@dataclass
class Original:
    path: Path  # the build's directory
    manifest: manifestmod.Manifest

    @property
    def id(self) -> str:
        return self.manifest.id or self.path.name


@dataclass
class RebuildReport:
    original: Original
    rebuild_id: str
    rebuild_dir: Path
    comparison: compare.Comparison
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {original, rebuild, same}
    report_path: Path | None = None
    diffoscope: bool = False  # diffoscope was installed and ran for the differing packages

    @property
    def changed_inputs(self) -> list[str]:
        return [name for name, v in self.inputs.items() if not v["same"]]

    @property
    def exit_status(self) -> int:
        return 0 if self.comparison.identical and not self.changed_inputs else 1

    def summary(self) -> str:
        what = f"rebuild {self.rebuild_id} of {self.original.manifest.profile} {self.original.id}"
        line = f"{what}: {self.comparison.summary()}"
        if self.changed_inputs:
            line += f"; inputs changed: {', '.join(self.changed_inputs)}"
        verdict = "reproducible" if self.exit_status == 0 else "NOT reproducible"
        return f"{line}: {verdict}"

    def to_dict(self) -> dict[str, Any]:
        data = self.comparison.to_dict()
        data.update({"profile": self.original.manifest.profile, "original_id": self.original.id,
                     "rebuild_id": self.rebuild_id, "original": str(self.original.path),
                     "rebuild": str(self.rebuild_dir), "inputs": self.inputs,
                     "reproducible": self.exit_status == 0, "exit_status": self.exit_status,
                     "summary_line": self.summary()})
        return data

    def text(self) -> list[str]:
        lines = [f"original: {self.original.path}", f"rebuild:  {self.rebuild_dir}",
                 "rule (what is compared, what is ignored as volatile):", *[f"  - {r}" for r in compare.RULE]]
        for name in self.changed_inputs:
            v = self.inputs[name]
            lines.append(f"input changed: {name}: {v['original']} -> {v['rebuild']}")
        lines += self.comparison.text()
        differing = [p for p in self.comparison.packages if p.status == compare.DIFFERS]
        if differing and not self.diffoscope:
            p = differing[0]
            lines.append("detail of a differing package: diffoscope is not installed here; install it and run: "
                         + compare.diffoscope_hint(self.original.path / PACKAGES / str(p.original),
                                                   self.rebuild_dir / PACKAGES / str(p.rebuild)))
        if self.report_path is not None:
            lines.append(f"report: {self.report_path}")
        lines.append(self.summary())
        return lines


def find_original(cfg: Config, what: str, profile: str | None) -> Original:
    """The build to redo: an id (with `profile`) below [build].output, or a path to a build.json or to a
    build's directory. It must be a good build (build.json format 2, "ok": true)."""
    if is_id(what):
        if profile is None:
            raise ConfigError(f"rebuild {what}: --profile is needed with a build id (or give the path of its "
                              "build.json)")
        build = find_build(cfg.build.output, profile, what)
        path = build.path
    else:
        p = Path(what)
        path = p.parent if p.name == BUILD_JSON else p
        if not (path / BUILD_JSON).is_file():
            raise SnapshotterError(f"{what}: neither a build id nor a build directory or build.json")
    path = path.resolve()
    try:
        man = manifestmod.load(path / BUILD_JSON)
    except (OSError, ValueError, TypeError) as e:
        raise SnapshotterError(f"{path / BUILD_JSON}: cannot read it: {e}") from None
    if profile is not None and man.profile != profile:
        raise ConfigError(f"{path}: a build of profile {man.profile}, not {profile}")
    if not man.ok:
        raise SnapshotterError(f"build {man.profile} {man.id or path.name} failed; only a good build can be "
                               "rebuilt and compared")
    if not (path / PACKAGES).is_dir():
        raise SnapshotterError(f"build {man.profile} {man.id or path.name} has no packages/ directory")
    return Original(path, man)


def pinned_config(cfg: Config, man: manifestmod.Manifest) -> tuple[Config, dict[str, str]]:
    """A copy of `cfg` whose profile builds what `man` recorded, and the overlay refs (commits) to pin.

    SnapshotterError (one line, nothing built) when the recorded inputs cannot be had again: an unknown
    profile, overlays that are no longer the profile's, a changed portage_confdir, a stage without a
    recorded sha256, a tag that points elsewhere now."""
    prof = resolve_profile(cfg, man.profile)
    names = sorted(o.name for o in prof.overlays)
    recorded = sorted(o["name"] for o in man.overlays)
    if names != recorded:
        raise SnapshotterError(f"profile {man.profile}: its overlays are {names} now, build {man.id} used "
                               f"{recorded}; cannot pin them")
    refs = {o["name"]: o["commit"] for o in man.overlays}
    conf = man.portage_confdir
    if conf is None and prof.portage_confdir is not None:
        raise SnapshotterError(f"profile {man.profile}: portage_confdir {prof.portage_confdir} is set now, build "
                               f"{man.id} had none")
    if conf is not None:
        if prof.portage_confdir is None or not prof.portage_confdir.is_dir():
            raise SnapshotterError(f"profile {man.profile}: portage_confdir {conf['path']} of build {man.id} is "
                                   "gone or no longer configured")
        now = tree_hash(prof.portage_confdir)
        if now != conf["sha256"]:
            raise SnapshotterError(f"profile {man.profile}: portage_confdir {prof.portage_confdir} changed since "
                                   f"build {man.id} (sha256 {conf['sha256'][:12]} then, {now[:12]} now); "
                                   "restore it to rebuild")
    stage = man.stage
    if not isinstance(stage, dict) or not stage.get("sha256") or not stage.get("source"):
        raise SnapshotterError(f"build {man.id}: build.json records no stage sha256; cannot pin its stage")
    if not man.emerge_command or man.emerge_command[0] != "emerge":
        raise SnapshotterError(f"build {man.id}: build.json's emerge_command is not an emerge command")
    # The stage exactly as recorded: a seeded build's source is its seed's stage4 file, not `latest-build`.
    pinned = replace(prof, stage=str(stage["source"]), stage_sha256=str(stage["sha256"]),
                     portage_profile=man.portage_profile, world=None if man.world is None else list(man.world),
                     emerge_args=list(man.emerge_command[1:]))
    out = copy.copy(cfg)
    out.profiles = {**cfg.profiles, man.profile: pinned}
    return out, refs


def check_tag(cfg: Config, man: manifestmod.Manifest) -> None:
    tag = Repository(cfg.repo, cfg.git.branch).require().find_tag(man.tag)
    if tag.commit != man.commit:
        raise SnapshotterError(f"tag {man.tag} points at {tag.commit} now, build {man.id} used {man.commit}; "
                               "cannot rebuild it from that tag")


def compare_inputs(old: manifestmod.Manifest, new: manifestmod.Manifest) -> dict[str, dict[str, Any]]:
    """The pinned inputs of both builds side by side (what went in must be the same for the comparison
    of what came out to mean anything)."""
    def digest(v: dict[str, Any] | None) -> Any:
        return None if v is None else v.get("sha256")

    pairs: dict[str, tuple[Any, Any]] = {
        "stage.sha256": (old.stage.get("sha256"), new.stage.get("sha256")),
        "commit": (old.commit, new.commit),
        "overlays": ({o["name"]: o["commit"] for o in old.overlays}, {o["name"]: o["commit"] for o in new.overlays}),
        "make.conf": (digest(old.make_conf), digest(new.make_conf)),
        "portage_confdir": (digest(old.portage_confdir), digest(new.portage_confdir)),
        "portage_profile": (old.portage_profile, new.portage_profile),
        "world": (old.world, new.world),
        "emerge_command": (old.emerge_command, new.emerge_command),
    }
    return {k: {"original": a, "rebuild": b, "same": a == b} for k, (a, b) in pairs.items()}


def rebuild(cfg: Config, what: str, profile: str | None = None, *, report: Path | None = None,
            console: bool = False) -> RebuildReport:
    """Rebuild the build `what` (an id of `profile`, or a build.json path) from its pinned inputs as a
    new build, compare the packages and write the JSON report (default: `rebuild-of-<ID>.json` in the
    new build's directory). An emerge failure of the rebuild raises BuildFailed (exit 4)."""
    original = find_original(cfg, what, profile)
    man = original.manifest
    pinned_cfg, refs = pinned_config(cfg, man)
    check_tag(pinned_cfg, man)
    log.info("rebuilding %s %s from its pinned inputs (tag %s at %s, stage %s)", man.profile, original.id,
             man.tag, man.commit[:12], man.stage["sha256"][:12])
    # Always a full build: an incremental one would reuse the very packages it is to compare.
    result = run_build(pinned_cfg, BuildRequest(profile=man.profile, tag=man.tag, overlay_refs=refs,
                                                deliver=False, stage4=False, incremental=False), console=console)
    if not result.ok:
        raise BuildFailed(f"rebuild {result.build_id} of {man.profile} {original.id} failed (emerge exit status "
                          f"{result.exit_status}); log: {result.log}")
    new_dir = result.output_dir
    new_man = manifestmod.load(new_dir / BUILD_JSON)
    detail_dir = new_dir / f"{REPORT_PREFIX}{original.id}.diffoscope"
    comparison = compare.compare_dirs(original.path / PACKAGES, new_dir / PACKAGES, diffoscope_dir=detail_dir)
    rep = RebuildReport(original, result.build_id, new_dir, comparison, compare_inputs(man, new_man),
                        diffoscope=detail_dir.is_dir())
    rep.report_path = report if report is not None else new_dir / f"{REPORT_PREFIX}{original.id}.json"
    write_report(rep, rep.report_path)
    return rep


def write_report(rep: RebuildReport, path: Path) -> None:
    data = json.dumps(rep.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(path, data.encode(), durable=False)
