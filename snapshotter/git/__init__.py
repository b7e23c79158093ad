"""The snapshot repository: the bare git repository of imported snapshots, its refs and date tags,
running git with argument lists only, and reading trees back out (export)."""
