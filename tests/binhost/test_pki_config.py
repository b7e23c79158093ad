"""[tls] and [[tls.endpoints]]: defaults, the example file, values, and validation that names the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import testlib

from snapshotter import config
from snapshotter.errors import ConfigError


def load(tmp_path: Path, text: str) -> config.Config:
    (tmp_path / "stage3.tar.xz").write_bytes(b"")
    path = tmp_path / "snapshotter.toml"
    path.write_text(text)
    return config.load(path)


def test_defaults_and_the_example_file() -> None:
    t = config.validate(config.Config()).tls
    assert (t.pki_dir, t.server_cert, t.access_log_dir, t.endpoints) == (
        Path("/etc/snapshotter/pki"), "binhost", Path("/var/log/lighttpd"), [])
    example = config.load(testlib.REPO_ROOT / "examples" / "snapshotter.toml")
    assert example.tls == t


def test_endpoints_are_read_and_normalized(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
[tls]
pki_dir = "pki"
server_cert = "web"
access_log_dir = "logs"
[[tls.endpoints]]
profile = "basic"
edition = "testing"
listen = "127.0.0.2:8443"
[[tls.endpoints]]
profile = "basic"
edition = "production"
listen = "[0:0::1]:443"
server_cert = "other"
""")
    t = cfg.tls
    assert (t.pki_dir, t.access_log_dir) == (tmp_path / "pki", tmp_path / "logs")
    assert [(e.profile, e.edition, e.listen, e.server_cert, e.host, e.port) for e in t.endpoints] == [
        ("basic", "testing", "127.0.0.2:8443", "web", "127.0.0.2", 8443),
        ("basic", "production", "[::1]:443", "other", "::1", 443),
    ]


ENDPOINT = '[[tls.endpoints]]\nprofile = "basic"\nedition = "testing"\nlisten = "127.0.0.2:8443"\n'


@pytest.mark.parametrize("text, message", [
    ("[tls]\nfoo = 1\n", "tls.foo: unknown key"),
    ("[tls]\npki_dir = 3\n", "tls.pki_dir: expected a path"),
    ('[tls]\nserver_cert = "a b"\n', "tls.server_cert: not a valid name"),
    ("[tls]\nendpoints = 3\n", "tls.endpoints: expected tables [[tls.endpoints]]"),
    ('[[tls.endpoints]]\nprofile = "basic"\nedition = "testing"\n', "tls.endpoints[0].listen: missing"),
    (ENDPOINT + 'port = 1\n', "tls.endpoints[0].port: unknown key"),
    (ENDPOINT.replace("127.0.0.2:8443", "binhost.example.org:8443"), "tls.endpoints[0].listen: expected"),
    (ENDPOINT.replace("127.0.0.2:8443", "127.0.0.2"), "tls.endpoints[0].listen: expected"),
    (ENDPOINT.replace("127.0.0.2:8443", "127.0.0.2:70000"), "tls.endpoints[0].listen: expected"),
    (ENDPOINT.replace("127.0.0.2:8443", "999.0.0.2:8443"), "tls.endpoints[0].listen: not an IP address"),
    (ENDPOINT.replace('"testing"', '"beta"'), "tls.endpoints[0].edition: 'beta' is not one of binhost.editions"),
    (ENDPOINT.replace('"basic"', '"../x"'), "tls.endpoints[0].profile: not a valid name"),
    (ENDPOINT + ENDPOINT.replace("127.0.0.2", "127.0.0.3"), "tls.endpoints[1]: profile 'basic' edition 'testing' "
                                                           "already has an endpoint"),
    (ENDPOINT + ENDPOINT.replace('"testing"', '"production"'), "tls.endpoints[1].listen: 127.0.0.2:8443 is "
                                                               "already used"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(tmp_path, text)


def test_an_endpoint_names_a_configured_profile(tmp_path: Path) -> None:
    profile = '[profiles.desktop]\nstage = "stage3.tar.xz"\n'
    with pytest.raises(ConfigError, match=r"tls\.endpoints\[0\]\.profile: no profile 'basic'"):
        load(tmp_path, profile + ENDPOINT)
    cfg = load(tmp_path, profile + ENDPOINT.replace('"basic"', '"desktop"'))
    assert cfg.tls.endpoints[0].profile == "desktop"
