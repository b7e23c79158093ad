"""Signing keys for builds: throwaway keys with or without a passphrase, and the gpg-agents they leave.

testlib.make_key makes keys without a passphrase; a build's key may have one (read from passphrase_file with
the loopback pinentry). Every home made here is registered in testlib.HOMES, so the session stops its agents.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers import testlib


def make_signing_key(home: Path, passphrase: str = "", uid: str = "Package Signer <packages@example.org>") -> testlib.Key:
    """A fresh ed25519 signing key in `home` (0700); with `passphrase`, its secret key is protected by it.
    The agent that generating the key started is stopped again."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    testlib.HOMES.append(home)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase", passphrase]
    subprocess.run([*gpg, "--quick-gen-key", uid, "ed25519", "sign", "never"], check=True, capture_output=True)
    out = subprocess.run([*gpg, "--with-colons", "--list-secret-keys"], check=True, capture_output=True, text=True)
    fpr = next(line.split(":")[9] for line in out.stdout.splitlines() if line.startswith("fpr:"))
    public = home.parent / f"{home.name}-public.asc"
    with open(public, "wb") as f:
        subprocess.run([*gpg, "--armor", "--export", fpr], check=True, stdout=f)
    stop_agent(home)
    return testlib.Key(home, fpr, public)


def stop_agent(home: Path) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def agents_for(home: Path) -> list[int]:
    """PIDs of gpg-agents serving `home` (started as `gpg-agent --homedir HOME ...`)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        argv = _cmdline(pid)
        if argv and os.path.basename(argv[0]) == "gpg-agent" and "--homedir" in argv:
            i = argv.index("--homedir")
            if i + 1 < len(argv) and os.path.realpath(argv[i + 1]) == os.path.realpath(home):
                found.append(int(pid))
    return found


def agents_under(root: Path) -> list[int]:
    """PIDs of gpg-agents whose root directory is `root` or below it (agents of a chroot build)."""
    prefix = str(root.resolve()).rstrip("/") + "/"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        argv = _cmdline(pid)
        try:
            proc_root = os.readlink(f"/proc/{pid}/root")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == "gpg-agent" and (proc_root + "/").startswith(prefix):
            found.append(int(pid))
    return found


def gpg_verify(public: Path, signature: bytes, data: bytes | None, work: Path) -> subprocess.CompletedProcess[str]:
    """`gpg --verify` with only `public` trusted (a fresh keyring under `work`): a detached signature when
    `data` is given, a clearsigned text otherwise. Returns gpg's result (status lines on stdout)."""
    home = work / f"verify-{len(list(work.glob('verify-*')))}"
    home.mkdir(parents=True, mode=0o700)
    testlib.HOMES.append(home)
    base = ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--no-autostart"]
    # Its exit status is 2 when the agent's socket path under a deep test directory is too long, though
    # the key was imported; the verification below says whether it was.
    subprocess.run([*base, "--import", str(public)], capture_output=True)
    sig = work / "sig.asc"
    sig.write_bytes(signature)
    args = [str(sig)]
    if data is not None:
        (work / "data").write_bytes(data)
        args.append(str(work / "data"))
    return subprocess.run([*base, "--status-fd", "1", "--verify", *args], capture_output=True, text=True)
