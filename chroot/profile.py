"""Build profiles: `[profiles.NAME]` tables of the configuration (placeholder, see issue 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snapshotter.errors import ConfigError


def parse_profile(name: str, table: Any, base: Path) -> Any:
    """Validate one `[profiles.NAME]` table; errors name the key (`profiles.NAME.key`)."""
    if not isinstance(table, dict):
        raise ConfigError(f"profiles.{name}: expected a table")
    return table
