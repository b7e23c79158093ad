"""Shared helpers of the test suite (and of a few benchmarks), imported as `from helpers import testlib`.

tests/ is on sys.path through `pythonpath` in pyproject.toml's [tool.pytest.ini_options]. Test modules
never import each other: what two of them share lives here (or in tests/conftest.py as a fixture).

  testlib      throwaway OpenPGP keys, snapshot tarballs, an HTTP mirror on 127.0.0.1, run_cli()
  ebuild_repo  a tiny EAPI 8 ebuild repository for real `emerge` runs, in git with date tags
  stage        the stand-in Gentoo stage for chroot builds (`python tests/helpers/stage.py` builds it)
  gitobjects   bare repositories written object by object (hostile trees included)
  importtrees  the trees and tarballs of the import tests (split import, tree cache)
  publishlib   three days synced by the real `snapshotter sync`, published by `snapshotter publish`
  servicelib   bare repositories pushed to, the service configuration and the queue's jobs
  hostdirs     the session's configuration that keeps every path in a temporary directory, host checks
  lighttpd     the real lighttpd started and stopped by a test, HTTPS requests with client certificates
  signkeys     package signing keys (with a passphrase too), the gpg-agents they leave, gpg --verify
  clientlib    client hosts of an edition: client-config's README commands run against a client root
  pglib        a throwaway PostgreSQL cluster (initdb + pg_ctl as postgres), a database per test
  netns        build hosts as network namespaces (own hostname and address, veth to the root namespace)
  tinystage    a tiny stand-in stage for real chroot builds of seconds, and a mirror with date tags for it
"""
