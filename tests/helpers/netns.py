"""Build hosts as network namespaces: each "host" is an `ip netns` with a veth pair to the root namespace,
its own hostname (a UTS namespace per process started in it) and its own address.

Addresses: one /24 of 10.213.0.0/16 that no interface of this machine uses yet (another test session
may hold another one), cut into /30 links: host i has 10.213.N.(4i+2), the root side of its link
10.213.N.(4i+1) (`Host.gateway`: where the database listens for that host). Traffic goes only to those
addresses. `hosts()` removes the namespaces, their processes and the links on the way out, failures
included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def available() -> bool:
    try:
        return subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10).returncode == 0
    except OSError:
        return False


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _free_subnet() -> int:
    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    for n in [os.getpid() % 250, *range(250)]:
        if f" 10.213.{n}." not in used:
            return n
    raise RuntimeError("no free /24 in 10.213.0.0/16")


@dataclass
class Host:
    name: str  # the hostname its processes see
    ns: str  # the network namespace
    link: str  # the root side of its veth pair
    addr: str  # its own address
    gateway: str  # the root side's address: what it reaches the database on

    def popen(self, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        """Start `argv` on this host: in its network namespace, with its hostname."""
        wrapped = ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--", "sh", "-c",
                   'hostname "$0" && exec "$@"', self.name, *argv]
        return subprocess.Popen(wrapped, text=True, **kw)  # type: ignore[call-overload, no-any-return]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True, timeout=10).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, timeout: float = 10.0) -> None:
        """kill -9 every process of this host (the host "loses power"); waits until none is left."""
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {self.name}: processes {pids} survive kill -9")
            time.sleep(0.05)


@contextmanager
def hosts(names: list[str]) -> Iterator[list[Host]]:
    """Namespaces for `names` (at most 60), each linked to the root namespace; removed afterwards."""
    subnet = _free_subnet()
    tag = f"{os.getpid() % 100000}"
    made: list[Host] = []
    try:
        for i, name in enumerate(names):
            h = Host(name=name, ns=f"snapq{tag}{name}", link=f"sq{tag}x{i}", addr=f"10.213.{subnet}.{4 * i + 2}",
                     gateway=f"10.213.{subnet}.{4 * i + 1}")
            peer = f"sq{tag}y{i}"
            _ip("netns", "add", h.ns)
            made.append(h)
            _ip("link", "add", h.link, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", h.ns)
            _ip("addr", "add", f"{h.gateway}/30", "dev", h.link)
            _ip("link", "set", h.link, "up")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/30", "dev", peer)
            _ip("-n", h.ns, "link", "set", peer, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
        yield made
    finally:
        for h in made:
            try:
                h.kill_all()
            finally:
                subprocess.run(["ip", "link", "del", h.link], capture_output=True, timeout=30)
                subprocess.run(["ip", "netns", "del", h.ns], capture_output=True, timeout=30)
