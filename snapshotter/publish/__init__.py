"""`snapshotter publish`: turn tags back into signed, byte-reproducible webrsync snapshot files
(snapshots), and tell clients how to use them (clientconfig)."""
