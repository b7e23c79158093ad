"""A newcomer's first hour with the real CLI: the README's install command and the systemd units, a wrong
mirror URL, a first sync that fails leaving nothing behind, and what the console shows at the default
level (friendly retry lines, no library noise, a progress line that log lines never overwrite)."""

from __future__ import annotations

import fcntl
import functools
import http.server
import os
import pty
import re
import shlex
import socket
import struct
import subprocess
import termios
import threading
import urllib.request
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from helpers import testlib

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)  # the newest possible snapshot is 2026-11-20
D18, D19, D20 = date(2026, 11, 18), date(2026, 11, 19), date(2026, 11, 20)


# --- 1. the README's first command installs what the systemd units run --------------------------------

def readme_first_command() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no ```sh block"
    first, second = block[1].splitlines()[:2]
    assert second.split("#")[0].strip() == "bash tests/run.sh"  # the README's second line stays the test command
    return first.split("   #")[0].strip()


def test_readme_first_command_installs_the_executable_the_systemd_units_run() -> None:
    steps = [shlex.split(step) for step in readme_first_command().split("&&")]
    venvs = [s[-1] for s in steps if s[:3] == ["python3", "-m", "venv"]]
    assert len(venvs) == 1, steps  # a venv at a fixed place: Debian refuses a system-wide pip install
    venv = Path(venvs[0])
    assert venv.is_absolute()
    assert [str(venv / "bin/pip"), "install", "."] in steps
    runs = [s for s in steps if s[0].endswith("/snapshotter")]
    assert runs and all(s[0] == str(venv / "bin/snapshotter") for s in runs), steps
    assert runs[0][1] == "sync"
    units = sorted((ROOT / "systemd").glob("*.service"))
    assert units
    for unit in units:
        execs = [line.split("=", 1)[1].split()[0] for line in unit.read_text().splitlines()
                 if line.startswith("ExecStart=")]
        assert execs == [str(venv / "bin/snapshotter")], unit.name
    # Nowhere does the README tell a reader to pip install into the system Python.
    for line in (ROOT / "README.md").read_text().splitlines():
        assert not re.match(r"^\s*(sudo\s+)?pip3?\s+install", line), line


# --- helpers -------------------------------------------------------------------------------------------

class _FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Static files; the first server.fail[path] GETs of a path get a 503."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:  # type: ignore[attr-defined]
            left = srv.fail.get(self.path, 0)  # type: ignore[attr-defined]
            if left:
                srv.fail[self.path] = left - 1  # type: ignore[attr-defined]
        if left:
            self.send_error(503)
            return
        super().do_GET()


@dataclass
class Flaky:
    root: Path
    url: str
    fail: dict[str, int]


@pytest.fixture
def flaky(tmp_path: Path):
    root = tmp_path / "flaky-mirror"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_FlakyHandler, directory=str(root)))
    server.daemon_threads = True
    server.fail = {}  # type: ignore[attr-defined]
    server.lock = threading.Lock()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Flaky(root, f"http://127.0.0.1:{server.server_address[1]}", server.fail)  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Host:
    """The directories a sync may write, all under one temporary `var/` (nothing there before)."""

    tmp: Path

    @property
    def var(self) -> Path:
        return self.tmp / "var"

    @property
    def repo(self) -> Path:
        return self.var / "lib/snapshotter/gentoo.git"

    def config(self) -> Path:
        path = self.tmp / "snapshotter.toml"
        path.write_text(f'state_dir = "{self.var / "lib/snapshotter"}"\n'
                        f'[sync]\ncache_dir = "{self.var / "cache/snapshotter/downloads"}"\nretries = 2\ntimeout = 10\n')
        return path

    def argv(self, mirror: str, key: testlib.Key, *extra: str, keyring: Path | None = None,
             fingerprint: str | None = None, verbose: str | None = None) -> list[str]:
        """`snapshotter [-v...] sync ... EXTRA` against `mirror`, trusting `key`."""
        return ["--config", str(self.config()), *([verbose] if verbose else []), "sync", "--repo", str(self.repo),
                "--mirror", mirror, "--keyring", str(keyring or key.public),
                "--fingerprint", fingerprint or key.fingerprint, *extra]

    def sync(self, mirror: str, key: testlib.Key, *extra: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return testlib.run_cli(*self.argv(mirror, key, *extra, **kw),  # type: ignore[arg-type]
                               env={"SNAPSHOTTER_NOW": str(int(NOW.timestamp()))})

    def left_behind(self) -> list[str]:
        return sorted(str(p.relative_to(self.var)) for p in self.var.rglob("*")) if self.var.exists() else []


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    return testlib.one_error(proc, status=None)


# --- 2. a wrong mirror URL ------------------------------------------------------------------------------

def test_first_sync_finding_nothing_says_the_mirror_url_is_probably_wrong(
        tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key) -> None:
    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)
    host = Host(tmp_path)
    # The snapshots/ directory given as the mirror: every day of the look-back window is asked for, none found.
    proc = host.sync(f"{http_mirror.url}/snapshots", gpg_key)
    error = one_error_line(proc)
    assert proc.returncode == 1
    assert "no snapshot on any mirror for the 40 days 2026-10-12 to 2026-11-20" in error
    assert "ends in /snapshots" in error and "mirror's root" in error
    assert "/snapshots/snapshots/gentoo-20261012.tar.xz.md5sum" in http_mirror.requests  # the whole window
    assert host.left_behind() == []
    # A root that has no snapshots at all says the same, more generally.
    empty = testlib.serve(tmp_path / "empty")
    try:
        error = one_error_line(host.sync(empty.url, gpg_key))
    finally:
        empty.server.shutdown()
        empty.server.server_close()
    assert "the mirror URL is probably wrong" in error and "mirror's root" in error
    # The mirror's root works.
    proc = host.sync(http_mirror.url, gpg_key)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("2026-11-20 ")


def test_client_config_refuses_a_url_ending_in_snapshots(http_mirror: testlib.HttpMirror,
                                                         gpg_key: testlib.Key) -> None:
    tarball = testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)  # what publish's OUT holds
    proc = testlib.run_cli("client-config", "--mirror-url", f"{http_mirror.url}/snapshots/")
    error = one_error_line(proc)
    assert "ends in /snapshots" in error and "emerge-webrsync adds /snapshots/ itself" in error
    assert proc.stdout == ""
    # The root it asks for is the one a client fetches from, as emerge-webrsync does.
    proc = testlib.run_cli("client-config", "--mirror-url", http_mirror.url)
    assert proc.returncode == 0, proc.stderr
    (mirrors,) = re.findall(r'^GENTOO_MIRRORS="(.*)"$', proc.stdout, re.M)
    with urllib.request.urlopen(f"{mirrors}/snapshots/{tarball.name}") as resp:
        assert resp.read() == tarball.read_bytes()


# --- 3. a first sync that fails before importing leaves nothing behind ----------------------------------

@pytest.mark.parametrize("case", ["missing key file", "malformed fingerprint", "fingerprint not in the keyring",
                                  "unreachable mirror"])
def test_a_failed_first_sync_leaves_no_repository_state_or_cache(
        case: str, tmp_path: Path, http_mirror: testlib.HttpMirror, gpg_key: testlib.Key,
        other_key: testlib.Key) -> None:
    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)  # a good snapshot is there all along
    host = Host(tmp_path)
    mirror, kw = http_mirror.url, {}
    expected = {
        "missing key file": ("sync.keyring[0]", "not found"),
        "malformed fingerprint": ("sync.fingerprints[0]", "40-hex-digit"),
        "fingerprint not in the keyring": ("sync.fingerprints", "no key in sync.keyring has a pinned fingerprint"),
        "unreachable mirror": ("no mirror could be reached", "connection refused"),
    }[case]
    if case == "missing key file":
        kw = {"keyring": tmp_path / "gentoo-release.asc"}
    elif case == "malformed fingerprint":
        kw = {"fingerprint": "DCD05B71"}
    elif case == "fingerprint not in the keyring":
        kw = {"fingerprint": other_key.fingerprint}
    else:
        mirror = f"http://127.0.0.1:{closed_port()}"
    proc = host.sync(mirror, gpg_key, **kw)
    assert proc.returncode != 0
    if case == "malformed fingerprint":  # a usage error
        assert proc.returncode == 2 and all(w in proc.stderr for w in expected), proc.stderr
    else:
        error = one_error_line(proc)
        assert all(w in error for w in expected), error
    assert host.left_behind() == []
    assert not host.repo.exists()
    # Put right, the same command works and creates them.
    proc = host.sync(http_mirror.url, gpg_key)
    assert proc.returncode == 0, proc.stderr
    assert "lib/snapshotter/gentoo.git/HEAD" in host.left_behind()


# --- 4. the console at the default level ----------------------------------------------------------------

def test_retries_say_one_friendly_line_each_and_no_library_noise(tmp_path: Path, flaky: Flaky,
                                                                 gpg_key: testlib.Key) -> None:
    testlib.build_snapshot(flaky.root, D20, key=gpg_key)
    md5 = "/snapshots/gentoo-20261120.tar.xz.md5sum"
    flaky.fail[md5] = 2
    host = Host(tmp_path)
    proc = host.sync(flaky.url, gpg_key, "--no-push")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("2026-11-20 ")
    assert "Retrying" not in proc.stderr and "Retry(" not in proc.stderr  # urllib3's own lines
    retries = [line for line in proc.stderr.splitlines() if "retry" in line]
    assert retries == [f"{flaky.url}{md5}: HTTP 503; retry 1 of 2",
                       f"{flaky.url}{md5}: HTTP 503; retry 2 of 2 in 2 s"], proc.stderr


def test_a_bad_signature_is_one_line_without_gnupg_noise(tmp_path: Path, http_mirror: testlib.HttpMirror,
                                                          gpg_key: testlib.Key, other_key: testlib.Key) -> None:
    testlib.build_snapshot(http_mirror.root, D20, key=other_key)
    keyring = tmp_path / "both.asc"
    keyring.write_bytes(gpg_key.public.read_bytes() + other_key.public.read_bytes())
    proc = Host(tmp_path).sync(http_mirror.url, gpg_key, keyring=keyring)
    error = one_error_line(proc)
    assert "signature verification failed" in error
    assert "gpg returned a non-zero error code" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [error]


def test_verbose_shows_the_snapshotters_steps_not_gitpythons(tmp_path: Path, http_mirror: testlib.HttpMirror,
                                                             gpg_key: testlib.Key) -> None:
    testlib.build_snapshot(http_mirror.root, D19, key=gpg_key)
    testlib.build_snapshot(http_mirror.root, D20, key=gpg_key)
    host = Host(tmp_path)
    # -vv is where the libraries' detail goes: git commands run by GitPython, urllib3's requests.
    proc = host.sync(http_mirror.url, gpg_key, "--date", "20261119", verbose="-vv")
    assert proc.returncode == 0, proc.stderr
    assert "git.cmd: Popen(['git', 'cat-file'" in proc.stderr
    assert "urllib3.connectionpool:" in proc.stderr
    # -v: the same kind of run says what the snapshotter does, and nothing of the libraries.
    proc = host.sync(http_mirror.url, gpg_key, verbose="-v")
    assert proc.returncode == 0, proc.stderr
    assert "snapshotter.sync.run: gentoo-20261120.tar.xz: md5 ok, good signature by" in proc.stderr
    assert "Popen(" not in proc.stderr and " git.cmd:" not in proc.stderr
    assert "urllib3" not in proc.stderr


def screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: \\r, \\n, ESC[K (erase to the end of the line) and printable text."""
    rows, row, col = [""], 0, 0
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "\x1b":
            m = re.compile(r"\x1b\[[0-9;?]*([A-Za-z])").match(raw, i)
            assert m, repr(raw[i:i + 10])
            if m[1] == "K":
                rows[row] = rows[row][:col]
            i = m.end()
            continue
        if c == "\r":
            col = 0
        elif c == "\n":
            row, col = row + 1, 0
            if row == len(rows):
                rows.append("")
        else:
            line = rows[row].ljust(col)
            rows[row] = line[:col] + c + line[col + 1:]
            col += 1
        i += 1
    return rows


def run_on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str, list[str]]:
    """Run the real CLI with stderr on a pseudo-terminal 200 columns wide; (status, stdout, screen)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    full = {k: v for k, v in os.environ.items() if k != "SNAPSHOTTER_CONFIG"} | env
    proc = subprocess.Popen(["snapshotter", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave, env=full)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has gone
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    status = proc.wait(timeout=120)
    reader.join(timeout=30)
    os.close(master)
    return status, out, screen(b"".join(chunks).decode())


def test_on_a_terminal_log_lines_and_the_progress_line_never_overwrite_each_other(
        tmp_path: Path, flaky: Flaky, gpg_key: testlib.Key) -> None:
    for day in (D18, D19, D20):
        testlib.build_snapshot(flaky.root, day, key=gpg_key)
    host = Host(tmp_path)
    assert host.sync(flaky.url, gpg_key, "--date", "20261118", "--no-push").returncode == 0
    # Two days to catch up: the retries of the second day's .md5sum come while the first day's import
    # line is still on the screen.
    flaky.fail["/snapshots/gentoo-20261120.tar.xz.md5sum"] = 2
    status, out, rows = run_on_a_terminal(host.argv(flaky.url, gpg_key, "--no-push"),
                                          {"SNAPSHOTTER_NOW": str(int(NOW.timestamp()))})
    assert status == 0, rows
    assert [line.split()[0] for line in out.splitlines()] == ["2026-11-19", "2026-11-20"]
    rows = [r.rstrip() for r in rows if r.strip()]
    logs = [r for r in rows if "HTTP 503" in r]
    md5 = f"{flaky.url}/snapshots/gentoo-20261120.tar.xz.md5sum"
    assert logs == [f"{md5}: HTTP 503; retry 1 of 2", f"{md5}: HTTP 503; retry 2 of 2 in 2 s"], rows
    bars = [r for r in rows if r not in logs]
    assert bars and all(re.fullmatch(r"(fetch|import) \S+  (\[[#-]{30}\]\s+\d+%|\d+\.\d MB)", r) for r in bars), rows
    assert any(r.startswith("import gentoo-20261120.tar.xz  [") for r in bars), rows
