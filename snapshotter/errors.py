"""Errors that reach the user as one line and a distinct exit status."""

from __future__ import annotations

# Exit statuses shared by every subcommand (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1  # bad input, bad snapshot, verification failure, ...
EXIT_USAGE = 2  # click's own status for a bad command line
EXIT_PUSH_FAILED = 3  # the import worked and is kept locally, but a push failed
EXIT_BUILD_FAILED = 4  # emerge (or another build step) failed
EXIT_LOCKED = 75  # EX_TEMPFAIL: another process holds the lock; try again later


def child_failure(stderr: bytes, returncode: int) -> str:
    """Why a child process failed, in one line: the last line it wrote to stderr, else its exit status."""
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit {returncode}"


class SnapshotterError(Exception):
    """An error with a one-line message for the user and an exit status."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(SnapshotterError):
    """The configuration file or an option is wrong; the message names the key."""


class LockedError(SnapshotterError):
    exit_code = EXIT_LOCKED


class VerificationError(SnapshotterError):
    """A checksum or OpenPGP signature did not verify (fail closed)."""


class SignatureError(VerificationError):
    """The OpenPGP signature is bad: stops the whole run, as emerge-webrsync does."""


class SnapshotError(SnapshotterError):
    """The snapshot tarball is malformed or unsafe."""


class FetchError(SnapshotterError):
    """A download failed (404, connection reset, HTML error page, short read)."""


class PushError(SnapshotterError):
    exit_code = EXIT_PUSH_FAILED


class BuildFailed(SnapshotterError):
    exit_code = EXIT_BUILD_FAILED
