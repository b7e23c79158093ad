"""Errors of the chroot library: one line for the user and an exit status, like the caller's own.

The library imports nothing of its caller; the caller (snapshotter.service.build) turns these into its
own errors with the same message and exit status.
"""

from __future__ import annotations


class ChrootError(Exception):
    """A build could not be set up or run; the message is one line."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class StageMismatch(ChrootError):
    """The stage tarball's sha256 is not the pinned one: nothing is extracted."""


class MountedError(ChrootError):
    """Something is still mounted where we were about to delete."""


class Terminated(ChrootError):
    """The builder got SIGTERM (or SIGHUP); everything was cleaned up."""

    exit_code = 143
