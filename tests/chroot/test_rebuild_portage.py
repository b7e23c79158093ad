"""`snapshotter rebuild` with the real Portage: a build of the test tree, rebuilt from its build.json as a
new build (two builds in all) and compared package by package.

Uses the chroot tests' module-scoped environment (tests/chroot/conftest.py: stand-in stage, signed
snapshots synced into the mirror, the overlay, the signing keys) and its leak checks. The profile here adds app-misc/stamp, which
installs the time it was built: it must be the one package reported as differing, naming its file; every
other package (signed again, built at another time) must be identical.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from helpers import testlib
from helpers.buildenv import TAG1

pytestmark = [pytest.mark.portage, pytest.mark.usefixtures("no_leak")]


def test_rebuild_is_identical_except_the_package_that_embeds_its_build_time(env):
    base = env["base"]
    cfg = base / "rebuild.toml"
    key = env["trouble_key"]
    cfg.write_text(env["cfg"].read_text() + f"""
[profiles.stamped]
stage = "{env['stage']}"
stage_sha256 = "{env['sha']}"
portage_profile = "default"
world = ["app-misc/hello", "app-misc/extra", "app-misc/stamp"]
portage_confdir = "{env['confdir']}"
overlays = [{{ name = "extra", url = "{base}/overlay", ref = "v1" }}]
signing_key = "{key.fingerprint}"
gnupghome = "{key.home}"
""")
    r = testlib.run_cli("--config", str(cfg), "build", "--profile", "stamped", "--tag", TAG1, timeout=300)
    assert r.returncode == 0, r.stderr
    first = f"{TAG1}.1"
    assert r.stdout.split()[0] == first
    # The overlay's tag moves on after the build: the rebuild must still take the recorded commit.
    subprocess.run(["git", "-C", str(base / "overlay"), "tag", "-f", "v1", env["ov_tags"]["v2"]], check=True,
                   capture_output=True)

    r = testlib.run_cli("--config", str(cfg), "rebuild", first, "--profile", "stamped", timeout=300)
    second = f"{TAG1}.2"
    out = base / "out" / "stamped"
    assert r.returncode == 1, (r.stdout, r.stderr)
    errors = r.stderr.splitlines()
    assert errors[-1].startswith(f"snapshotter: error: rebuild {second} of stamped {first}: ")
    assert errors[-1].endswith(", 1 differs, 0 missing, 0 extra: NOT reproducible"), errors[-1]
    assert "inputs changed" not in errors[-1]

    report = json.loads((out / second / f"rebuild-of-{first}.json").read_text())
    statuses = {p["package"]: p["status"] for p in report["packages"]}
    assert statuses == {"app-misc/extra/extra-1.0": "identical", "app-misc/hello/hello-1.0": "identical",
                        "app-misc/stamp/stamp-1": "differs", "dev-libs/libfoo/libfoo-1.0": "identical",
                        "sys-apps/base/base-1": "identical"}, report["packages"]
    stamp = next(p for p in report["packages"] if p["package"] == "app-misc/stamp/stamp-1")
    assert [d.split(":", 1)[0] for d in stamp["differences"]] == ["image/usr/share/stamp/built"], stamp
    assert all(v["same"] for v in report["inputs"].values()), report["inputs"]
    assert report["reproducible"] is False and report["exit_status"] == 1 and report["rule"]
    # The packages really were made again (new signatures, new build times), not copied.
    for p in report["packages"]:
        assert (out / first / "packages" / p["original"]).read_bytes() != (out / second / "packages" / p["rebuild"]).read_bytes()
    assert "differs   app-misc/stamp/stamp-1" in r.stdout and "image/usr/share/stamp/built" in r.stdout
    if shutil.which("diffoscope") is None:
        assert "diffoscope is not installed here; install it and run: diffoscope /" in r.stdout
    built = json.loads((out / second / "build.json").read_text())
    assert built["overlays"][0]["commit"] == env["ov_tags"]["v1"] != env["ov_tags"]["v2"]
