"""What the binhost tests share: a snapshot repository with date tags (real git), builds in OUTPUT made
the way the builder makes them (an id from binhost.builds.allocate, packages/ with an index, build.json
written by chroot.manifest), and a configuration with a web root and a throwaway signing key."""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from chroot import manifest as manifestmod
from chroot import portageconf
from chroot.spec import PortageSettings
from helpers import testlib
from snapshotter import config, fsutil
from snapshotter.binhost import builds

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}

TAGS = ("2026-01-10", "2026-01-11", "2026-01-12")
STAGE_MAKE_CONF = (
    '# stage3 make.conf\nCOMMON_FLAGS="-O2 -pipe"\nCFLAGS="${COMMON_FLAGS}"\n'
    'PORTAGE_TMPDIR="/var/tmp"\nLC_MESSAGES=C.utf8\n'
)


def _git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["git", f"--git-dir={repo}", *args], check=True, capture_output=True,
                          env={**os.environ, **GIT_ENV, **(env or {})}).stdout.decode().strip()


def snapshot_repo(base: Path, tags: tuple[str, ...] = TAGS) -> tuple[Path, dict[str, str]]:
    """A bare repository with one commit and annotated tag per day (each tree different): (path, tag->commit)."""
    repo = base / "gentoo.git"
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(repo)], check=True)
    commits: dict[str, str] = {}
    parent: list[str] = []
    for i, tag in enumerate(tags):
        work = base / f"tree-{tag}"
        files = dict(testlib.BASE_TREE)
        files["metadata/timestamp.x"] = f"{tag}\n"
        files[f"app-misc/day/day-{i + 1}.ebuild"] = "EAPI=8\nSLOT=0\n"
        testlib.write_tree(work, files)
        env = {"GIT_WORK_TREE": str(work), "GIT_INDEX_FILE": str(base / f"index-{tag}")}
        subprocess.run(["git", f"--git-dir={repo}", "add", "-A", "."], check=True, cwd=work,
                       env={**os.environ, **GIT_ENV, **env})
        tree = _git(repo, "write-tree", env=env)
        when = f"{1768000000 + 86400 * i} +0000"
        commit = _git(repo, "commit-tree", tree, *parent, "-m", f"Update portage tree to {tag}",
                      env={"GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when})
        _git(repo, "tag", "-a", tag, "-m", tag, commit, env={"GIT_COMMITTER_DATE": when})
        _git(repo, "update-ref", "refs/heads/main", commit)
        commits[tag] = commit
        parent = ["-p", commit]
    return repo, commits


def gpkg(name: str, payload: str) -> bytes:
    return f"fake gpkg {name}: {payload}\n".encode() * 20


def write_build(output: Path, profile: str, tag: str, commit: str, *, ok: bool = True,
                packages: dict[str, bytes] | None = None, confdir: Path | None = None,
                make_conf: dict[str, str] | None = None, overlays: list[dict[str, str]] | None = None,
                repo: Path | None = None, signing_key: str | None = None,
                portage_profile: str | None = None, incremental: dict[str, object] | None = None) -> builds.Build:
    """A finished build as the builder leaves it: OUTPUT/<profile>/<id>/{packages/,build.log,build.json}."""
    build_id, path = builds.allocate(output, profile, tag)
    pkgdir = path / "packages"
    pkgdir.mkdir()
    if packages is None:
        packages = {"app-misc/hello/hello-1.0-1.gpkg.tar": gpkg("hello", build_id),
                    "sys-apps/tool/tool-2-1.gpkg.tar": gpkg("tool", build_id)}
    for rel, data in packages.items():
        (pkgdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkgdir / rel).write_bytes(data)
    index = "".join(f"CPV: {rel.removesuffix('.gpkg.tar')}\nSIZE: {len(d)}\n\n" for rel, d in sorted(packages.items()))
    (pkgdir / "Packages").write_text(f"PACKAGES: {len(packages)}\n\n{index}")
    (path / "build.log").write_text(f"build {profile} {build_id}\n")
    settings = PortageSettings(name=profile, make_conf=dict(make_conf or {"USE": "ssl -X"}), portage_confdir=confdir)
    mc = STAGE_MAKE_CONF + portageconf.make_conf_block(settings)
    if signing_key:
        mc += (f'BINPKG_FORMAT="gpkg"\nBINPKG_GPG_SIGNING_GPG_HOME="/root/.snapshotter-gnupg"\n'
               f'BINPKG_GPG_SIGNING_KEY="{signing_key}"\n')
    pkgs, idx = manifestmod.list_packages(pkgdir)
    man = manifestmod.Manifest(
        profile=profile, tag=tag, commit=commit, repo=str(repo or ""),
        stage={"source": "/stages/stage3.tar.xz", "sha256": "0" * 64}, overlays=list(overlays or []),
        portage_profile=portage_profile, make_conf={"content": mc, "sha256": manifestmod.sha256_text(mc)},
        portage_confdir=None if confdir is None else {"path": str(confdir), "sha256": fsutil.tree_hash(confdir)},
        repos_conf=portageconf.repos_conf([o["name"] for o in overlays or []]), world=None,
        emerge_command=["emerge", "--emptytree", "@world"], started="2026-01-10T01:00:00+00:00",
        finished="2026-01-10T01:10:00+00:00", duration_seconds=600.0, exit_status=0 if ok else 1, ok=ok,
        packages=pkgs, packages_index=idx, snapshotter_version="test", id=build_id, signing_key=signing_key,
        mode="full" if incremental is None else "incremental", incremental=incremental)
    manifestmod.write(man, path / "build.json")
    return builds.read_build(path)


@dataclass
class Site:
    """A configured site: snapshot repository, OUTPUT, web root, signing key, one profile `basic`."""

    base: Path
    repo: Path
    commits: dict[str, str]
    output: Path
    web_root: Path
    confdir: Path
    key: testlib.Key
    config_path: Path

    @property
    def cfg(self) -> config.Config:
        return config.load(self.config_path)

    def build(self, tag: str, profile: str = "basic", **kw: object) -> builds.Build:
        """A build signed (per build.json and make.conf) with the site's key unless `signing_key` says otherwise."""
        kw.setdefault("signing_key", self.key.fingerprint)
        return write_build(self.output, profile, tag, self.commits[tag], confdir=kw.pop("confdir", self.confdir),
                           repo=self.repo, **kw)  # type: ignore[arg-type]

    def cli(self, *args: str, env: dict[str, str] | None = None):
        return testlib.run_cli("--config", str(self.config_path), *args, env=env)


def make_site(base: Path, key: testlib.Key, extra: str = "", profiles: tuple[str, ...] = ("basic",),
              repo: tuple[Path, dict[str, str]] | None = None) -> Site:
    base.mkdir(parents=True, exist_ok=True)
    repo_path, commits = repo or snapshot_repo(base)
    confdir = base / "portage-basic"
    testlib.write_tree(confdir, {
        "package.use/ssl": "dev-libs/openssl -bindist\n",
        "package.use/zz-web": "www-servers/nginx http2\n",
        "package.accept_keywords": "app-misc/hello ~amd64\n",
        "package.env": "app-misc/hello debug.conf\n",
        "env/debug.conf": 'CFLAGS="-O0 -g"\n',
        "make.conf.ignored-by-settings": "X=1\n",
    })
    stage = base / "stage3.tar.xz"
    stage.touch()
    profile_tables = "".join(f'[profiles.{p}]\nstage = "{stage}"\nportage_confdir = "{confdir}"\n' for p in profiles)
    path = base / "snapshotter.toml"
    path.write_text(f"""repo = "{repo_path}"
state_dir = "{base / 'state'}"
[build]
output = "{base / 'output'}"
work_dir = "{base / 'work'}"
cache_dir = "{base / 'cache'}"
[publish]
xz_threads = 1
[binhost]
web_root = "{base / 'www'}"
signing_key = "{key.fingerprint}"
gnupghome = "{key.home}"
{extra}
{profile_tables}""")
    return Site(base, repo_path, commits, base / "output", base / "www", confdir, key, path)


def gpg_verify(key: testlib.Key, data: Path, signature: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """Verify with a fresh keyring holding only `key`'s public key (as a client would)."""
    home.mkdir(mode=0o700, exist_ok=True)
    testlib.HOMES.append(home)
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--import", str(key.public)], check=True,
                   capture_output=True)
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--status-fd", "1", "--verify",
                           str(signature), str(data)], capture_output=True, text=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
