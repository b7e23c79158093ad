"""`snapshotter sync`: download a day's snapshot from Gentoo's mirrors, verify it (md5, OpenPGP), stream
its tarball into the snapshot repository as one commit + tag, and push. The pipeline, in order:
download (snapshotter.download) -> md5sum + openpgp -> tarstream -> importer -> push; state records
what is done; run holds the whole sync."""
