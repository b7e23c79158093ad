"""Incremental builds, as the service plans them (stub; being written): which earlier good build's
packages a new build reuses, and the emerge arguments that reuse them."""

from __future__ import annotations

from pathlib import Path

from chroot.spec import PortageSettings, Reuse, Signing
from snapshotter.config import Profile


def plan(profile: Profile, settings: PortageSettings, *, incremental: bool | None, output: Path, repo: Path,
         commit: str, overlays: dict[str, str], signing: Signing | None) -> tuple[PortageSettings, Reuse | None]:
    """The settings (emerge arguments) and the packages to reuse for a build of `profile` at `commit`
    (overlays: name -> commit). `incremental`: the request's choice (None: the profile's mode).
    A full build returns (settings, None)."""
    return settings, None
