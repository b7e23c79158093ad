"""What a Gentoo client needs to sync from our published snapshots with `emerge-webrsync`."""

from __future__ import annotations

import re

from snapshotter.errors import SnapshotterError

DEFAULT_KEY_PATH = "/etc/portage/snapshotter-signing-key.asc"
DEFAULT_LOCATION = "/var/db/repos/gentoo"

_URL_RE = re.compile(r"^(https?|ftp|file)://[^\s\"'\\$`]+$")
_PATH_RE = re.compile(r"^/[^\s\"'\\$`]*$")


def check_mirror_url(url: str) -> str:
    """An http(s)/ftp/file URL without whitespace, quotes or shell characters; no trailing slash.

    A URL ending in /snapshots is refused: it is the snapshots directory, not the mirror's root that
    GENTOO_MIRRORS wants (emerge-webrsync would ask for .../snapshots/snapshots/gentoo-YYYYMMDD.tar.xz).
    """
    if not _URL_RE.match(url):
        raise SnapshotterError(f"not a usable mirror URL (http://, https://, ftp:// or file://, "
                               f"no spaces or quotes): {url!r}")
    url = url.rstrip("/")
    if url.endswith("/snapshots"):
        raise SnapshotterError(f"mirror URL {url} ends in /snapshots: give the URL of publish's OUT directory, "
                               f"the one that holds snapshots/ ({url.removesuffix('/snapshots')}); "
                               "emerge-webrsync adds /snapshots/ itself")
    return url


def check_abs_path(path: str, what: str) -> str:
    if not _PATH_RE.match(path):
        raise SnapshotterError(f"{what}: expected an absolute path without spaces or quotes, got {path!r}")
    return path


def client_config(mirror_url: str, key_path: str = DEFAULT_KEY_PATH, location: str = DEFAULT_LOCATION,
                  keyserver: str | None = None) -> str:
    """The repos.conf stanza and the make.conf GENTOO_MIRRORS line for a client of `mirror_url`."""
    url = check_mirror_url(mirror_url)
    key_path = check_abs_path(key_path, "key path")
    location = check_abs_path(location, "repository location")
    lines = [
        "# /etc/portage/repos.conf/gentoo.conf -- sync the gentoo repository from our signed snapshots",
        "[DEFAULT]",
        "main-repo = gentoo",
        "",
        "[gentoo]",
        f"location = {location}",
        "sync-type = webrsync",
        "sync-webrsync-verify-signature = yes",
        f"sync-openpgp-key-path = {key_path}",
    ]
    if keyserver is not None:
        if not re.match(r"^(hkps?|https?)://[^\s\"'\\$`]+$", keyserver):
            raise SnapshotterError(f"not a keyserver URL (hkp://, hkps://, http(s)://): {keyserver!r}")
        lines.append(f"sync-openpgp-keyserver = {keyserver}")
    lines += [
        "auto-sync = yes",
        "",
        "# /etc/portage/make.conf -- where emerge-webrsync fetches snapshots/gentoo-YYYYMMDD.tar.xz",
        f'GENTOO_MIRRORS="{url}"',
        "",
        f"# Install the publisher's public key at {key_path}; pin a day with:",
        "#   emerge-webrsync --revert=YYYYMMDD",
    ]
    return "\n".join(lines) + "\n"
