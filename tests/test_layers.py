"""The layer rule, read from the source with `ast`: every import of every module of snapshotter/ and chroot/
(inside functions and under `if TYPE_CHECKING:` too; relative ones resolved; `importlib.import_module`
with a literal name counted) must point down the layers:

    cli  ->  service  ->  {sync, publish, binhost}  ->  core {config, errors, lock, fsutil, logs, download,
                                                               openpgp, git, ...}
             service  ->  chroot (a library of its own: it imports nothing of snapshotter)

  * chroot imports nothing of snapshotter;
  * nothing imports snapshotter.cli but snapshotter/cli itself and snapshotter/__main__.py;
  * core modules import no feature package (sync, publish, binhost), not service, not cli, not chroot;
  * a feature package imports no other feature package, not service, not cli, not chroot (binhost gets
    the snapshot files of a build's tag from publish through service.delivery);
  * service may import the feature packages, core and chroot, not cli;
  * only snapshotter.service (and its submodules) imports chroot.

Every top-level module of snapshotter/ counts as core; a new subpackage must be given its layer below.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import testlib

PACKAGES = ("snapshotter", "chroot")
FEATURES = ("sync", "publish", "binhost")
CORE_PACKAGES = ("git",)  # subpackages of snapshotter that are core (top-level modules always are)


@dataclass(frozen=True)
class Violation:
    module: str  # the importing module
    line: int
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}) imports {self.imported}: {self.rule}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str, packages: set[str]) -> str | None:
    """The layer of a module of ours ("cli", "main", "service", "feature:NAME", "core", "chroot"), None for
    anything else (the standard library, third parties). `packages`: the subpackages of snapshotter."""
    parts = module.split(".")
    if parts[0] == "chroot":
        return "chroot"
    if parts[0] != "snapshotter":
        return None
    if len(parts) == 1:
        return "core"
    sub = parts[1]
    if sub == "__main__":
        return "main"
    if sub == "cli":
        return "cli"
    if sub == "service":
        return "service"
    if sub in FEATURES:
        return f"feature:{sub}"
    if sub in CORE_PACKAGES or sub not in packages:
        return "core"
    raise AssertionError(f"snapshotter.{sub} is a package without a layer: add it to FEATURES or CORE_PACKAGES "
                         f"in tests/test_layers.py (and to the rule in docs/architecture.md)")


def imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in `tree`. `from snapshotter import x` counts snapshotter.x (a
    subpackage decides the layer); any other `from a.b import x` counts a.b, which decides it already."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "snapshotter":
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def check_module(module: str, source: str, is_package: bool, packages: set[str]) -> list[Violation]:
    """The wrong-way imports of one module, given its source."""
    own = layer(module, packages)
    out = []
    for line, target in imports(ast.parse(source), module, is_package):
        theirs = layer(target, packages)
        if theirs is None or theirs == own:
            continue
        rule = None
        if own == "chroot":
            rule = "chroot is a library of its own and imports nothing of snapshotter"
        elif theirs == "cli" and own != "main":
            rule = "nothing imports snapshotter.cli (only snapshotter/cli itself and snapshotter/__main__.py)"
        elif theirs == "chroot" and own != "service":
            rule = "only snapshotter.service imports chroot"
        elif own == "core" and theirs != "core":
            rule = (f"core modules import no feature package ({', '.join(FEATURES)}), not service and not cli: "
                    "the layers point down")
        elif own.startswith("feature:") and theirs != "core":
            rule = (f"snapshotter.{own.split(':')[1]} imports no other feature package, not service and not cli "
                    "(what two feature packages share belongs in core)")
        if rule is not None:
            out.append(Violation(module, line, target, rule))
    return out


def check_tree(root: Path) -> list[Violation]:
    packages = {p.parent.name for p in (root / "snapshotter").glob("*/__init__.py")}
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            out += check_module(module_name(path, root), path.read_text(), path.name == "__init__.py", packages)
    return out


def test_every_import_points_down_the_layers():
    violations = check_tree(testlib.REPO_ROOT)
    assert not violations, "wrong-way imports (see the layer rule in tests/test_layers.py):\n  " + \
        "\n  ".join(map(str, violations))


def test_the_walk_sees_every_module():
    """The check reads the real tree: the modules the rule is about are all there."""
    root = testlib.REPO_ROOT
    names = {module_name(p, root) for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    assert {"snapshotter.cli", "snapshotter.__main__", "snapshotter.config", "snapshotter.git.repository",
            "snapshotter.sync.run", "snapshotter.publish.snapshots", "snapshotter.service.worker",
            "chroot.builder"} <= names


PLANTED = [
    # (importing module, is it a package, source, the import the checker must report)
    ("chroot.builder", False, "from snapshotter.config import Config\n", "snapshotter.config"),
    ("chroot.stage", False, "def f():\n    from snapshotter import lock\n", "snapshotter.lock"),
    ("snapshotter.service.worker", False, "from snapshotter.cli import setup_logging\n", "snapshotter.cli"),
    ("snapshotter.sync.run", False, "from ..cli import main\n", "snapshotter.cli"),
    ("snapshotter.config", False, "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from snapshotter.sync.run import SyncResult\n", "snapshotter.sync.run"),
    ("snapshotter.config", False, "def f():\n    import chroot.spec\n", "chroot.spec"),
    ("snapshotter.git", True, "from ..service import jobqueue\n", "snapshotter.service"),
    ("snapshotter.lock", False, "from snapshotter import publish\n", "snapshotter.publish"),
    ("snapshotter.sync.push", False, "from snapshotter.publish.snapshots import publish\n",
     "snapshotter.publish.snapshots"),
    ("snapshotter.publish.snapshots", False, "from snapshotter.sync import importer\n", "snapshotter.sync"),
    ("snapshotter.publish.snapshots", False, "from snapshotter.binhost import editions\n",
     "snapshotter.binhost"),
    ("snapshotter.publish", True, "from . import clientconfig\nfrom ..service.jobqueue import open_queue\n",
     "snapshotter.service.jobqueue"),
    ("snapshotter.binhost.builds", False, "import importlib\nimportlib.import_module('snapshotter.sync.run')\n",
     "snapshotter.sync.run"),
    ("snapshotter.cli.build", False, "from chroot.errors import ChrootError\n", "chroot.errors"),
]


@pytest.mark.parametrize(("module", "is_package", "source", "wrong"), PLANTED, ids=[p[0] + ":" + p[3] for p in PLANTED])
def test_the_checker_catches_a_planted_wrong_way_import(module: str, is_package: bool, source: str, wrong: str):
    packages = {"cli", "git", "sync", "publish", "service", "binhost"}
    found = check_module(module, source, is_package, packages)
    assert [v.imported for v in found] == [wrong], found
    assert str(found[0]).startswith(f"{module} (line ") and f"imports {wrong}: " in str(found[0])


ALLOWED = [
    ("snapshotter.__main__", False, "from snapshotter.cli import main\n"),
    ("snapshotter.cli.build", False, "from snapshotter.service.build import run_build\nfrom . import State\n"),
    ("snapshotter.service.build", False, "from chroot import builder\nfrom snapshotter.sync import run\n"
                                         "from snapshotter.publish import snapshots\nfrom snapshotter.binhost import x\n"),
    ("snapshotter.sync.run", False, "from snapshotter.git.repository import Repository\nfrom . import importer\n"
                                    "from snapshotter import openpgp, config\nimport os, requests\n"),
    ("chroot.builder", False, "from chroot import stage\nfrom .mounts import inside\nimport subprocess\n"),
    ("snapshotter.git.repository", False, "from snapshotter.errors import SnapshotterError\nfrom .export import x\n"),
]


@pytest.mark.parametrize(("module", "is_package", "source"), ALLOWED, ids=[a[0] for a in ALLOWED])
def test_the_checker_lets_the_right_way_pass(module: str, is_package: bool, source: str):
    assert check_module(module, source, is_package, {"cli", "git", "sync", "publish", "service", "binhost"}) == []


def test_a_new_package_must_be_given_a_layer():
    with pytest.raises(AssertionError, match="snapshotter.web is a package without a layer"):
        check_module("snapshotter.web.server", "import os\n", False, {"cli", "web"})
