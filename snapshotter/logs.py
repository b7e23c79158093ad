"""Logging for the command line and the worker's build child: one format, levels from -v/-q.

- default: the snapshotter's own INFO lines (and warnings and errors);
- -v: its DEBUG lines too: its own steps, not those of the libraries it uses;
- -vv: everything, with the libraries' detail: urllib3's requests and retries, python-gnupg's gpg
  runs, GitPython's git commands (`Popen(...)`).
Below -vv the libraries say only what is an error: their warnings ("Retrying (Retry(total=3, ...))",
"gpg returned a non-zero error code: 1") are about things the snapshotter reports itself, once and in
its own words (a retry, a bad signature).

A live status line on a terminal (a progress bar) is registered with `set_status_line`; while it is
shown, each log record erases it first and draws it again after, so the two never write over each other.
"""

from __future__ import annotations

import logging
import sys
from typing import Protocol, TextIO

# Loggers of the libraries, and the least severe level they show below -vv.
LIBRARY_LEVELS = {"urllib3": logging.ERROR, "gnupg": logging.ERROR, "git": logging.WARNING}


class StatusLine(Protocol):
    """A line someone keeps redrawing in place (with \\r) at the bottom of the terminal."""

    def clear(self) -> None:
        """Erase the line and leave the cursor at its start."""

    def redraw(self) -> None:
        """Draw the line again (the cursor stays at its end, no newline)."""


class ConsoleHandler(logging.StreamHandler[TextIO]):
    """Log records to a stream (stderr), around the status line if one is shown."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.status: StatusLine | None = None

    def emit(self, record: logging.LogRecord) -> None:
        status = self.status
        if status is None:
            super().emit(record)
            return
        status.clear()
        try:
            super().emit(record)
        finally:
            status.redraw()


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = ConsoleHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name, least in LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else max(least, level))


def set_status_line(line: StatusLine | None) -> None:
    """Route the console's log records around `line` from now on (None: there is no status line)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ConsoleHandler):
            handler.status = line
