"""The trees and snapshot tarballs of the import tests (split import, tree cache): three days with
every kind of change (deletions, mode changes, symlinks, hardlinks across parts, a top-level directory
going away), and what `git ls-tree -r` must list for them."""

from __future__ import annotations

import io
import lzma
import random
import subprocess
import tarfile
from datetime import date
from pathlib import Path

from helpers.testlib import snapshot_time, timestamp_line
from snapshotter.sync import importer

IDENTITY = importer.Identity("Split Test", "split@localhost")
DAY1, DAY2, DAY3 = date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)


def tree1() -> dict[str, tuple[str, bytes]]:
    """path -> (kind, content): a small tree with every kind of part `_unit` knows."""
    files: dict[str, tuple[str, bytes]] = {
        "header.txt": ("file", b"top-level file\n"),
        "skel.ebuild": ("file", b"# skeleton\n"),
        "eclass/a.eclass": ("file", b"eclass a\n"),
        "eclass/tests/t.sh": ("exec", b"#!/bin/sh\n"),
        "profiles/repo_name": ("file", b"gentoo\n"),
        "profiles/default/linux/make.defaults": ("file", b"ARCH=amd64\n"),
        "metadata/layout.conf": ("file", b"masters =\n"),
        "metadata/glsa/glsa-1.xml": ("file", b"<glsa/>\n"),
    }
    for c in range(6):
        cat = f"cat-{c}"
        files[f"{cat}/metadata.xml"] = ("file", f"<cat {c}/>\n".encode())
        for p in range(5):
            for v in (1, 2):
                files[f"{cat}/pkg{p}/pkg{p}-{v}.ebuild"] = ("file", f"EAPI=8 {cat} {p} {v}\n".encode() * 5)
                files[f"metadata/md5-cache/{cat}/pkg{p}-{v}"] = ("file", f"DEPEND={cat}/{p}-{v}\n".encode())
            files[f"{cat}/pkg{p}/Manifest"] = ("file", f"DIST {cat}-{p}\n".encode())
            files[f"{cat}/pkg{p}/files/init"] = ("exec", f"#!/sbin/openrc-run {p}\n".encode())
    return files


def tree2(t1: dict[str, tuple[str, bytes]]) -> dict[str, tuple[str, bytes]]:
    t = dict(t1)
    for p in [p for p in t if p.startswith(("cat-1/", "metadata/md5-cache/cat-1/"))]:
        del t[p]  # a whole category and its md5-cache part go
    del t["cat-2/pkg0/pkg0-1.ebuild"]
    del t["metadata/md5-cache/cat-2/pkg0-1"]
    t["cat-2/pkg0/pkg0-3.ebuild"] = ("file", b"EAPI=8 new version\n")
    t["metadata/md5-cache/cat-2/pkg0-3"] = ("file", b"DEPEND=new\n")
    t["cat-3/pkg1/files/init"] = ("file", t["cat-3/pkg1/files/init"][1])  # mode change only
    t["cat-4/pkg2/Manifest"] = ("file", b"DIST changed\n")
    t["cat-4/pkg2/link"] = ("symlink", b"Manifest")
    t["cat-5/pkg4/copy.ebuild"] = ("hardlink", b"cat-0/pkg0/pkg0-1.ebuild")  # a target in another part
    t["new-cat/newpkg/newpkg-1.ebuild"] = ("file", b"EAPI=8 brand new\n")
    t["metadata/md5-cache/new-cat/newpkg-1"] = ("file", b"DEPEND=\n")
    t["eclass/a.eclass"] = ("file", b"eclass a, changed\n")
    t["profiles/default/linux/make.defaults"] = ("file", b"ARCH=amd64\nCHOST=x86_64\n")
    t["header.txt"] = ("exec", b"top-level file, now executable\n")
    return t


def tree3(t2: dict[str, tuple[str, bytes]]) -> dict[str, tuple[str, bytes]]:
    t = {p: v for p, v in t2.items() if not p.startswith("eclass/")}  # a top-level directory goes
    for p in [p for p in t if p.startswith("metadata/md5-cache/")]:
        t[p] = ("file", t[p][1] + b"EAPI=8\n")  # an eclass change rewrites every md5-cache entry
    return t


def write_tarball(path: Path, day: date, tree: dict[str, tuple[str, bytes]], order: str) -> Path:
    tree = {**tree, "metadata/timestamp.x": ("file", timestamp_line(snapshot_time(day)).encode())}
    names = [n for n in sorted(tree) if tree[n][0] != "hardlink"]
    if order == "shuffled":  # real snapshots need not be sorted: parts interleave
        random.Random(day.toordinal()).shuffle(names)
    names += [n for n in sorted(tree) if tree[n][0] == "hardlink"]  # after their targets
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name in names:
            kind, data = tree[name]
            info = tarfile.TarInfo(f"gentoo/{name}")
            info.mtime = snapshot_time(day)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data.decode()
                tf.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, f"gentoo/{data.decode()}"
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o755 if kind == "exec" else 0o644
                tf.addfile(info, io.BytesIO(data))
    out = path / f"gentoo-{day:%Y%m%d}.tar.xz"
    out.write_bytes(lzma.compress(buf.getvalue()))
    return out


def expected_ls_tree(tree: dict[str, tuple[str, bytes]]) -> list[tuple[str, str, str]]:
    """(mode, blob id, path) of every file, as `git ls-tree -r` lists them."""
    out = []
    for path, (kind, data) in tree.items():
        if kind == "hardlink":
            kind, data = tree[data.decode()]
        mode = {"file": "100644", "exec": "100755", "symlink": "120000"}[kind]
        blob = subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True,
                              check=True).stdout.decode().strip()
        out.append((mode, blob, path))
    return sorted(out)


def ls_tree(repo: Path, rev: str) -> list[tuple[str, str, str]]:
    out = subprocess.run(["git", f"--git-dir={repo}", "ls-tree", "-r", "-z", rev], capture_output=True,
                         check=True).stdout.decode()
    rows = []
    for entry in filter(None, out.split("\0")):
        meta, path = entry.split("\t", 1)
        mode, _, blob = meta.split()
        if path != "metadata/timestamp.x":
            rows.append((mode, blob, path))
    return sorted(rows)
