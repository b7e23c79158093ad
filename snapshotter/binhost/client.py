"""What a client host of an edition needs: `snapshotter client-config --profile P --edition E --url URL`.

A client follows one (profile, edition) at the edition's URL (its document root, WEB_ROOT/E/P, as the host
reaches it). `client_config` makes the files, laid out as on the client (paths relative to its /):

    README                                    the exact commands, in order (install, trust the key, run, cron)
    etc/snapshotter-client.conf               URL, PROFILE, EDITION, SIGNING_KEY (+ CERT, KEY, CA) for the script
    usr/local/sbin/snapshotter-autoupdate     the update script (autoupdate.sh; the same bytes for every client)
    etc/portage/snapshotter-signing-key.asc   the profile's signing key (public part, armored)
    etc/portage/binrepos.conf/snapshotter-tls.conf   with a client certificate: fetchcommand/resumecommand for
                                              the [snapshotter] binary repository (Portage's own HTTP code sends
                                              no client certificate); the script never touches this file

The rest of /etc/portage (make.conf, repos.conf/snapshotter.conf, binrepos.conf/snapshotter.conf,
package.*/snapshotter, env/) comes from each build's signed settings tarball, installed by the script; the
README shows what repos.conf and binrepos.conf will say. The same inputs give the same bytes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from snapshotter.binhost import settings
from snapshotter.binhost.builds import Build
from snapshotter.binhost.editions import check_edition
from snapshotter.config import NAME_RE, Config, signing_for
from snapshotter.errors import ConfigError, SnapshotterError
from snapshotter.fsutil import atomic_write
from snapshotter.openpgp import export_public_key

SCRIPT = "usr/local/sbin/snapshotter-autoupdate"
CLIENT_CONF = "etc/snapshotter-client.conf"
KEY_FILE = settings.CLIENT_KEY_PATH.lstrip("/")  # etc/portage/snapshotter-signing-key.asc
TLS_BINREPOS = "etc/portage/binrepos.conf/snapshotter-tls.conf"
README = "README"
PORTAGE_GNUPG = "/etc/portage/gnupg"
STATE_DIR = "/var/lib/snapshotter-client"
CRON_FILE = "/etc/cron.d/snapshotter-autoupdate"
# wget's default is 20 tries: a refused certificate then takes about 2.5 minutes to fail (docs/tls.md).
WGET_TRIES = 3
WGET_TIMEOUT = 60

# What the update script accepts in its configuration file (no quoting there, no spaces).
_VALUE = r"[A-Za-z0-9._:/@%+~,\[\]-]+"
_URL_RE = re.compile(rf"^https?://{_VALUE}$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9._/+@%~,-]+$")


@dataclass(frozen=True)
class ClientTLS:
    """Where the client keeps its certificate, its key and the server's CA (paths on the client)."""

    cert: str
    key: str
    ca: str


@dataclass(frozen=True)
class ClientFile:
    path: str  # relative to the client's /
    content: bytes
    mode: int


@dataclass(frozen=True)
class ClientConfig:
    profile: str
    edition: str
    url: str
    fingerprint: str
    files: tuple[ClientFile, ...]  # README first


def check_url(url: str) -> str:
    """The edition's URL: http(s), only characters the update script's configuration allows, no trailing
    slash. A URL ending in /snapshots (the snapshot-only mode's mistake) or /edition.json is refused."""
    url = url.rstrip("/")
    if not _URL_RE.match(url):
        raise ConfigError(f"--url: expected an http:// or https:// URL of letters, digits and . _ : / @ % + ~ , [ ] -, "
                          f"got {url!r}")
    for suffix, what in (("/snapshots", "the snapshots directory"), ("/edition.json", "a file")):
        if url.endswith(suffix):
            raise ConfigError(f"--url {url} ends in {suffix}: give the edition's root, the URL that holds "
                              f"edition.json ({url.removesuffix(suffix)}), not {what}")
    return url


def check_client_path(path: str, option: str) -> str:
    if not _PATH_RE.match(path) or "/../" in f"{path}/" or "/./" in f"{path}/":
        raise ConfigError(f"{option}: expected an absolute path on the client without spaces or quotes, got {path!r}")
    return path


def autoupdate_script() -> bytes:
    """The update script (package data: snapshotter/binhost/autoupdate.sh)."""
    return resources.files("snapshotter.binhost").joinpath("autoupdate.sh").read_bytes()


def wget_command(tls: ClientTLS, resume: bool = False) -> str:
    """Portage's fetchcommand/resumecommand: wget with the client certificate and bounded retries."""
    return (f"wget{' -c' if resume else ''} --tries={WGET_TRIES} --timeout={WGET_TIMEOUT} "
            f"--certificate={tls.cert} --private-key={tls.key} --ca-certificate={tls.ca} "
            '-O "${DISTDIR}/${FILE}" "${URI}"')


def _conf(profile: str, edition: str, url: str, fingerprint: str, tls: ClientTLS | None) -> str:
    lines = ["# /etc/snapshotter-client.conf: read by snapshotter-autoupdate (written by snapshotter client-config).",
             "# NAME=VALUE, no quotes, no spaces.",
             f"URL={url}", f"PROFILE={profile}", f"EDITION={edition}", f"SIGNING_KEY={fingerprint}"]
    if tls is not None:
        lines += [f"CERT={tls.cert}", f"KEY={tls.key}", f"CA={tls.ca}"]
    return "\n".join(lines) + "\n"


def _tls_binrepos(tls: ClientTLS) -> str:
    return (f"# /{TLS_BINREPOS} (snapshotter client-config): this host's client certificate for the\n"
            f"# [{settings.BINREPO_NAME}] binary repository, whose sync-uri comes with each build's settings (binrepos.conf/\n"
            f"# {settings.BINREPO_NAME}.conf). Portage's own HTTP code sends no client certificate: these commands fetch the\n"
            "# Packages index and the packages.\n"
            f"[{settings.BINREPO_NAME}]\n"
            f"fetchcommand = {wget_command(tls)}\n"
            f"resumecommand = {wget_command(tls, resume=True)}\n")


def _stanzas(profile: str, url: str) -> tuple[str, str]:
    """repos.conf/snapshotter.conf and binrepos.conf/snapshotter.conf as a build's settings install them
    (the build id and tag shown as <build> and <tag>; comments left out)."""
    placeholder = Build(id="<build>", profile=profile, tag="<tag>", n=0, path=Path("."), state="ok")

    def body(text: str) -> str:
        return "".join(f"    {line}\n" for line in text.splitlines() if line and not line.startswith("#"))

    return (body(settings.repos_conf(placeholder)),
            body(settings.binrepos_conf(placeholder).replace(settings.URL_PLACEHOLDER, url)))


def _readme(profile: str, edition: str, url: str, fingerprint: str, tls: ClientTLS | None) -> str:
    repos, binrepos = _stanzas(profile, url)
    key = settings.CLIENT_KEY_PATH
    install = [f"install -D -m 0644 {CLIENT_CONF} /{CLIENT_CONF}",
               f"install -D -m 0755 {SCRIPT} /{SCRIPT}",
               f"install -D -m 0644 {KEY_FILE} {key}"]
    if tls is not None:
        install.append(f"install -D -m 0644 {TLS_BINREPOS} /{TLS_BINREPOS}")
    tls_note = ""
    if tls is not None:
        tls_note = (f"\nThis host's client certificate (snapshotter pki issue-client HOST --edition {edition}) must be at\n"
                    f"{tls.cert}, its key at {tls.key} (0600) and the server's CA at {tls.ca}.\n")
    cmd_wget = ""
    if tls is not None:
        cmd_wget = (f"    FETCHCOMMAND='{wget_command(tls)}'\n"
                    f"    RESUMECOMMAND='{wget_command(tls, resume=True)}'\n")
    return f"""\
snapshotter client of profile {profile}, edition {edition}, at {url}
=====================================================================

Copy this directory to the client; there, as root, from inside it:

1. Install the update script, its configuration and the signing key:

{"".join(f"    {c}{chr(10)}" for c in install)}{tls_note}
2. Trust the signing key {fingerprint} where Portage looks for it. Portage verifies every binary
   package with {PORTAGE_GNUPG}, as the user nobody: the keyring must be readable by everyone, and
   the key fully or ultimately trusted (gpgconf stops the gpg-agent the import started).

    install -d -m 0755 {PORTAGE_GNUPG}
    gpg --homedir {PORTAGE_GNUPG} --batch --import {key}
    echo {fingerprint}:6: | gpg --homedir {PORTAGE_GNUPG} --batch --import-ownertrust
    gpg --homedir {PORTAGE_GNUPG} --batch --check-trustdb
    gpgconf --homedir {PORTAGE_GNUPG} --kill all
    chmod -R a+rX {PORTAGE_GNUPG}

3. Update now, then every day from cron:

    /{SCRIPT}
    echo '17 4 * * * root /{SCRIPT} >>/var/log/snapshotter-autoupdate.log 2>&1' >{CRON_FILE}

The script prints one line per step and exits with 0 (updated, or already at the edition's build),
1 (usage or configuration), 2 (verification failed), 3 (download failed, or the server refused this
host's certificate), 4 (emerge-webrsync failed), 5 (emerge failed) or 75 (already running); nothing
is changed on 1, 2 and 3. It records the build in {STATE_DIR}/build, the output of emerge-webrsync and
emerge in {STATE_DIR}/update.log; --force updates even when the host is already at the build.

What each update installs into /etc/portage (from the build's signed settings tarball)
--------------------------------------------------------------------------------------

make.conf is the build's. This host's first make.conf is kept as make.conf.before-snapshotter; this
host's own settings go into /etc/portage/make.conf.local (sourced at the end of make.conf) and into
files of the package.* directories not named snapshotter (files sorting after "snapshotter", e.g.
zz-local, override the build's). Nothing needs to be added to make.conf: the script sets, for
emerge-webrsync only,

    GENTOO_MIRRORS={url}/b/<build>
{cmd_wget}
repos.conf/snapshotter.conf (the tree is the build's snapshot, signature checked; no auto-sync):

{repos}
binrepos.conf/snapshotter.conf (the build's signed packages; Portage's signature verification on):

{binrepos}
A stage3's binrepos.conf/gentoobinhost.conf (Gentoo's own binary packages) is left alone: remove it if
this host must take the build's packages only. emerge -g runs Portage's trust helper getuto, which
refreshes the keys of {PORTAGE_GNUPG} from keyservers; PORTAGE_TRUST_HELPER=true in
/etc/portage/make.conf.local switches it off.
"""


def client_config(cfg: Config, profile: str, edition: str, url: str, tls: ClientTLS | None = None) -> ClientConfig:
    """Everything a client of (profile, edition) at `url` needs. ConfigError for an unknown profile or
    edition, a bad URL or path, or a profile without a signing key; SigningError when its public key
    cannot be exported from the configured gnupghome."""
    if not NAME_RE.match(profile):
        raise ConfigError(f"--profile: not a profile name: {profile!r}")
    if cfg.profiles and profile not in cfg.profiles:
        raise ConfigError(f"--profile: unknown profile {profile!r} (configured: {', '.join(sorted(cfg.profiles))})")
    check_edition(cfg, edition)
    url = check_url(url)
    if tls is not None:
        tls = ClientTLS(check_client_path(tls.cert, "--cert"), check_client_path(tls.key, "--key"),
                        check_client_path(tls.ca, "--ca"))
        if not url.startswith("https://"):
            raise ConfigError(f"--cert: a client certificate needs an https:// URL, got {url}")
    signing = signing_for(cfg, profile)
    if signing is None:
        raise ConfigError(f"no signing key for profile {profile}: set [binhost] signing_key "
                          f"(or [profiles.{profile}] signing_key)")
    key = export_public_key(signing.fingerprint, signing.gnupghome)
    fpr = signing.fingerprint.replace(" ", "").upper()
    files = [ClientFile(README, _readme(profile, edition, url, fpr, tls).encode(), 0o644),
             ClientFile(CLIENT_CONF, _conf(profile, edition, url, fpr, tls).encode(), 0o644),
             ClientFile(SCRIPT, autoupdate_script(), 0o755),
             ClientFile(KEY_FILE, key, 0o644)]
    if tls is not None:
        files.append(ClientFile(TLS_BINREPOS, _tls_binrepos(tls).encode(), 0o644))
    return ClientConfig(profile, edition, url, fpr, tuple(files))


def render(cc: ClientConfig) -> str:
    """Everything as one text for standard output: the README, then each file under a header line."""
    parts = []
    for f in cc.files:
        if f.path == README:
            parts.append(f.content.decode())
            continue
        parts.append(f"==== /{f.path} (mode {f.mode:04o}) ====\n{f.content.decode()}")
    return "\n".join(parts)


def write(cc: ClientConfig, out: Path) -> list[Path]:
    """Write the files under `out` (created if missing; files replaced atomically, never through a symlink).
    Returns the paths written."""
    if os.path.lexists(out) and (os.path.islink(out) or not os.path.isdir(out)):
        raise SnapshotterError(f"--out {out}: not a directory (a file or a symlink)")
    out.mkdir(parents=True, exist_ok=True)
    # A file an earlier run wrote and this one does not (the TLS file, when --cert is gone) would be copied
    # to the client with the rest: it goes.
    ours = {f.path for f in cc.files}
    for stale in (README, CLIENT_CONF, SCRIPT, KEY_FILE, TLS_BINREPOS):
        if stale not in ours and (os.path.isfile(out / stale) or os.path.islink(out / stale)):
            os.unlink(out / stale)
    written = []
    for f in cc.files:
        target = out / f.path
        d = out
        for part in Path(f.path).parent.parts:
            d = d / part
            if os.path.islink(d) or (os.path.lexists(d) and not os.path.isdir(d)):
                raise SnapshotterError(f"--out: {d} is not a directory (a file or a symlink)")
            d.mkdir(mode=0o755, exist_ok=True)
        atomic_write(target, f.content, mode=f.mode, durable=False)
        written.append(target)
    return written
