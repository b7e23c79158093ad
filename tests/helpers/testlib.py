"""Real parts for tests: throwaway OpenPGP keys, snapshot tarballs built with tar/xz/bzip2, and an
HTTP mirror on 127.0.0.1. Shared by every test module (`from helpers import testlib`)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Key:
    """A throwaway key pair in its own GNUPGHOME."""

    home: Path
    fingerprint: str
    public: Path  # armored public key file

    def sign(self, path: Path, out: Path | None = None) -> Path:
        out = out or path.with_name(path.name + ".gpgsig")
        subprocess.run(["gpg", "--homedir", str(self.home), "--batch", "--yes", "--armor", "--detach-sign",
                        "--local-user", self.fingerprint, "--output", str(out), str(path)],
                       check=True, capture_output=True)
        return out


HOMES: list[Path] = []  # every GNUPGHOME made here, so the session can stop their agents


def stop_agents() -> None:
    for home in HOMES:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def make_key(home: Path, uid: str = "Gentoo Test Snapshots <infrastructure@gentoo.org>",
             expire: str = "never") -> Key:
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    HOMES.append(home)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", uid, "ed25519", "sign", expire], check=True, capture_output=True)
    out = subprocess.run([*gpg, "--with-colons", "--list-secret-keys"], check=True, capture_output=True, text=True)
    fpr = next(line.split(":")[9] for line in out.stdout.splitlines() if line.startswith("fpr:"))
    public = home / "public.asc"
    with open(public, "wb") as f:
        subprocess.run([*gpg, "--armor", "--export", fpr], check=True, stdout=f)
    return Key(home, fpr, public)


def gpg(key: Key, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gpg", "--homedir", str(key.home), "--batch", "--pinentry-mode", "loopback",
                           "--passphrase", "", *args], check=True, capture_output=True, text=True)


def snapshot_time(day: date) -> int:
    """timestamp.x of Gentoo's snapshot named `day`: taken at 00:45 UTC on the following day."""
    return int(datetime(day.year, day.month, day.day, 0, 45, tzinfo=UTC).timestamp()) + 86400


def timestamp_line(ts: int) -> str:
    return f"{ts} {datetime.fromtimestamp(ts, UTC):%a, %d %b %Y %H:%M:%S +0000}\n"


def write_tree(root: Path, files: dict[str, str | bytes | tuple]) -> None:
    """Create files: value is content (str/bytes), ("symlink", target) or ("exec", content)."""
    for rel, value in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, tuple) and value[0] == "symlink":
            p.symlink_to(value[1])
        elif isinstance(value, tuple) and value[0] == "exec":
            p.write_bytes(value[1].encode() if isinstance(value[1], str) else value[1])
            p.chmod(0o755)
        else:
            p.write_bytes(value.encode() if isinstance(value, str) else value)
            p.chmod(0o644)


BASE_TREE: dict[str, str | bytes | tuple] = {
    "profiles/repo_name": "gentoo\n",
    "profiles/categories": "app-misc\nsys-apps\n",
    "metadata/layout.conf": "masters =\nthin-manifests = true\n",
    "app-misc/hello/hello-1.0.ebuild": "EAPI=8\nSLOT=0\nKEYWORDS=\"amd64\"\n",
    "app-misc/hello/metadata.xml": "<pkgmetadata/>\n",
    "sys-apps/tool/tool-2.ebuild": "EAPI=8\nSLOT=0\n",
    "sys-apps/tool/files/run.sh": ("exec", "#!/bin/sh\necho run\n"),
    "eclass/foo.eclass": "# foo\n",
    "licenses/MIT": "MIT\n",
}


def build_snapshot(mirror_root: Path, day: date, files: dict[str, str | bytes | tuple] | None = None, *,
                   key: Key | None, family: str = "gentoo", compression: str = "xz",
                   timestamp: int | None = None, topdir: str | None = None) -> Path:
    """Write `snapshots/<family>-YYYYMMDD.tar.<xz|bz2>` with .md5sum and (if key) .gpgsig, as Gentoo does.

    The tree gets `metadata/timestamp.x` for `timestamp` (default: the real schedule for `day`).
    """
    files = dict(BASE_TREE if files is None else files)
    ts = snapshot_time(day) if timestamp is None else timestamp
    files.setdefault("metadata/timestamp.x", timestamp_line(ts))
    snapdir = mirror_root / "snapshots"
    snapdir.mkdir(parents=True, exist_ok=True)
    name = f"{family}-{day:%Y%m%d}.tar.{compression}"
    work = mirror_root.parent / f".build-{name}"
    shutil.rmtree(work, ignore_errors=True)
    top = topdir or family
    write_tree(work / top, files)
    tarball = snapdir / name
    flag = {"xz": "-J", "bz2": "-j"}[compression]
    subprocess.run(["tar", "-C", str(work), "--owner=portage:250", "--group=portage:250", "--sort=name",
                    flag, "-cf", str(tarball), top], check=True)
    shutil.rmtree(work)
    write_side_files(tarball, key)
    return tarball


def write_side_files(tarball: Path, key: Key | None) -> None:
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()
    tarball.with_name(tarball.name + ".md5sum").write_text(f"{md5}  {tarball.name}\n")
    if key is not None:
        key.sign(tarball)


class _MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server with Range support (as real mirrors have) and injectable faults:
    server.faults[path] = "html" (an error page with status 200), "reset" (close after half the body),
    "short" (a Content-Length larger than the body, then close), "500" (always a server error)."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append(self.path)  # type: ignore[attr-defined]
        srv.headers_seen.append((self.path, dict(self.headers)))  # type: ignore[attr-defined]
        fault = srv.faults.get(self.path)  # type: ignore[attr-defined]
        if fault == "html":
            body = b"<html><body>Repository maintenance</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if fault == "500":
            self.send_error(500)
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and fault is None:
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) + (1000 if fault == "short" else 0)))
        self.end_headers()
        if fault == "reset":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)
        if fault == "short":
            self.close_connection = True


@dataclass
class HttpMirror:
    root: Path
    url: str
    server: http.server.ThreadingHTTPServer

    @property
    def requests(self) -> list[str]:
        return self.server.requests  # type: ignore[attr-defined]

    @property
    def faults(self) -> dict[str, str]:
        return self.server.faults  # type: ignore[attr-defined]

    def ranges(self) -> list[tuple[str, str]]:
        """(path, Range header) of every request that asked for a range."""
        return [(p, h["Range"]) for p, h in self.server.headers_seen if "Range" in h]  # type: ignore[attr-defined]


def serve(root: Path) -> HttpMirror:
    """Serve `root` on 127.0.0.1 (an ephemeral port) in a daemon thread; call .server.shutdown()."""
    root.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(_MirrorHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.requests = []  # type: ignore[attr-defined]
    server.headers_seen = []  # type: ignore[attr-defined]
    server.faults = {}  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return HttpMirror(root, f"http://127.0.0.1:{server.server_address[1]}", server)


def yesterday_utc(now: datetime | None = None) -> date:
    now = now or datetime.now(UTC)
    return (now - timedelta(days=1)).date()


# Runs argv[2:] as a child subreaper: the processes the command leaves behind (daemons, orphans; running
# or exited since) are re-parented to it; it writes their names to the file argv[1], kills and reaps them.
_SUBREAPER = """
import ctypes, os, signal, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
rc = subprocess.run(sys.argv[2:]).returncode
left = []
while True:
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():  # field 4, the parent pid
            kids.append((int(d), stat.split("(", 1)[1].rsplit(")", 1)[0]))
    if not kids:
        break
    for pid, comm in kids:
        left.append(comm)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
open(sys.argv[1], "w").write("\\n".join(left))
sys.exit(rc)
"""


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            cwd: Path | None = None, left_behind: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `snapshotter` console script for real, in a subprocess.

    It inherits $SNAPSHOTTER_CONFIG: in the suite, the session's configuration whose every path is under a
    temporary directory (tests/conftest.py); pass --config for a test's own.
    With `left_behind` (a list), the command runs under a subreaper, and the names of the processes it
    left behind (a detached `git gc`, a gpg-agent, ...; still running when it exits or not) are appended.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    argv = ["snapshotter", *args]
    if left_behind is None:
        return subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)
    with tempfile.NamedTemporaryFile("r", prefix="left-behind-") as report:
        proc = subprocess.run([sys.executable, "-c", _SUBREAPER, report.name, *argv], capture_output=True,
                              text=True, env=full_env, timeout=timeout, cwd=cwd)
        left_behind.extend(name for name in report.read().splitlines() if name)
    proc.args = argv
    return proc


def one_error(proc: subprocess.CompletedProcess[str], *words: str, status: int | None = 1) -> str:
    """The one `snapshotter: error:` line a failed command printed (exit `status`, or any non-zero one with
    None), with no traceback or "internal error"; each of `words` must be in it."""
    if status is None:
        assert proc.returncode not in (0, None), proc
    else:
        assert proc.returncode == status, proc
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("snapshotter: error:")]
    assert len(errors) == 1, proc.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]

