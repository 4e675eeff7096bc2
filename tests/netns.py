"""Test hosts in Linux network namespaces, created and removed by the tests (as root).

A :class:`Network` is a bridge in the root namespace with the first address of a /24 of
198.18.0.0/15 (the range set aside for network tests, RFC 2544), and one namespace per
:class:`Host`, joined to the bridge by a veth pair: the host's own address on its side, the
other end a port of the bridge. A server that listens on the bridge's address is reached
by every host, and by the root namespace itself (a local address). :meth:`Host.cut` takes
the host's end of the link down on the root side, as a pulled cable would: nothing it sends
arrives, nothing sent to it arrives, and neither side is told.

Processes run on a host with :meth:`Host.command`: inside its namespace and, through
``unshare --uts``, with a hostname of their own. Names carry the test process's pid, so
two runs at once do not collide, and :func:`remove_leftovers` deletes what an interrupted
run of an earlier process left behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

_PREFIX = "pgjobs"
# pgjobs<pid>n<seq>h<i>: namespace names are free, but interface names end at 15
# characters. <seq> counts the networks of one test process: a namespace outlives its
# deletion while a process is still inside (a server stopping), and the next network's
# names must not collide with what is left of it.
_NETNS = re.compile(rf"^{_PREFIX}(\d+)(?:n\d+)?h\d+$")
_made = itertools.count(1)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2, util-linux)"
    probe = f"{_PREFIX}{os.getpid()}probe"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"ip netns add fails here: {added.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


def remove_leftovers() -> None:
    """Delete the namespaces and bridges of test processes that no longer exist."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NETNS.match(name)
        if match and not _alive(int(match.group(1))):
            _ip("netns", "del", name, check=False)
    links = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"],
                           capture_output=True, text=True).stdout  # fmt: skip
    for match in re.finditer(rf"^\d+: ({_PREFIX[:2]}(\d+)(?:n\d+)?br)[:@]", links, re.MULTILINE):
        if not _alive(int(match.group(2))):
            _ip("link", "del", match.group(1), check=False)


@dataclass
class Host:
    """One test host: a namespace, its address, its hostname, its link to the bridge."""

    index: int
    netns: str
    hostname: str
    address: str
    # The root namespace's end of the veth pair (a bridge port).
    link: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host: in its namespace, under its hostname. The process
        keeps the pid of the command started (each step execs the next)."""
        return [
            "ip", "netns", "exec", self.netns,
            "unshare", "--uts",
            "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname, *argv,
        ]  # fmt: skip

    def cut(self, how: str = "link", peer: str | None = None) -> None:
        """Cut this host off, silently for both ends: ``link`` pulls its cable (the link
        goes down on the root side, and the host's own interface loses its carrier);
        ``blackhole`` loses everything between it and ``peer`` (an address of the root
        namespace) further away, as a failed switch or router would, every interface
        staying up."""
        if how == "link":
            _ip("link", "set", self.link, "down")
        elif how == "blackhole":
            assert peer is not None
            _ip("-n", self.netns, "route", "add", "blackhole", f"{peer}/32")
            _ip("route", "add", "blackhole", f"{self.address}/32")
        else:
            raise ValueError(f"unknown way to cut a host: {how!r}")

    def restore(self, how: str = "link", peer: str | None = None) -> None:
        """Undo :meth:`cut`."""
        if how == "link":
            _ip("link", "set", self.link, "up")
        else:
            _ip("-n", self.netns, "route", "del", "blackhole", f"{peer}/32")
            _ip("route", "del", "blackhole", f"{self.address}/32")


@dataclass
class Network:
    """A bridge in the root namespace and the hosts attached to it."""

    tag: str
    subnet: str
    bridge: str
    address: str
    hosts: list[Host] = field(default_factory=list)

    @property
    def cidr(self) -> str:
        """The hosts' subnet, for pg_hba.conf."""
        return f"{self.subnet}.0/24"


@contextlib.contextmanager
def network(count: int) -> Iterator[Network]:
    """A bridge and ``count`` hosts on it (hostnames host1…), all removed afterwards."""
    pid, seq = os.getpid(), next(_made)
    # 198.18.0.0/15 holds 512 /24s: one per network, by test process and sequence.
    block = (pid + 131 * seq) % 512
    subnet = f"198.{18 + block // 256}.{block % 256}"
    short = f"{_PREFIX[:2]}{pid}n{seq}"
    net = Network(f"{_PREFIX}{pid}n{seq}", subnet, f"{short}br", f"{subnet}.1")
    try:
        _ip("link", "add", net.bridge, "type", "bridge", "forward_delay", "0")
        _ip("addr", "add", f"{net.address}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for i in range(1, count + 1):
            host = Host(i, f"{net.tag}h{i}", f"host{i}", f"{subnet}.{10 + i}",
                        f"{short}v{i}")  # fmt: skip
            _ip("netns", "add", host.netns)
            net.hosts.append(host)
            _ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0",
                "netns", host.netns)  # fmt: skip
            _ip("link", "set", host.link, "master", net.bridge)
            _ip("link", "set", host.link, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        yield net
    finally:
        # A namespace's veth pair goes with it; processes still inside would keep it alive,
        # so the caller stops them first.
        for host in net.hosts:
            _ip("netns", "del", host.netns, check=False)
        _ip("link", "del", net.bridge, check=False)


def _ip(*args: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
