"""Two "nodes" on one machine: two Linux network namespaces joined by a veth pair.

    with netns.two_nodes() as (a, b):      # a.addr == "10.77.0.1", b.addr == "10.77.0.2"
        subprocess.run(a.wrap(["python", "-c", "..."]))   # runs inside a's namespace

Each namespace has only `lo` (up) and its end of the veth pair, with its own address; the two
see each other and nothing else (no route out). Names carry the pid and a random suffix, so
concurrent runs do not collide, and everything is deleted on exit, also on errors (deleting a
namespace deletes the veth end inside it, and with it the pair).

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's `ip`; `unavailable()` says why
not, for a pytest skip. Only the network is separate: the processes share the file system,
the hostname (UTS namespace) and /etc/hosts with the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import subprocess

SUBNET = "10.77.0"  # private addresses that exist only inside the namespaces made here


@dataclasses.dataclass(frozen=True)
class Node:
    netns: str  # the namespace's name, for `ip netns exec`
    ifname: str  # its veth end (e.g. for GLOO_SOCKET_IFNAME)
    addr: str  # its address on the veth, e.g. 10.77.0.1

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside this namespace (the environment is passed on by `ip netns exec`)."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """None if namespaces can be made here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    probe = f"zo-probe-{os.getpid()}-{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed (no CAP_NET_ADMIN/CAP_SYS_ADMIN?): {made.stderr.strip()}"
    try:
        veth = _ip("-n", probe, "link", "add", "zp0", "type", "veth", "peer", "name", "zp1",
                   check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@contextlib.contextmanager
def two_nodes(subnet: str = SUBNET):
    """Yield (node_a, node_b): two namespaces at <subnet>.1 and <subnet>.2, torn down after."""
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"  # interface names: <= 15 chars
    nodes = (Node(f"zo-a-{tag}", f"zoa{tag}", f"{subnet}.1"),
             Node(f"zo-b-{tag}", f"zob{tag}", f"{subnet}.2"))
    made: list[str] = []
    try:
        for node in nodes:
            _ip("netns", "add", node.netns)
            made.append(node.netns)
        a, b = nodes
        # Create the pair inside a's namespace and move b's end over: no interface ever
        # appears in the host's namespace, so nothing leaks there if we are killed.
        _ip("-n", a.netns, "link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
        _ip("-n", a.netns, "link", "set", b.ifname, "netns", b.netns)
        for node in nodes:
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", node.ifname)
            _ip("-n", node.netns, "link", "set", node.ifname, "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for name in reversed(made):
            _ip("netns", "del", name, check=False)
