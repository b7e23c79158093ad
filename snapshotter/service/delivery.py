"""Delivery as the service and the CLI run it: binhost's editions with the snapshots of `snapshotter publish`.

binhost (builds, editions, retention) does not import publish (the layer rule: feature packages do not
import each other); the snapshot of a build's tag is made here, with publish's own `publish_tag` (the same
tarball bytes as `snapshotter publish`), and handed to binhost as its `SnapshotMaker`. The service calls
`on_build_success` after each successful build; the CLI calls `promote` and `rollback`.
"""

from __future__ import annotations

from pathlib import Path

from snapshotter.binhost import editions
from snapshotter.binhost.builds import Build
from snapshotter.binhost.editions import SwitchReport
from snapshotter.config import Config, SigningSettings
from snapshotter.git.repository import Tag
from snapshotter.publish.snapshots import SIDE_SUFFIXES, PublishOptions, publish_tag


def make_snapshot(cfg: Config, tag: Tag, signing: SigningSettings, out: Path) -> list[Path]:
    """`out/snapshots/gentoo-YYYYMMDD.tar.xz` + `.md5sum` + `.gpgsig` for `tag`, signed with `signing`."""
    (out / "snapshots").mkdir(exist_ok=True)
    published = publish_tag(cfg.repo, tag, PublishOptions(
        out=out, signing_key=signing.fingerprint, gnupghome=signing.gnupghome,
        passphrase_file=signing.passphrase_file, xz_level=cfg.publish.xz_level, xz_threads=cfg.publish.xz_threads))
    return [published.path, *(published.path.with_name(published.path.name + s) for s in SIDE_SUFFIXES)]


def make_publishable(cfg: Config, build: Build) -> Path:
    return editions.make_publishable(cfg, build, make_snapshot)


def promote(cfg: Config, profile: str, to_edition: str, *, from_edition: str | None = None,
            build_id: str | None = None, lock_wait: float = 0.0) -> SwitchReport:
    return editions.promote(cfg, profile, to_edition, snapshot=make_snapshot, from_edition=from_edition,
                            build_id=build_id, lock_wait=lock_wait)


def rollback(cfg: Config, profile: str, edition: str, *, to: str | None = None,
             lock_wait: float = 0.0) -> SwitchReport:
    return editions.rollback(cfg, profile, edition, snapshot=make_snapshot, to=to, lock_wait=lock_wait)


def on_build_success(cfg: Config, profile: str, build_id: str, *,
                     lock_wait: float = editions.SWITCH_LOCK_WAIT) -> SwitchReport:
    """After a successful build: publish it to the profile's automatic edition (forward only)."""
    return editions.on_build_success(cfg, profile, build_id, snapshot=make_snapshot, lock_wait=lock_wait)
