"""The help tells the truth, and each command says each thing once: every command's --help has an example,
the main help does not promise a flag for every key, a bad --date names the option, `publish` and
`hooks install` print each event once, `status` counts "1 tag". The real CLI, in a subprocess."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import typing
from datetime import UTC, date, datetime
from pathlib import Path

import click
import pytest
from helpers import testlib

from snapshotter import config as configmod
from snapshotter.cli import main

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def commands(group: click.Group = main, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every registered command and group below `group`, as (words after `snapshotter`, command)."""
    found = []
    for name, cmd in sorted(group.commands.items()):
        found.append(((*path, name), cmd))
        if isinstance(cmd, click.Group):
            found.extend(commands(cmd, (*path, name)))
    return found


@pytest.mark.parametrize("words", [" ".join(words) for words, _ in commands()])
def test_every_command_has_an_example_in_its_help(words: str) -> None:
    proc = testlib.run_cli(*words.split(), "--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if re.match(r"^\s*Examples?( \(.*\))?:$", line)]
    assert heads, f"`snapshotter {words} --help` has no Example: block:\n{proc.stdout}"
    example = lines[heads[0] + 1]
    assert "snapshotter " in example and words.split()[-1] in example, example


def config_keys() -> set[str]:
    """Every key of the configuration file, as `section.key` (top-level keys bare; profiles aside)."""
    keys = set()
    for f in dataclasses.fields(configmod.Config):
        kind = typing.get_type_hints(configmod.Config)[f.name]
        if dataclasses.is_dataclass(kind):
            keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(kind)}
        elif f.name not in ("path", "profiles"):
            keys.add(f.name)
    return keys


def test_the_help_says_which_flags_override_which_keys_truthfully() -> None:
    proc = testlib.run_cli("--help")
    text = " ".join(proc.stdout.split())
    assert "Every option of the configuration file can be given as a flag" not in text
    assert "only some of its keys have one" in text
    keys = config_keys()
    named = set()
    for words, cmd in commands():
        for param in cmd.params:
            for key in re.findall(r"Config: ([a-z_.]+[a-z_])", getattr(param, "help", None) or ""):
                assert key in keys, (words, param.name, key)  # the key an option names exists
                named.add(key)
    assert named and keys - named, "not every key has a flag: the help says so"
    assert {"sync.timeout", "git.branch"} <= keys - named


def test_a_bad_date_names_the_option(tmp_path: Path) -> None:
    proc = testlib.run_cli("sync", "--repo", str(tmp_path / "gentoo.git"), "--date", "2026-11-20")
    assert proc.returncode == 2
    assert "Invalid value for '--date': expected YYYYMMDD, got '2026-11-20'" in proc.stderr
    assert not (tmp_path / "gentoo.git").exists()


def tag(repo: Path, name: str) -> None:
    """An annotated date tag on a new commit of the bare repository `repo` (made if missing)."""
    if not repo.exists():
        subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(repo)], check=True)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "PATH": "/usr/bin:/bin"}
    git = ["git", f"--git-dir={repo}"]
    tree = subprocess.run([*git, "mktree"], input="", capture_output=True, text=True, check=True, env=env).stdout.strip()
    commit = subprocess.run([*git, "commit-tree", tree, "-m", name], capture_output=True, text=True, check=True,
                            env=env).stdout.strip()
    subprocess.run([*git, "update-ref", "refs/heads/main", commit], check=True, env=env)
    subprocess.run([*git, "tag", "-a", "-m", name, name, commit], check=True, env=env)


def test_status_says_1_tag_and_2_tags(tmp_path: Path) -> None:
    repo = tmp_path / "gentoo.git"
    cfg = tmp_path / "snapshotter.toml"
    cfg.write_text(f'repo = "{repo}"\nstate_dir = "{tmp_path / "state"}"\n')
    tag(repo, "2026-11-19")
    proc = testlib.run_cli("--config", str(cfg), "status")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^newest tag: 2026-11-19 [0-9a-f]{40} \(1 tag\)$", proc.stdout, re.M), proc.stdout
    tag(repo, "2026-11-20")
    proc = testlib.run_cli("--config", str(cfg), "status")
    assert re.search(r"^newest tag: 2026-11-20 [0-9a-f]{40} \(2 tags\)$", proc.stdout, re.M), proc.stdout


def test_publish_prints_each_event_once(tmp_path: Path, http_mirror: testlib.HttpMirror,
                                        gpg_key: testlib.Key) -> None:
    repo = tmp_path / "gentoo.git"
    for day in (date(2026, 11, 19), date(2026, 11, 20)):
        testlib.build_snapshot(http_mirror.root, day, key=gpg_key)
        proc = testlib.run_cli("sync", "--repo", str(repo), "--mirror", http_mirror.url, "--keyring",
                               str(gpg_key.public), "--fingerprint", gpg_key.fingerprint, "--no-push",
                               "--cache-dir", str(tmp_path / "cache"), "--date", f"{day:%Y%m%d}",
                               env={"SNAPSHOTTER_NOW": str(int(NOW.timestamp()))})
        assert proc.returncode == 0, proc.stderr
    publish = ["publish", "--repo", str(repo), "--out", str(tmp_path / "www"), "--signing-key", gpg_key.fingerprint,
               "--gnupghome", str(gpg_key.home), "--xz-level", "0"]
    assert testlib.run_cli(*publish, "2026-11-19").returncode == 0
    proc = testlib.run_cli(*publish, "--all", "--keep", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # nothing said twice, once on each stream
    lines = proc.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["published", "2026-11-20"], ["pruned", "gentoo-20261119.tar.xz"], ["pruned", "gentoo-20261119.tar.xz.md5sum"],
        ["pruned", "gentoo-20261119.tar.xz.gpgsig"], ["latest", "2026-11-20"]], proc.stdout


def test_hooks_install_prints_once(tmp_path: Path) -> None:
    repo = tmp_path / "gentoo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    cfg = tmp_path / "snapshotter.toml"
    cfg.write_text(f'repo = "{repo}"\nstate_dir = "{tmp_path / "state"}"\n')
    exe = shutil.which("snapshotter")
    assert exe
    proc = testlib.run_cli("--config", str(cfg), "hooks", "install", str(repo), "--executable", exe)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout == (f"installed {repo}/hooks/pre-receive (runs {exe} --config {cfg} hooks check)\n"
                           f"installed {repo}/hooks/post-receive (runs {exe} --config {cfg} hooks enqueue)\n")
