"""Incremental builds: an earlier good build's packages reused by hard links (stub; being written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chroot.spec import Reuse


def seed(reuse: Reuse, pkgdir: Path) -> None:
    """Hard-link `reuse.paths` from `reuse.base_packages` into the new build's (empty) `pkgdir`."""
    raise NotImplementedError


def summary(reuse: Reuse, pkgdir: Path) -> dict[str, Any]:
    """build.json's `incremental`: {"base", "reused", "rebuilt"} for the finished `pkgdir`."""
    raise NotImplementedError
