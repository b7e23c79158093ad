"""portage-snapshotter: a git-driven Gentoo portage snapshot mirror and chroot build server."""

__version__ = "0.1.0"
