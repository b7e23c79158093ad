"""Incremental builds, as the service plans them: which earlier good build's packages a new build reuses,
and the emerge arguments that reuse them (docs/build.md, "Incremental builds").

The base is the profile's newest good build. It is used only when the inputs that decide what its
packages contain are the same as this build's (make.conf settings, portage_confdir, Portage profile, world,
overlays, signing key, a pinned stage) and when the full build its chain started from is younger than
`full_every_days` (by tag date); otherwise the build is a full one, and one log line says why.

From the base's packages (its `Packages` index: CPV, REPO, PATH), every package is reused except those
whose ebuild directory changed between the base's commit and this build's in the package's repository
(`git diff-tree` of the gentoo tree and of each overlay), those that inherit an eclass that changed (found
in the tree's metadata/md5-cache; a repository without md5-cache makes an eclass change a full build),
and those whose ebuild is gone from the new tree. emerge keeps `--emptytree` (every package of @world is
merged, from the reused binary where there is one) and gets `--usepkg` with `--binpkg-respect-use=y` and
`--binpkg-changed-deps=y`, so that a binary whose USE flags or dependencies no longer match the new tree
and settings is built again rather than reused.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from chroot import portageconf
from chroot.spec import PortageSettings, Reuse, Signing
from snapshotter.binhost.builds import Build, find_build, is_id, list_builds, manifest
from snapshotter.config import Profile
from snapshotter.errors import SnapshotterError
from snapshotter.git.repository import git, tag_date

log = logging.getLogger(__name__)

GENTOO = "gentoo"  # the repository name of the main tree (its place in the root: /var/db/repos/gentoo)
# What an incremental build adds to the profile's emerge arguments (docs/build.md).
REUSE_ARGS = ("--usepkg", "--binpkg-respect-use=y", "--binpkg-changed-deps=y")
# With reverse dependencies asked for: a package whose build-time dependency is built from source is built
# from source too (emerge(1) --rebuild-if-unbuilt).
REVERSE_DEPS_ARGS = ("--rebuild-if-unbuilt=y",)
# Signing variables of the builder's make.conf block: the signing key is compared on its own (build.json's
# signing_key); the rest only says how gpg is run, not what a package contains.
_SIGNING_VARS = frozenset({"BINPKG_GPG_SIGNING_GPG_HOME", "BINPKG_GPG_SIGNING_KEY",
                           "BINPKG_GPG_SIGNING_BASE_COMMAND"})
# Top-level directories of an ebuild repository that hold no packages.
_NOT_CATEGORIES = frozenset({"eclass", "metadata", "profiles", "licenses", "scripts"})
_VERSION_RE = re.compile(r"-([0-9]+(?:\.[0-9]+)*[a-z]?(?:_(?:alpha|beta|pre|rc|p)[0-9]*)*(?:-r[0-9]+)?)$")
_BINPKG_SUFFIXES = (".gpkg.tar", ".tbz2", ".xpak")
_MD5_CACHE = "metadata/md5-cache"


class FullBuild(Exception):
    """Why this build cannot be incremental (the log line's reason)."""


def split_pf(pf: str) -> tuple[str, str]:
    """(PN, PV with revision) of a package name with its version (`hello-1.0-r1`); ValueError otherwise."""
    m = _VERSION_RE.search(pf)
    if not m or m.start() == 0:
        raise ValueError(f"not a versioned package name: {pf!r}")
    return pf[:m.start()], m[1]


@dataclass(frozen=True)
class Binpkg:
    """One entry of the base build's Packages index."""

    cpv: str  # CAT/PF
    repo: str
    path: str  # the file, relative to packages/
    build_deps: frozenset[str] = frozenset()  # CAT/PN named in DEPEND and BDEPEND (every USE branch)

    @property
    def cat_pn(self) -> str:
        cat, pf = self.cpv.split("/", 1)
        return f"{cat}/{split_pf(pf)[0]}"

    @property
    def ebuild(self) -> str:
        cat, pf = self.cpv.split("/", 1)
        return f"{self.cat_pn}/{pf}.ebuild"


def read_index(text: str, files: dict[str, str]) -> list[Binpkg]:
    """The packages of a `Packages` index that are files of the build (`files`: its build.json's list).
    An entry without PATH is CPV plus the binary package suffix of the file that exists."""
    out = []
    for block in text.split("\n\n")[1:]:  # the first block is the index's header
        entry: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(": ")
            if sep:
                entry[key] = value
        cpv = entry.get("CPV", "")
        if "/" not in cpv:
            continue
        path = entry.get("PATH") or next((cpv + s for s in _BINPKG_SUFFIXES if cpv + s in files), "")
        if path not in files:
            continue
        try:
            split_pf(cpv.split("/", 1)[1])
        except ValueError:
            continue
        deps = dep_names(entry.get("DEPEND", "") + " " + entry.get("BDEPEND", ""))
        out.append(Binpkg(cpv, entry.get("REPO", ""), path, frozenset(deps)))
    return out


def dep_names(depend: str) -> set[str]:
    """CAT/PN of every atom of a dependency string (blockers, USE conditionals and || groups included)."""
    out = set()
    for token in depend.split():
        if token in ("(", ")", "||") or token.endswith("?") or "/" not in token:
            continue
        bare = token.lstrip("!")
        atom = bare.lstrip("<>=~")
        atom = atom.split("[", 1)[0].split("::", 1)[0].split(":", 1)[0].removesuffix("*")
        cat, _, rest = atom.partition("/")
        if bare[:1] in ("<", ">", "=", "~"):  # a version operator: CAT/PN-VERSION
            try:
                rest = split_pf(rest)[0]
            except ValueError:
                continue
        out.add(f"{cat}/{rest}")
    return out


def _block_vars(text: str) -> dict[str, str]:
    """VAR -> raw value of the builder's make.conf block (the last one in `text`), signing variables aside."""
    header = portageconf.make_conf_block(PortageSettings(name="x")).splitlines()[0].split("(profile", 1)[0]
    at = text.rfind(header)
    out: dict[str, str] = {}
    if at < 0:
        return out
    for line in text[at:].splitlines():
        var, sep, value = line.partition("=")
        if sep and not line.startswith("#") and var not in _SIGNING_VARS:
            out[var] = value
    return out


def changed_settings(base: Build, data: dict[str, Any], profile: Profile, settings: PortageSettings,
                     overlays: dict[str, str], signing: Signing | None) -> list[str]:
    """The inputs that decide what the packages contain and differ between the base build (its build.json
    `data`) and this build: make_conf, portage_confdir, portage_profile, world, overlays, signing_key, stage."""
    changed = []
    mc = data.get("make_conf")
    recorded = _block_vars(mc.get("content", "") if isinstance(mc, dict) else "")
    if not recorded or recorded != _block_vars(portageconf.make_conf_block(settings, signing)):
        changed.append("make_conf")
    conf = data.get("portage_confdir")
    if (conf.get("sha256") if isinstance(conf, dict) else None) != settings.portage_confdir_sha256:
        changed.append("portage_confdir")
    if data.get("portage_profile") != settings.portage_profile:
        changed.append("portage_profile")
    if data.get("world") != settings.world:
        changed.append("world")
    if sorted(name for name, _ in base.overlays) != sorted(overlays):
        changed.append("overlays")
    if base.signing_key != (None if signing is None else signing.fingerprint):
        changed.append("signing_key")
    stage = data.get("stage")
    if profile.stage_build is None and profile.stage_sha256 is not None and \
            (stage.get("sha256") if isinstance(stage, dict) else None) != profile.stage_sha256:
        changed.append("stage")
    return changed


def full_build_of(output: Path, base: Build) -> Build | None:
    """The full build at the start of `base`'s chain (base itself when it is full); None when a link of the
    chain is gone (purged) or unreadable."""
    seen = set()
    b = base
    while True:
        try:
            data = manifest(b)
        except SnapshotterError:
            return None
        if data.get("mode", "full") != "incremental":
            return b
        inc = data.get("incremental")
        nxt = inc.get("base") if isinstance(inc, dict) else None
        if not isinstance(nxt, str) or not is_id(nxt) or nxt in seen:
            return None
        seen.add(nxt)
        try:
            b = find_build(output, base.profile, nxt)
        except SnapshotterError:
            return None


@dataclass
class _Tree:
    """One ebuild repository of the build: where its git history is, the base's commit and this build's."""

    name: str
    repo: Path
    old: str
    new: str
    changed_dirs: set[str] = field(default_factory=set)  # CAT/PN whose directory (or md5-cache) changed
    eclasses: set[str] = field(default_factory=set)  # eclass names whose file changed


def _diff(tree: _Tree) -> None:
    if git(tree.repo, "cat-file", "-e", f"{tree.old}^{{commit}}", check=False).returncode != 0:
        raise FullBuild(f"the base build's commit {tree.old[:12]} of {tree.name} is not in {tree.repo}")
    if tree.old == tree.new:
        return
    out = git(tree.repo, "diff-tree", "-r", "--name-only", "--no-renames", "-z", tree.old, tree.new).stdout
    for path in out.decode(errors="surrogateescape").split("\0"):
        parts = path.split("/")
        if len(parts) == 2 and parts[0] == "eclass" and parts[1].endswith(".eclass"):
            tree.eclasses.add(parts[1].removesuffix(".eclass"))
        elif len(parts) == 4 and path.startswith(_MD5_CACHE + "/"):
            try:
                tree.changed_dirs.add(f"{parts[2]}/{split_pf(parts[3])[0]}")
            except ValueError:
                pass
        elif len(parts) >= 3 and parts[0] not in _NOT_CATEGORIES and not parts[0].startswith(".") \
                and parts[-1] != "metadata.xml":
            tree.changed_dirs.add(f"{parts[0]}/{parts[1]}")


def _ere(name: str) -> str:
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", name)


def _inheritors(tree: _Tree, eclasses: set[str]) -> set[str]:
    """CAT/PN of the packages of `tree` (at its new commit) whose md5-cache entry lists one of `eclasses`."""
    has_cache = git(tree.repo, "ls-tree", "--name-only", tree.new, "--", _MD5_CACHE, check=False).stdout.strip()
    if not has_cache:
        raise FullBuild(f"eclass {', '.join(sorted(eclasses))} changed and {tree.name} has no {_MD5_CACHE} to "
                        "tell which packages inherit it")
    pattern = "^_eclasses_=(.*\t)?(" + "|".join(_ere(e) for e in sorted(eclasses)) + ")\t"
    proc = git(tree.repo, "grep", "-l", "-E", "-e", pattern, tree.new, "--", _MD5_CACHE, check=False)
    if proc.returncode not in (0, 1):
        raise FullBuild(f"git grep in {tree.name} failed: {proc.stderr.decode(errors='replace').strip()}")
    out = set()
    for line in proc.stdout.decode(errors="surrogateescape").splitlines():
        parts = line.split(":", 1)[-1].split("/")
        if len(parts) == 4:
            try:
                out.add(f"{parts[2]}/{split_pf(parts[3])[0]}")
            except ValueError:
                pass
    return out


def _ebuilds(tree: _Tree, dirs: list[str]) -> set[str]:
    """The files below `dirs` (CAT/PN) in `tree` at its new commit."""
    out: set[str] = set()
    for i in range(0, len(dirs), 500):
        proc = git(tree.repo, "ls-tree", "-r", "--name-only", "-z", tree.new, "--", *dirs[i:i + 500])
        out.update(p for p in proc.stdout.decode(errors="surrogateescape").split("\0") if p)
    return out


def emerge_args(settings: PortageSettings, reverse_deps: bool = False) -> list[str]:
    """The profile's emerge arguments with the reuse options in front (those already given are not doubled)."""
    given = {a.split("=", 1)[0] for a in settings.emerge_args}
    extra = [a for a in (*REUSE_ARGS, *(REVERSE_DEPS_ARGS if reverse_deps else ())) if a.split("=", 1)[0] not in given]
    return [*extra, *settings.emerge_args]


def _choose(profile: Profile, settings: PortageSettings, *, output: Path, repo: Path, commit: str, tag: str | None,
            overlays: dict[str, str], overlay_repos: dict[str, Path], signing: Signing | None,
            reverse_deps: bool) -> Reuse:
    good = [b for b in list_builds(output, profile.name) if b.ok]
    if not good:
        raise FullBuild("no good build yet")
    base = good[-1]
    data = manifest(base)
    changed = changed_settings(base, data, profile, settings, overlays, signing)
    if changed:
        raise FullBuild(f"settings changed since {base.id} ({', '.join(changed)})")
    full = full_build_of(output, base)
    if full is None:
        raise FullBuild(f"the full build that {base.id} goes back to is gone (purged)")
    this_day, full_day = tag_date(tag or ""), tag_date(full.tag)
    if profile.full_every_days and this_day is not None and full_day is not None:
        age = (this_day - full_day).days
        if age >= profile.full_every_days:
            raise FullBuild(f"last full build {full.id} is {age} days old")
    index = base.packages_dir / "Packages"
    if index.is_symlink() or not index.is_file():
        raise FullBuild(f"build {base.id} has no Packages index")
    pkgs = read_index(index.read_text(errors="replace"), base.package_files)
    if not pkgs:
        raise FullBuild(f"build {base.id} has no packages to reuse")
    base_overlays = dict(base.overlays)
    if base.commit is None:
        raise FullBuild(f"build {base.id} records no commit")
    trees = {GENTOO: _Tree(GENTOO, repo, base.commit, commit)}
    for name, new in overlays.items():
        if name not in overlay_repos:
            raise FullBuild(f"no repository known for overlay {name}")
        trees[name] = _Tree(f"overlay {name}", overlay_repos[name], base_overlays[name], new)
    try:
        for t in trees.values():
            _diff(t)
        eclasses = set().union(*(t.eclasses for t in trees.values()))
        reasons: dict[str, str] = {}
        if eclasses:
            # An eclass of one repository may be inherited by the packages of every repository (masters).
            used = {p.repo for p in pkgs}
            for name, t in trees.items():
                if name in used:
                    for cat_pn in _inheritors(t, eclasses):
                        reasons.setdefault(f"{name}:{cat_pn}", "eclass changed")
        for name, t in trees.items():
            for cat_pn in t.changed_dirs:
                reasons[f"{name}:{cat_pn}"] = "ebuild changed"
        gone: set[str] = set()
        for name, t in trees.items():
            mine = [p for p in pkgs if p.repo == name]
            present = _ebuilds(t, sorted({p.cat_pn for p in mine}))
            gone.update(p.path for p in mine if p.ebuild not in present)
    except SnapshotterError as e:
        raise FullBuild(f"cannot compare with {base.id}: {e}") from None
    why: dict[str, str] = {}
    for p in pkgs:
        reason = reasons.get(f"{p.repo}:{p.cat_pn}")
        if reason is None and p.path in gone:
            reason = "ebuild gone"
        if p.repo not in trees:
            reason = f"repository {p.repo or '?'} not in this build"
        if reason is not None:
            why[p.path] = reason
    if reverse_deps:
        # What build-depends on a package built from source is built too (the closure; as emerge's
        # --rebuild-if-unbuilt does, which is passed as well): decided here, so that no stale binary of it is
        # linked into the new build beside the one emerge makes.
        while True:
            built = {p.cat_pn for p in pkgs if p.path in why}
            more = {p.path: f"build-depends on {', '.join(sorted(p.build_deps & built))}"
                    for p in pkgs if p.path not in why and p.build_deps & built}
            if not more:
                break
            why.update(more)
    reuse = [p.path for p in pkgs if p.path not in why]
    dropped = [f"{p.cpv}::{p.repo} ({why[p.path]})" for p in pkgs if p.path in why]
    log.info("incremental: on build %s: reusing %d of %d packages; building again: %s", base.id, len(reuse),
             len(pkgs), ", ".join(sorted(dropped)) or "none")
    return Reuse(base_build=base.id, base_packages=base.packages_dir, paths=sorted(reuse))


def plan(profile: Profile, settings: PortageSettings, *, incremental: bool | None, output: Path, repo: Path,
         commit: str, overlays: dict[str, str], signing: Signing | None, tag: str | None = None,
         overlay_repos: dict[str, Path] | None = None,
         reverse_deps: bool = False) -> tuple[PortageSettings, Reuse | None]:
    """The settings (emerge arguments) and the packages to reuse for a build of `profile` at `commit` (the tag
    `tag`; overlays: name -> commit, their bare repositories in `overlay_repos`). `incremental`: the request's
    choice (None: the profile's mode). A full build returns (settings, None); the reason why an incremental
    build was not possible is logged (one line). `reverse_deps`: rebuild the reverse build-time dependencies of
    what is built from source too (emerge --rebuild-if-unbuilt)."""
    wanted = profile.mode == "incremental" if incremental is None else incremental
    if not wanted:
        return settings, None
    try:
        reuse = _choose(profile, settings, output=output, repo=repo, commit=commit, tag=tag, overlays=overlays,
                        overlay_repos=overlay_repos or {}, signing=signing, reverse_deps=reverse_deps)
    except FullBuild as e:
        log.info("incremental: %s; full build", e)
        return settings, None
    return replace(settings, emerge_args=emerge_args(settings, reverse_deps)), reuse
