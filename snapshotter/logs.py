"""Logging for the command line and the worker's build child: one format, levels from -v/-q."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)
    logging.getLogger("gnupg").setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)
