"""Checks shared by the real-Portage build tests: what a build wrote (build.json against packages/, signed
gpkgs, the Packages index), and installing a build's packages into a fresh root as a client would."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from chroot import builder, portageconf
from chroot.stage import extract_stage
from helpers import signkeys, testlib
from snapshotter.config import parse_profile
from snapshotter.git.export import export_tree
from snapshotter.service import build as buildsvc


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tar_names(path: Path, *opts: str) -> list[str]:
    return subprocess.run(["tar", *opts, "-tf", str(path)], capture_output=True, text=True, check=True).stdout.split()


def check_signed_gpkg(gpkg: Path, key: testlib.Key, work: Path) -> None:
    """A gpkg signed the Portage way: detached signatures of metadata and image, a clearsigned Manifest,
    each verified by gpg with only the key's public part; the image holds nothing of the key's home."""
    names = tar_names(gpkg)
    top = names[0].split("/")[0]
    assert {f"{top}/metadata.tar.zst.sig", f"{top}/image.tar.zst.sig", f"{top}/Manifest"} <= set(names), names
    ex = work / gpkg.name
    ex.mkdir()
    subprocess.run(["tar", "-C", str(ex), "-xf", str(gpkg)], check=True)
    d = ex / top
    manifest_text = (d / "Manifest").read_bytes()
    assert manifest_text.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----")
    for sig, data in ((manifest_text, None), ((d / "image.tar.zst.sig").read_bytes(), (d / "image.tar.zst").read_bytes()),
                      ((d / "metadata.tar.zst.sig").read_bytes(), (d / "metadata.tar.zst").read_bytes())):
        r = signkeys.gpg_verify(key.public, sig, data, ex)
        assert r.returncode == 0 and f"VALIDSIG {key.fingerprint}" in r.stdout, (gpkg.name, r.stdout, r.stderr)
    image = tar_names(d / "image.tar.zst", "--zstd")
    assert not [n for n in image if "snapshotter-signing" in n or "private-keys" in n or "gnupg" in n], image


def packages_index_cpvs(index: Path) -> set[str]:
    return {line.split(": ", 1)[1] for line in index.read_text().splitlines() if line.startswith("CPV: ")}


def check_manifest(out: Path) -> dict:
    """build.json lists exactly the files of packages/ with matching hashes; returns it."""
    man = json.loads((out / "build.json").read_text())
    pkgdir = out / "packages"
    listed = {p["path"]: p for p in man["packages"]}
    on_disk = {p.relative_to(pkgdir).as_posix() for p in pkgdir.rglob("*") if p.is_file()} - {"Packages"}
    assert set(listed) == on_disk
    for rel, entry in listed.items():
        assert sha256(pkgdir / rel) == entry["sha256"], rel
        assert (pkgdir / rel).stat().st_size == entry["size"]
    assert man["packages_index"]["sha256"] == sha256(pkgdir / "Packages")
    return man


def install_packages(work: Path, stage: Path, packages: Path, trees: dict[str, tuple[Path, str]],
                     public_key: str, world: list[str]) -> tuple[Path, str]:
    """A fresh host: `stage` extracted under `work`/root, the trees (name -> (bare repository, commit);
    "gentoo" first) exported into it, the key trusted, and `emerge --usepkgonly --emptytree @world` of a copy
    of `packages`, which verifies every signature (binpkg-request-signature) and would refuse an unsigned
    package. Asserts emerge succeeded and compiled nothing; returns the root and emerge's output."""
    pkgdir = work / "packages"
    shutil.copytree(packages, pkgdir)
    root = work / "root"
    prof = parse_profile("client", {"stage": str(stage), "portage_profile": "default", "world": world,
                                    "make_conf": {"FEATURES": "binpkg-request-signature"},
                                    "emerge_args": ["--usepkgonly", "--emptytree", "@world"]}, work)
    extract_stage(stage, root)
    for name, (repo, commit) in trees.items():
        export_tree(repo, commit, root / "var/db/repos" / name)
    settings = buildsvc.portage_settings(prof)
    portageconf.write_make_conf(root, settings)
    portageconf.write_repos_conf(root, [n for n in trees if n != "gentoo"])
    portageconf.set_make_profile(root, "default", root / "var/db/repos/gentoo")
    portageconf.write_world(root, world)
    portageconf.trust_signing_key(root, public_key)
    for d in ("proc", "dev", "sys", "var/cache/binpkgs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    with open(work / "install.log", "wb") as logf:
        rc = builder.run_in_namespace(root.resolve(), pkgdir.resolve(), builder.emerge_argv(root.resolve(), settings),
                                      work / "spec.json", logf, console=False)
    text = (work / "install.log").read_text()
    assert rc == 0, text[-3000:]
    assert "Creating binpkg" not in text  # nothing was compiled
    return root, text
