"""Deterministic generator of realistic Gentoo ebuild trees and their daily changes (benchmark input).

Shape at scale 1.0 (measured on a real 2012 Gentoo tree, see issue 2): 155 categories, ~15,800 packages,
~114,500 files; per package median 1 ebuild (mean 1.9), 41 % with files/; median sizes ebuild 989 B,
md5-cache entry 816 B, files/* 813 B, Manifest 209 B, metadata.xml 231 B; eclass/ ~290 files of ~3 KB,
licenses/ ~600, profiles/ ~1,500, metadata/glsa ~1,600; one metadata/md5-cache/<cat>/<pf> per ebuild.

Contents are built from word and line templates with variation, so the tarball compresses like real text
(hashes in Manifests and md5-cache entries are incompressible, as in the real tree). The same seed and
scale give the same bytes: every random choice comes from one seeded `random.Random`, and the tarball
is written with `tar --sort=name`, numeric owner portage (250), fixed per-file mtimes, and a single-threaded
xz stream (`xz -T1`, one block, like Gentoo's snapshot files: decompression cannot use threads either).

Usage (writes the tarballs of consecutive days and prints the tree's shape):
    python benchmarks/treegen.py --out DIR [--scale 0.1] [--days 2] [--heavy 20000] [--seed 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

FIRST_DAY = date(2026, 11, 1)
GENERATOR_VERSION = 1  # bump when the output changes (invalidates cached tarballs)
XZ_LEVEL = 6

# --- vocabulary -------------------------------------------------------------------------------------

_SYL = ("ba co de fi gu ha ji ka lo mu ne po qu ra si tu vo wa xe yo ze an el in on ux ar er or ix "
        "th st gr pl tr sh ch br cl fl mi ta re li no sa ve ro ga pe").split()
_CAT_PREFIX = ("app dev sys net media x11 games sci www mail gnome kde xfce lxde sec gui virtual acct "
               "perl java").split()
_CAT_SUFFIX = ("admin arch misc text editors libs util shells fs apps emulation crypt office portage "
               "backup benchmarks cdr dicts doc emacs i18n laptop mobilephone pda vim xemacs accessibility "
               "antivirus forensics lang db cpp haskell java lisp lua ml perl php python ruby scheme tcltk "
               "tex vcs embedded debug firmware kernel power process boot cluster dialup dns firewall ftp "
               "irc nds news nntp p2p print proxy voip wireless sound video gfx plugins radio tv drivers "
               "base terms themes wm fonts servers client filter electronics physics chemistry biology "
               "mathematics astronomy geosciences visualization board puzzle rpg strategy action arcade "
               "engines fps simulation sports").split()
_PKG_PREFIX = ["", "", "", "", "lib", "lib", "py", "g", "k", "x", "q"]
_PKG_SUFFIX = ["", "", "", "", "", "d", "-utils", "-tools", "mm", "-bin", "fs", "-client", "-server",
               "-plugins", "-data", "2", "3"]
_ARCHES = ("alpha amd64 arm hppa ia64 m68k mips ppc ppc64 s390 sh sparc x86 amd64-fbsd x86-fbsd "
           "amd64-linux x86-linux ppc-macos x64-macos x86-solaris").split()
_USE = ("X acl alsa berkdb bzip2 cairo caps cups dbus debug doc examples gnutls gtk ipv6 jpeg kde ldap "
        "nls ncurses opengl pam perl png pulseaudio python qt4 readline selinux sqlite ssl static-libs "
        "test threads tiff truetype unicode vim-syntax xml zlib introspection policykit svg udev").split()
_LICENSES_COMMON = ("GPL-2 GPL-3 LGPL-2.1 LGPL-3 BSD BSD-2 MIT Apache-2.0 Artistic GPL-1 MPL-1.1 ZLIB "
                    "public-domain ISC as-is FDL-1.2 OFL-1.1 CC-BY-SA-3.0 PSF-2 Boost-1.0").split()
_HERDS = ("base-system desktop-misc proxy-maintainers perl python ruby java lisp haskell sound video "
          "games science kde gnome xfce netmon net-mail printing x11 mozilla qt cjk emacs vim").split()
_DEVS = ("ago jer ssuominen flameeyes vapier mgorny zmedico robbat2 hwoarang pacho tetromino chithanh "
         "jlec radhermit williamh polynomial-c ulm axs grobian idella4 patrick blueness aballier").split()
_LEGAL = ("the of to and a in is that for be any or by this software license you with program such as "
          "are may not copyright work under terms conditions distribution source code without "
          "warranty including provided notice permission granted modify redistribute copies "
          "derivative works holders contributors liability damages use merchantability fitness "
          "particular purpose express implied shall author").split()
_PHASES = ("pkg_setup src_unpack src_prepare src_configure src_compile src_test src_install "
           "pkg_preinst pkg_postinst pkg_postrm").split()

_PHASE_LINES = [
    '\tepatch "${{FILESDIR}}"/{pn}-{word}.patch\n',
    "\tsed -i -e 's:{word}:{word2}:g' {file} || die\n",
    "\teautoreconf\n",
    "\teconf \\\n\t\t$(use_enable {use}) \\\n\t\t$(use_with {use2}) \\\n\t\t--disable-{word}\n",
    '\temake CC="$(tc-getCC)" CFLAGS="${{CFLAGS}}" || die "emake failed"\n',
    '\temake DESTDIR="${{D}}" install || die\n',
    "\tdodoc AUTHORS ChangeLog NEWS README{extra}\n",
    "\tnewinitd \"${{FILESDIR}}\"/{pn}.initd {pn}\n",
    "\tnewconfd \"${{FILESDIR}}\"/{pn}.confd {pn}\n",
    "\tuse {use} && dohtml -r doc/html/*\n",
    "\tif use {use}; then\n\t\tdobin {word}/{word2} || die\n\tfi\n",
    "\tfind \"${{D}}\" -name '*.la' -exec rm -f {{}} + || die\n",
    "\tpython_convert_shebangs -r 2 \"${{ED}}\"\n",
    "\tenewgroup {pn}\n\tenewuser {pn} -1 -1 /var/lib/{pn} {pn}\n",
    "\tkeepdir /var/lib/{pn}\n\tfowners {pn}:{pn} /var/lib/{pn}\n",
    "\telog \"To use {pn} with {word2}, enable the {use} USE flag\"\n",
    "\tinsinto /usr/share/{pn}\n\tdoins -r {word} || die\n",
    "\tdefault\n",
    "\tstrip-flags\n\tappend-cppflags -D{upper}\n",
    "\tcmake-utils_src_configure\n",
    "\tlocal myconf=(\n\t\t$(usex {use} --with-{word} --without-{word})\n\t)\n",
]

_CODE_LINES = [
    "\tif (!{word}) {{\n", "\t\treturn -1;\n", "\t}}\n", "static int {word}_{word2}(struct {word} *p)\n",
    "{{\n", "}}\n", "#include <{word}.h>\n", "\t{word} = {word2}_alloc(sizeof(*{word}));\n",
    "\tfree({word});\n", "#define {upper} {num}\n", "\tfor (i = 0; i < {num}; i++)\n",
    "-\t{word}->{word2} = NULL;\n", "+\t{word}->{word2} = {word}_new();\n", "--- a/{word}/{word2}.c\n",
    "+++ b/{word}/{word2}.c\n", "@@ -{num},7 +{num},8 @@\n", " \tint {word};\n",
    "-CFLAGS = -O2 -g\n", "+CFLAGS ?= -O2\n", "AC_CHECK_LIB([{word}], [{word2}_init])\n",
    "depend() {{\n\tneed net\n\tuse logger\n}}\n", "start() {{\n\tebegin \"Starting {word}\"\n",
    "\tstart-stop-daemon --start --exec /usr/sbin/{word} -- ${{{upper}_OPTS}}\n\teend $?\n}}\n",
    "# Options to pass to {word}\n{upper}_OPTS=\"-{letter} {num}\"\n",
]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Words:
    """A deterministic pseudo-English vocabulary."""

    def __init__(self, rng: random.Random, n: int = 3000) -> None:
        seen: set[str] = set()
        while len(seen) < n:
            seen.add("".join(rng.choice(_SYL) for _ in range(rng.choice((1, 2, 2, 2, 3, 3)))))
        self.words = sorted(seen)
        # Zipf-like: a few words are very common, like in real text.
        rng.shuffle(self.words)
        self.cum = [1.0 / (i + 1) ** 0.9 for i in range(n)]
        total = 0.0
        for i, w in enumerate(self.cum):
            total += w
            self.cum[i] = total

    def pick(self, rng: random.Random) -> str:
        return rng.choices(self.words, cum_weights=self.cum)[0]

    def sentence(self, rng: random.Random, lo: int, hi: int) -> str:
        return " ".join(self.pick(rng) for _ in range(rng.randint(lo, hi)))


# --- model -------------------------------------------------------------------------------------------

@dataclass
class Entry:
    data: bytes  # file content, or the link target for symlinks
    mtime: int
    kind: str = "f"  # f: regular 0644, x: executable 0755, l: symlink


@dataclass
class Ebuild:
    pv: str
    spec: dict[str, str]
    phases: str
    eclass_md5: dict[str, str]  # the eclass md5s recorded in this ebuild's md5-cache entry
    text: bytes = b""


@dataclass
class Package:
    cat: str
    pn: str
    ebuilds: list[Ebuild] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # names under files/
    herd: str = ""


def _ver_key(pv: str) -> tuple[int, ...]:
    parts = pv.replace("-r", ".").split(".")
    return tuple(int(p) for p in parts)


class Tree:
    """The whole tree in memory (path -> Entry) plus the package model that day changes work on."""

    def __init__(self, scale: float = 1.0, seed: int = 1) -> None:
        if not 0 < scale <= 4:
            raise ValueError("scale must be in (0, 4]")
        self.scale = scale
        self.rng = random.Random(seed)
        self.words = Words(self.rng)
        self.files: dict[str, Entry] = {}
        self.packages: list[Package] = []
        self.eclasses: dict[str, str] = {}  # name -> md5 of the current file
        self.day = FIRST_DAY
        self._generate()

    # helpers
    def n(self, full: float, minimum: int = 1) -> int:
        return max(minimum, round(full * self.scale))

    def now(self) -> int:
        """timestamp.x of the snapshot named self.day (taken at 00:45 UTC the next day)."""
        d = self.day + timedelta(days=1)
        return int(datetime(d.year, d.month, d.day, 0, 45, tzinfo=UTC).timestamp())

    def old_mtime(self) -> int:
        return self.now() - self.rng.randint(86400, 5 * 365 * 86400)

    def new_mtime(self) -> int:
        return self.now() - self.rng.randint(60, 86000)

    def put(self, path: str, data: bytes, mtime: int, kind: str = "f") -> None:
        self.files[path] = Entry(data, mtime, kind)

    def _fmt(self, template: str, pn: str) -> str:
        rng, w = self.rng, self.words
        return template.format(pn=pn, word=w.pick(rng), word2=w.pick(rng), file=rng.choice(
            ("Makefile.in", "configure.ac", "Makefile", "setup.py", "src/Makefile.am")),
            use=rng.choice(_USE), use2=rng.choice(_USE), extra=rng.choice(("", " TODO", " THANKS")),
            upper=w.pick(rng).upper(), num=rng.randint(1, 4000), letter=rng.choice("abcdefghijk"))

    # --- generation of day 1 ------------------------------------------------------------------------
    def _generate(self) -> None:
        rng = self.rng
        cats: set[str] = set()
        n_cats = self.n(155, 5)
        while len(cats) < n_cats:
            cats.add(f"{rng.choice(_CAT_PREFIX)}-{rng.choice(_CAT_SUFFIX)}")
        self.categories = sorted(cats)
        self._gen_eclasses()
        self._gen_licenses()
        n_pkgs = self.n(15800, 10)
        weights = [1.0 / (i + 3) ** 0.8 for i in range(len(self.categories))]
        rng.shuffle(weights)
        names: set[tuple[str, str]] = set()
        while len(names) < n_pkgs:
            cat = rng.choices(self.categories, weights)[0]
            names.add((cat, self._pkg_name()))
        self.packages = [Package(c, p, herd=rng.choice(_HERDS)) for c, p in sorted(names)]
        for pkg in self.packages:
            n_eb = 1 if rng.random() < 0.55 else 2 + int(rng.expovariate(0.6931))  # mean 1.9
            major, minor, patch = rng.randint(0, 9), rng.randint(0, 30), rng.randint(0, 20)
            base = self._new_ebuild(pkg, f"{major}.{minor}.{patch}")
            pkg.ebuilds.append(base)
            for _ in range(n_eb - 1):
                pkg.ebuilds.append(self._variant(pkg, pkg.ebuilds[-1], self._bump(pkg.ebuilds[-1].pv)))
            if rng.random() < 0.41:
                for _ in range(1 + int(rng.expovariate(0.4228))):  # mean 2.9 files
                    self._add_file(pkg)
            self._write_package(pkg, self.old_mtime())
        self._gen_profiles()
        self._gen_metadata()
        self._write_timestamps()

    def _pkg_name(self) -> str:
        rng = self.rng
        return rng.choice(_PKG_PREFIX) + self.words.pick(rng) + rng.choice(_PKG_SUFFIX)

    def _gen_eclasses(self) -> None:
        rng, w = self.rng, self.words
        names: set[str] = set()
        n = self.n(290, 5)
        while len(names) < n:
            names.add(w.pick(rng) + rng.choice(("", "", "-utils", "-r1", "-2", "-base")))
        self.eclass_names = sorted(names)
        # popularity: a few eclasses are inherited by most ebuilds
        self.eclass_weights = [1.0 / (i + 1) ** 1.1 for i in range(n)]
        self.eclass_parents: dict[str, list[str]] = {}
        for name in self.eclass_names:
            self._write_eclass(name, self.old_mtime())

    def _eclass_md5s(self, inherit: list[str]) -> dict[str, str]:
        """md5s of the inherited eclasses and of the eclasses they inherit (as md5-cache records them)."""
        names = set(inherit)
        for e in inherit:
            names.update(self.eclass_parents.get(e, ()))
        return {e: self.eclasses[e] for e in sorted(names)}

    def _write_eclass(self, name: str, mtime: int) -> None:
        rng, w = self.rng, self.words
        lines = ["# Copyright 1999-2012 Gentoo Foundation\n",
                 "# Distributed under the terms of the GNU General Public License v2\n",
                 f"# $Header: /var/cvsroot/gentoo-x86/eclass/{name}.eclass,v 1.{rng.randint(1, 200)} $\n\n",
                 f"# @ECLASS: {name}.eclass\n# @MAINTAINER:\n# {rng.choice(_HERDS)}@gentoo.org\n",
                 f"# @BLURB: {w.sentence(rng, 4, 9)}\n# @DESCRIPTION:\n"]
        lines += [f"# {w.sentence(rng, 6, 12)}\n" for _ in range(rng.randint(2, 6))]
        parents = sorted(set(rng.sample(self.eclass_names[:20], 2)) - {name})
        self.eclass_parents[name] = parents
        lines.append(f"\ninherit {' '.join(parents)}\n\n")
        target = rng.lognormvariate(8.0, 0.4)  # ~3 KB median
        while sum(map(len, lines)) < target:
            fn = f"{name.replace('-', '_')}_{w.pick(rng)}"
            lines.append(f"# @FUNCTION: {fn}\n# @DESCRIPTION:\n# {w.sentence(rng, 5, 12)}\n{fn}() {{\n")
            lines += [self._fmt(rng.choice(_PHASE_LINES), name) for _ in range(rng.randint(2, 6))]
            lines.append("}\n\n")
        data = "".join(lines).encode()
        self.put(f"eclass/{name}.eclass", data, mtime)
        self.eclasses[name] = _md5(data)

    def _gen_licenses(self) -> None:
        rng = self.rng
        names = set(_LICENSES_COMMON)
        n = self.n(600, len(_LICENSES_COMMON))
        while len(names) < n:
            names.add(self.words.pick(rng).capitalize() + rng.choice(("", "-1.0", "-2", "-EULA", "-BSD")))
        self.licenses = sorted(names)
        for name in self.licenses:
            size = rng.lognormvariate(8.2, 0.9)
            paras = []
            total = 0
            while total < size:
                p = " ".join(rng.choice(_LEGAL) for _ in range(rng.randint(20, 80))).capitalize() + ".\n\n"
                paras.append(p)
                total += len(p)
            self.put(f"licenses/{name}", "".join(paras).encode(), self.old_mtime())

    def _gen_profiles(self) -> None:
        rng, w = self.rng, self.words
        self.put("profiles/repo_name", b"gentoo\n", self.old_mtime())
        self.put("profiles/categories", "".join(c + "\n" for c in self.categories).encode(), self.old_mtime())
        self.put("profiles/arch.list", "".join(a + "\n" for a in _ARCHES).encode(), self.old_mtime())
        self.put("profiles/use.desc", "".join(f"{u} - {w.sentence(rng, 4, 12)}\n" for u in _USE).encode(),
                 self.old_mtime())
        local = [f"{p.cat}/{p.pn}:{rng.choice(_USE)} - {w.sentence(rng, 4, 10)}\n"
                 for p in self.packages if rng.random() < 0.3]
        self.put("profiles/use.local.desc", "".join(local).encode(), self.old_mtime())
        self._write_package_mask(self.old_mtime())
        n = self.n(1500, 20) - 6
        kinds = ("make.defaults", "parent", "eapi", "packages", "package.use.mask", "use.mask",
                 "package.mask", "use.force", "package.use", "virtuals", "deprecated", "package.provided")
        dirs: list[str] = []
        i = 0
        while i < n:
            if not dirs or rng.random() < 0.25:
                parts = [rng.choice(("arch", "default", "hardened", "prefix", "releases", "uclibc", "features",
                                     "targets", "embedded"))]
                parts += [rng.choice(_ARCHES) if rng.random() < 0.5 else w.pick(rng)
                          for _ in range(rng.randint(1, 3))]
                dirs.append("profiles/" + "/".join(parts))
            d = rng.choice(dirs)
            name = rng.choice(kinds)
            path = f"{d}/{name}"
            if path in self.files:
                continue
            if name == "eapi":
                data = b"4\n"
            elif name == "parent":
                data = "".join(f"..{'/..' * rng.randint(0, 2)}/{w.pick(rng)}\n"
                               for _ in range(rng.randint(1, 3))).encode()
            else:
                data = (f"# Copyright 1999-2012 Gentoo Foundation.\n# {w.sentence(rng, 4, 10)}\n\n" + "".join(
                    f"{rng.choice(('', '-', '>=', '~'))}{self._any_atom()} {rng.choice(_USE)}\n"
                    for _ in range(rng.randint(1, 25)))).encode()
            self.put(path, data, self.old_mtime())
            i += 1
        for k in range(max(1, round(6 * self.scale))):  # a few symlinks, as in the real profiles
            d = rng.choice(dirs)
            self.put(f"{d}/link{k}", b"../" + rng.choice(dirs).split("/", 1)[1].encode(), self.old_mtime(), "l")

    def _write_package_mask(self, mtime: int) -> None:
        rng, w = self.rng, self.words
        blocks = []
        for _ in range(self.n(600, 5)):
            blocks.append(f"# {rng.choice(_DEVS)} <{rng.choice(_DEVS)}@gentoo.org> ({rng.randint(1, 28)} "
                          f"{rng.choice(('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun'))} 2012)\n# "
                          f"{w.sentence(rng, 5, 14)}\n" +
                          "".join(f"{self._any_atom()}\n" for _ in range(rng.randint(1, 4))) + "\n")
        self.put("profiles/package.mask", "".join(blocks).encode(), mtime)

    def _any_atom(self) -> str:
        p = self.rng.choice(self.packages) if self.packages else None
        return f"{p.cat}/{p.pn}" if p else f"{self.rng.choice(self.categories)}/{self.words.pick(self.rng)}"

    def _gen_metadata(self) -> None:
        rng, w = self.rng, self.words
        self.put("metadata/layout.conf", b"masters =\nthin-manifests = true\nsign-manifests = false\n",
                 self.old_mtime())
        self.put("metadata/dtd/metadata.dtd", ("<!ELEMENT pkgmetadata ( (herd|maintainer|longdescription|"
                 "use|upstream)* )>\n" * 20).encode(), self.old_mtime())
        for i in range(self.n(1600, 5)):
            ident = f"{2004 + i // 200}{(i // 17) % 12 + 1:02d}-{i % 17 + 1:02d}"
            pkg = rng.choice(self.packages)
            body = "".join(f"  <p>{w.sentence(rng, 12, 30)}</p>\n" for _ in range(rng.randint(3, 10)))
            data = (f'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE glsa SYSTEM "http://www.gentoo.org/'
                    f'dtd/glsa.dtd">\n<glsa id="{ident}">\n  <title>{pkg.pn}: {w.sentence(rng, 3, 6)}</title>\n'
                    f'  <synopsis>{w.sentence(rng, 10, 25)}</synopsis>\n  <product type="ebuild">{pkg.pn}'
                    f'</product>\n  <affected>\n    <package name="{pkg.cat}/{pkg.pn}" auto="yes" arch="*">\n'
                    f'      <unaffected range="ge">{rng.randint(1, 9)}.{rng.randint(0, 20)}</unaffected>\n'
                    f'    </package>\n  </affected>\n  <background>\n{body}  </background>\n'
                    f'  <resolution>\n    <code>\n      # emerge --sync\n      # emerge --ask --oneshot '
                    f'--verbose "&gt;={pkg.cat}/{pkg.pn}-{rng.randint(1, 9)}.{rng.randint(0, 20)}"\n'
                    f'    </code>\n  </resolution>\n</glsa>\n')
            self.put(f"metadata/glsa/glsa-{ident}.xml", data.encode(), self.old_mtime())
        self.put("header.txt", b"# Copyright 1999-2012 Gentoo Foundation\n", self.old_mtime())
        self.put("skel.ebuild", self._fmt(_PHASE_LINES[3], "skel").encode() * 20, self.old_mtime())

    def _write_timestamps(self) -> None:
        ts = self.now()
        dt = datetime.fromtimestamp(ts, UTC)
        self.put("metadata/timestamp.x", f"{ts} {dt:%a, %d %b %Y %H:%M:%S +0000}\n".encode(), ts)
        self.put("metadata/timestamp.chk", f"{dt:%a, %d %b %Y %H:%M:%S +0000}\n".encode(), ts)
        self.put("metadata/timestamp", f"{dt - timedelta(minutes=15):%a %b %d %H:%M:%S UTC %Y}\n".encode(), ts)

    # --- packages ------------------------------------------------------------------------------------
    def _bump(self, pv: str) -> str:
        parts = [int(p) for p in pv.split(".")]
        r = self.rng.random()
        if r < 0.6:
            parts[-1] += 1
        elif r < 0.9:
            parts[-2] += 1
            parts[-1] = 0
        else:
            parts[0] += 1
            parts[1:] = [0] * (len(parts) - 1)
        return ".".join(map(str, parts))

    def _new_ebuild(self, pkg: Package, pv: str) -> Ebuild:
        rng, w = self.rng, self.words
        inherit = sorted(set(rng.choices(self.eclass_names, self.eclass_weights, k=rng.randint(0, 4))))
        def atoms(k: int) -> str:
            out = []
            for _ in range(k):
                a = self._any_atom()
                if rng.random() < 0.3:
                    a = f">={a}-{rng.randint(0, 5)}.{rng.randint(0, 20)}"
                if rng.random() < 0.2:
                    a = f"{rng.choice(_USE)}? ( {a} )"
                out.append(a)
            return "\n\t".join(out)
        arches = sorted(rng.sample(_ARCHES, rng.randint(1, 12)))
        kw = " ".join(a if rng.random() < 0.6 else "~" + a for a in arches)
        site = f"{w.pick(rng)}.{rng.choice(('org', 'net', 'com', 'sourceforge.net', 'github.com'))}"
        spec = {
            "EAPI": rng.choice(("0", "2", "3", "4", "4", "4")),
            "DESCRIPTION": w.sentence(rng, 3, 10).capitalize(),
            "HOMEPAGE": f"http://{site}/{pkg.pn}/",
            "SRC_URI": f"http://{site}/download/{pkg.pn}-${{PV}}.tar.{rng.choice(('gz', 'bz2', 'xz'))}",
            "LICENSE": " ".join(rng.sample(self.licenses[:40], rng.choice((1, 1, 1, 2)))),
            "SLOT": rng.choice(("0", "0", "0", "1", "2")),
            "KEYWORDS": kw,
            "IUSE": " ".join(sorted(rng.sample(_USE, rng.randint(0, 8)))),
            "RDEPEND": atoms(rng.randint(0, 6)),
            "DEPEND": atoms(rng.randint(0, 3)),
            "INHERIT": " ".join(inherit),
        }
        phases = []
        for ph in sorted(rng.sample(_PHASES, rng.randint(0, 4)), key=_PHASES.index):
            body = "".join(self._fmt(rng.choice(_PHASE_LINES), pkg.pn) for _ in range(rng.randint(1, 5)))
            phases.append(f"{ph}() {{\n{body}}}\n")
        eb = Ebuild(pv, spec, "\n".join(phases), self._eclass_md5s(inherit))
        eb.text = self._ebuild_text(pkg, eb)
        return eb

    def _variant(self, pkg: Package, old: Ebuild, pv: str) -> Ebuild:
        """A new version: mostly the previous ebuild with a few fields changed (as real bumps are)."""
        rng = self.rng
        spec = dict(old.spec)
        spec["KEYWORDS"] = " ".join("~" + k.lstrip("~") for k in spec["KEYWORDS"].split())
        if rng.random() < 0.3:
            spec["IUSE"] = " ".join(sorted(set(spec["IUSE"].split()) | {rng.choice(_USE)}))
        eb = Ebuild(pv, spec, old.phases, self._eclass_md5s(spec["INHERIT"].split()))
        eb.text = self._ebuild_text(pkg, eb)
        return eb

    def _ebuild_text(self, pkg: Package, eb: Ebuild) -> bytes:
        s = eb.spec
        rng = self.rng
        header = (f"# Copyright 1999-2012 Gentoo Foundation\n# Distributed under the terms of the GNU General "
                  f"Public License v2\n# $Header: /var/cvsroot/gentoo-x86/{pkg.cat}/{pkg.pn}/{pkg.pn}-{eb.pv}"
                  f".ebuild,v 1.{rng.randint(1, 30)} 2012/{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d} "
                  f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} "
                  f"{rng.choice(_DEVS)} Exp $\n\nEAPI={s['EAPI']}\n\n")
        if s["INHERIT"]:
            header += f"inherit {s['INHERIT']}\n\n"
        rdep = f'RDEPEND="{s["RDEPEND"]}"\n' if s["RDEPEND"] else ""
        body = (f'DESCRIPTION="{s["DESCRIPTION"]}"\nHOMEPAGE="{s["HOMEPAGE"]}"\nSRC_URI="{s["SRC_URI"]}"\n\n'
                f'LICENSE="{s["LICENSE"]}"\nSLOT="{s["SLOT"]}"\nKEYWORDS="{s["KEYWORDS"]}"\n'
                f'IUSE="{s["IUSE"]}"\n\n{rdep}DEPEND="{"${RDEPEND}" if rdep else ""}\n\t{s["DEPEND"]}"\n\n')
        return (header + body + eb.phases).encode()

    def _cache_text(self, pkg: Package, eb: Ebuild) -> bytes:
        s = eb.spec
        phases = sorted(ph.split("_", 1)[1] for ph in _PHASES if f"{ph}()" in eb.phases)
        flat = {k: " ".join(v.split()) for k, v in s.items()}
        depend = (flat["RDEPEND"] + " " + flat["DEPEND"]).strip()
        lines = [f"DEFINED_PHASES={' '.join(phases) or '-'}", f"DEPEND={depend}",
                 f"DESCRIPTION={flat['DESCRIPTION']}", f"EAPI={s['EAPI']}", f"HOMEPAGE={flat['HOMEPAGE']}",
                 f"INHERIT={flat['INHERIT']}" if flat["INHERIT"] else "", f"IUSE={flat['IUSE']}",
                 f"KEYWORDS={flat['KEYWORDS']}", f"LICENSE={flat['LICENSE']}", f"RDEPEND={flat['RDEPEND']}",
                 f"SLOT={s['SLOT']}",
                 f"SRC_URI={flat['SRC_URI'].replace('${PV}', eb.pv)}"]
        if eb.eclass_md5:
            lines.append("_eclasses_=" + "\t".join(f"{k}\t{v}" for k, v in sorted(eb.eclass_md5.items())))
        lines.append(f"_md5_={_md5(eb.text)}")
        return ("\n".join(line for line in lines if line) + "\n").encode()

    def _manifest(self, pkg: Package) -> bytes:
        lines = []
        for eb in pkg.ebuilds:
            ext = eb.spec["SRC_URI"].rsplit(".", 1)[1]
            name = f"{pkg.pn}-{eb.pv}.tar.{ext}"
            h = hashlib.sha256(f"{pkg.cat}/{name}".encode()).digest()
            size = int.from_bytes(h[:3], "big") + 1000
            lines.append(f"DIST {name} {size} RMD160 {_md5(h)[:40].ljust(40, '0')} SHA1 "
                         f"{hashlib.sha1(h).hexdigest()} SHA256 {hashlib.sha256(h).hexdigest()}\n")
        return "".join(sorted(lines)).encode()

    def _metadata_xml(self, pkg: Package) -> bytes:
        rng = self.rng
        dev = rng.choice(_DEVS)
        maint = (f"<maintainer>\n\t<email>{dev}@gentoo.org</email>\n\t<name>{dev.capitalize()} "
                 f"{self.words.pick(rng).capitalize()}</name>\n</maintainer>\n" if rng.random() < 0.55 else "")
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE pkgmetadata SYSTEM '
                f'"http://www.gentoo.org/dtd/metadata.dtd">\n<pkgmetadata>\n<herd>{pkg.herd}</herd>\n'
                f"{maint}</pkgmetadata>\n").encode()

    def _add_file(self, pkg: Package) -> str:
        rng = self.rng
        kind = rng.choice(("patch", "patch", "patch", "initd", "confd", "conf"))
        name = {"patch": f"{pkg.pn}-{self.words.pick(rng)}.patch", "initd": f"{pkg.pn}.initd",
                "confd": f"{pkg.pn}.confd", "conf": f"{self.words.pick(rng)}.conf"}[kind]
        if name in pkg.files:
            name = f"{rng.randint(2, 99)}-{name}"
        size = rng.lognormvariate(6.7, 0.9)  # ~813 B median
        lines: list[str] = []
        while sum(map(len, lines)) < size:
            lines.append(self._fmt(rng.choice(_CODE_LINES), pkg.pn))
        pkg.files.append(name)
        self.put(f"{pkg.cat}/{pkg.pn}/files/{name}", "".join(lines).encode(), self.new_mtime() if self.day >
                 FIRST_DAY else self.old_mtime(), "x" if kind == "initd" and rng.random() < 0.5 else "f")
        return name

    def _write_package(self, pkg: Package, mtime: int) -> None:
        d = f"{pkg.cat}/{pkg.pn}"
        for eb in pkg.ebuilds:
            self.put(f"{d}/{pkg.pn}-{eb.pv}.ebuild", eb.text, mtime)
            self.put(f"metadata/md5-cache/{pkg.cat}/{pkg.pn}-{eb.pv}", self._cache_text(pkg, eb), mtime)
        self.put(f"{d}/Manifest", self._manifest(pkg), mtime)
        self.put(f"{d}/metadata.xml", self._metadata_xml(pkg), mtime)

    # --- daily changes --------------------------------------------------------------------------------
    def next_day(self, heavy: int = 0) -> dict[str, int]:
        """Advance one day with a typical day's changes (plus `heavy` extra md5-cache rewrites).

        Returns counts of what changed, by kind.
        """
        rng = self.rng
        self.day += timedelta(days=1)
        stats = dict.fromkeys(("ebuilds_added", "ebuilds_removed", "ebuilds_modified", "cache_rewritten",
                               "manifests_changed", "files_added", "packages_added"), 0)
        manifest_dirty: set[int] = set()
        # additions: version bumps (often dropping an old version) and a few new packages
        for _ in range(self.n(50)):
            if rng.random() < 0.08:
                cat = rng.choice(self.categories)
                pkg = Package(cat, self._pkg_name(), herd=rng.choice(_HERDS))
                if any(p.cat == cat and p.pn == pkg.pn for p in self.packages):
                    continue
                pkg.ebuilds.append(self._new_ebuild(pkg, f"{rng.randint(0, 3)}.{rng.randint(0, 9)}"))
                self.packages.append(pkg)
                self._write_package(pkg, self.new_mtime())
                stats["packages_added"] += 1
                stats["ebuilds_added"] += 1
                stats["manifests_changed"] += 1
                continue
            i = rng.randrange(len(self.packages))
            pkg = self.packages[i]
            newest = max(pkg.ebuilds, key=lambda e: _ver_key(e.pv))
            pv = self._bump(newest.pv)
            if any(e.pv == pv for e in pkg.ebuilds):
                continue
            pkg.ebuilds.append(self._variant(pkg, newest, pv))
            stats["ebuilds_added"] += 1
            if rng.random() < 0.2:
                self._add_file(pkg)
                stats["files_added"] += 1
            if rng.random() < 0.9:  # the bump drops the oldest version (in the same Manifest change)
                self._remove_ebuild(pkg, min(pkg.ebuilds, key=lambda e: _ver_key(e.pv)))
                stats["ebuilds_removed"] += 1
            manifest_dirty.add(i)
        # removals of old versions elsewhere (cleanup commits)
        while stats["ebuilds_removed"] < self.n(45):
            i = rng.randrange(len(self.packages))
            pkg = self.packages[i]
            if len(pkg.ebuilds) < 2:
                continue
            self._remove_ebuild(pkg, min(pkg.ebuilds, key=lambda e: _ver_key(e.pv)))
            stats["ebuilds_removed"] += 1
            manifest_dirty.add(i)
        # modifications: keywording, dependency fixes
        for _ in range(self.n(55)):
            i = rng.randrange(len(self.packages))
            pkg = self.packages[i]
            eb = rng.choice(pkg.ebuilds)
            if rng.random() < 0.6:
                kws = eb.spec["KEYWORDS"].split()
                j = rng.randrange(len(kws))
                kws[j] = kws[j].lstrip("~") if kws[j].startswith("~") else "~" + kws[j]
                eb.spec["KEYWORDS"] = " ".join(kws)
            else:
                eb.spec["RDEPEND"] = (eb.spec["RDEPEND"] + "\n\t" + self._any_atom()).strip()
            eb.text = self._ebuild_text(pkg, eb)
            self._write_package(pkg, self.new_mtime())
            stats["ebuilds_modified"] += 1
        for i in sorted(manifest_dirty):
            self._write_package(self.packages[i], self.new_mtime())
        stats["manifests_changed"] += len(manifest_dirty)
        # an eclass change: its inheritors' md5-cache entries are regenerated
        stats["cache_rewritten"] = self._eclass_change(self.n(350)) + (self._eclass_change(heavy) if heavy else 0)
        self._write_timestamps()
        return stats

    def _remove_ebuild(self, pkg: Package, eb: Ebuild) -> None:
        pkg.ebuilds.remove(eb)
        # (an ebuild added earlier the same day is not written yet)
        self.files.pop(f"{pkg.cat}/{pkg.pn}/{pkg.pn}-{eb.pv}.ebuild", None)
        self.files.pop(f"metadata/md5-cache/{pkg.cat}/{pkg.pn}-{eb.pv}", None)

    def _eclass_change(self, count: int) -> int:
        """Edit popular eclasses and rewrite the md5-cache entries of `count` ebuilds inheriting them.

        The least popular eclass with enough inheritors is edited; when no single eclass has `count`
        inheritors (a heavy day), the most popular ones are edited until `count` entries are rewritten.
        """
        rng = self.rng
        users: dict[str, list[tuple[Package, Ebuild]]] = {}
        for pkg in self.packages:
            for eb in pkg.ebuilds:
                for e in eb.eclass_md5:
                    users.setdefault(e, []).append((pkg, eb))
        ranked = sorted(users, key=lambda e: (len(users[e]), e))
        enough = [e for e in ranked if len(users[e]) >= count]
        order = enough[:1] or ranked[::-1]
        done: set[int] = set()
        mtime = self.new_mtime()
        for name in order:
            if len(done) >= count:
                break
            self._write_eclass(name, mtime)
            todo = [(p, eb) for p, eb in users[name] if id(eb) not in done]
            chosen = todo if len(todo) <= count - len(done) else rng.sample(todo, count - len(done))
            for pkg, eb in chosen:
                done.add(id(eb))
                eb.eclass_md5[name] = self.eclasses[name]
                self.put(f"metadata/md5-cache/{pkg.cat}/{pkg.pn}-{eb.pv}", self._cache_text(pkg, eb), mtime)
        return len(done)

    # --- output -------------------------------------------------------------------------------------
    def top(self) -> str:
        return f"gentoo-{self.day:%Y%m%d}"

    def snapshot(self) -> dict[str, Entry]:
        """A copy of the current file map (entries are replaced, never mutated, so a shallow copy works)."""
        return dict(self.files)

    def shape(self) -> dict[str, object]:
        """File counts and median sizes, to compare with the real tree's shape."""
        f = self.files
        def med(pred) -> int:
            sizes = [len(e.data) for p, e in f.items() if pred(p)]
            return int(statistics.median(sizes)) if sizes else 0
        n_eb = sum(len(p.ebuilds) for p in self.packages)
        return {
            "categories": len(self.categories), "packages": len(self.packages), "files": len(f),
            "ebuilds": n_eb, "ebuilds_per_package_mean": round(n_eb / len(self.packages), 2),
            "ebuilds_per_package_median": statistics.median(len(p.ebuilds) for p in self.packages),
            "with_files_dir": round(sum(1 for p in self.packages if p.files) / len(self.packages), 3),
            "median_ebuild": med(lambda p: p.endswith(".ebuild")),
            "median_md5_cache": med(lambda p: p.startswith("metadata/md5-cache/")),
            "median_files": med(lambda p: "/files/" in p),
            "median_manifest": med(lambda p: p.endswith("/Manifest")),
            "median_metadata_xml": med(lambda p: p.endswith("/metadata.xml")),
            "eclasses": sum(1 for p in f if p.startswith("eclass/")),
            "median_eclass": med(lambda p: p.startswith("eclass/")),
            "licenses": sum(1 for p in f if p.startswith("licenses/")),
            "profiles": sum(1 for p in f if p.startswith("profiles/")),
            "glsa": sum(1 for p in f if p.startswith("metadata/glsa/")),
            "content_bytes": sum(len(e.data) for e in f.values()),
        }


def write_dir(root: Path, files: dict[str, Entry], previous: dict[str, Entry] | None = None) -> None:
    """Make directory `root` hold exactly `files`; with `previous` (what root holds now) only the difference
    is written."""
    if previous is None:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        previous = {}
    for path in previous:
        if path not in files:
            (root / path).unlink()
    made: set[str] = set()
    for path, e in files.items():
        if previous.get(path) is e:
            continue
        p = root / path
        parent = path.rpartition("/")[0]
        if parent and parent not in made:
            p.parent.mkdir(parents=True, exist_ok=True)
            made.add(parent)
        if p.is_symlink() or p.exists():
            p.unlink()
        if e.kind == "l":
            p.symlink_to(e.data.decode())
            os.utime(p, (e.mtime, e.mtime), follow_symlinks=False)
            continue
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755 if e.kind == "x" else 0o644)
        try:
            os.write(fd, e.data)
            os.fchmod(fd, 0o755 if e.kind == "x" else 0o644)  # whatever the umask
        finally:
            os.close(fd)
        os.utime(p, (e.mtime, e.mtime))
    # remove directories left empty (removed packages), fixed directory mtimes for a reproducible tar
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        if not dirnames and not filenames and Path(dirpath) != root:
            os.rmdir(dirpath)


def make_tarball(parent: Path, top: str, out: Path, mtime: int, level: int = XZ_LEVEL) -> None:
    """`tar --sort=name` of parent/top, numeric owner portage (250), piped to single-threaded xz."""
    for dirpath, _dirs, _files in os.walk(parent / top):
        os.utime(dirpath, (mtime, mtime))
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        tar = subprocess.Popen(["tar", "-C", str(parent), "--sort=name", "--format=gnu", "--numeric-owner",
                                "--owner=portage:250", "--group=portage:250", "-cf", "-", top],
                               stdout=subprocess.PIPE)
        xz = subprocess.run(["xz", f"-{level}", "-T1", "-c"], stdin=tar.stdout, stdout=f)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or xz.returncode != 0:
            raise RuntimeError(f"tar/xz failed for {out}")
    tmp.rename(out)


def tarball_name(day: date) -> str:
    return f"gentoo-{day:%Y%m%d}.tar.xz"


def generate(out: Path, scale: float, seed: int, heavy: int = 0, days: int = 2,
             log=print) -> list[tuple[Path, dict[str, object]]]:
    """Write `days` consecutive typical-day tarballs (and with `heavy` one more heavy day) into `out`,
    and `out/info.json` describing them. Returns (tarball, info) per day, info holding the changes of that day (or the shape for day 1).
    """
    out.mkdir(parents=True, exist_ok=True)
    tree = Tree(scale, seed)
    work = out / "tree"
    results = []
    shape = tree.shape()
    log(f"generated day 1: {shape['files']} files, {shape['packages']} packages")
    prev: dict[str, Entry] | None = None
    old_top = ""
    plan = [0] * days + ([heavy] if heavy else [])
    for i, extra in enumerate(plan):
        info: dict[str, object]
        if i == 0:
            info = {"shape": shape}
        else:
            info = {"changes": tree.next_day(heavy=extra), "heavy": bool(extra)}
        files = tree.snapshot()
        if prev is not None:
            (work / old_top).rename(work / tree.top())
            write_dir(work / tree.top(), files, prev)
        else:
            write_dir(work / tree.top(), files)
        old_top = tree.top()
        prev = files
        tarball = out / tarball_name(tree.day)
        if not tarball.exists():  # complete tarballs of an interrupted run are kept (same bytes)
            make_tarball(work, tree.top(), tarball, tree.now())
        info["tarball_bytes"] = tarball.stat().st_size
        info["files"] = len(files)
        log(f"wrote {tarball.name}: {info['tarball_bytes'] / 1e6:.1f} MB {info.get('changes', '')}")
        results.append((tarball, info))
    shutil.rmtree(work)
    info = {"scale": scale, "seed": seed, "heavy": heavy, "generator_version": GENERATOR_VERSION,
            "days": [{"tarball": t.name, **i} for t, i in results]}
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for the tarballs")
    ap.add_argument("--scale", type=float, default=1.0, help="tree size relative to the real tree (default 1)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--days", type=int, default=2, help="typical days to write (default 2: day 1 and day 2)")
    ap.add_argument("--heavy", type=int, default=0, help="also write a heavy day rewriting N md5-cache entries")
    ap.add_argument("--shape-only", action="store_true", help="print the shape of day 1, write nothing")
    args = ap.parse_args(argv)
    if args.shape_only:
        for k, v in Tree(args.scale, args.seed).shape().items():
            print(f"{k:28} {v}")
        return 0
    generate(args.out, args.scale, args.seed, args.heavy, args.days)
    return 0


if __name__ == "__main__":
    sys.exit(main())
