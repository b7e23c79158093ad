"""Reproducible chroot builds (`emerge -e world`) from a tag of the snapshot repository."""
