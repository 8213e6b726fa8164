"""Several hosts on one machine, as Linux network namespaces: the cluster scenarios' machines
(`make test-cluster`), so that a partition is a link going down, not a proxy.

    bridge iwbr0 (root namespace, 10.77.0.1/24)
      ├── veth iwv-mq1 ── namespace iw-mq1, eth0 10.77.0.11/24 (+ lo)
      ├── veth iwv-mq2 ── namespace iw-mq2, eth0 10.77.0.12/24
      └── …

Every host reaches every other and the root namespace (10.77.0.1) over the bridge; nothing is
routed anywhere else (no default route, no forwarding): traffic stays on loopback and these
addresses. Root is needed (`ip netns`, `ip link`); CI runs as root.

    from worker.local import hosts
    mq1 = hosts.Host("mq1", "10.77.0.11")
    hosts.create([mq1, …])           # removes an earlier run's leftovers first
    subprocess.Popen(mq1.argv(["rabbitmq-server"]))   # a process on that host
    mq1.cut(); mq1.heal()            # its link down / up: a partition, as a cable pulled
    hosts.addresses([mq1, …])        # {"mq1": "10.77.0.11", …}
    hosts.destroy([mq1, …])          # idempotent; kills what still runs in the namespaces

`python -m worker.local.hosts up|down|list` does the same for the planned hosts (PLANNED).

Two runs on one machine at once would share the names: INVOICE_HOSTS_PREFIX (default `iw`) and
INVOICE_HOSTS_SUBNET (default `10.77.0`) give a second run names and addresses of its own
(bridge `<prefix>br0`, namespaces `<prefix>-<name>`, veths `<prefix>v-<name>`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

PREFIX = os.environ.get("INVOICE_HOSTS_PREFIX", "iw")
SUBNET = os.environ.get("INVOICE_HOSTS_SUBNET", "10.77.0")
BRIDGE = f"{PREFIX}br0"
GATEWAY = f"{SUBNET}.1"  # the root namespace's address on the bridge


@dataclass(frozen=True)
class Host:
    """One host: a network namespace `<prefix>-<name>` with `address` on the bridge."""

    name: str
    address: str

    @property
    def namespace(self) -> str:
        return f"{PREFIX}-{self.name}"

    @property
    def veth(self) -> str:
        """The root-namespace end of the host's link (on the bridge); at most 15 characters."""
        return f"{PREFIX}v-{self.name}"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run on this host (Popen / run it as any command)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), **kwargs)

    def cut(self) -> None:
        """The host's link down: it reaches neither the other hosts nor the root namespace (nor they
        it) until heal(); its processes keep running and their connections stay open, silent."""
        _ip("link", "set", self.veth, "down")

    def heal(self) -> None:
        """The link up again. The neighbour entries that failed during the cut are flushed, else the
        host's first connections could still fail with "no route to host" for a second or two."""
        _ip("link", "set", self.veth, "up")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "LOWER_UP" not in _ip("-o", "link", "show", "eth0",
                                                                     namespace=self.namespace).stdout:
            time.sleep(0.05)
        _ip("neigh", "flush", "dev", "eth0", namespace=self.namespace, check=False)

    def is_cut(self) -> bool:
        shown = subprocess.run(["ip", "-o", "link", "show", self.veth], capture_output=True, text=True)
        flags = shown.stdout.partition("<")[2].partition(">")[0].split(",")
        return "UP" not in flags

    def pids(self) -> list[int]:
        """The processes running in the namespace."""
        listed = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True)
        return [int(pid) for pid in listed.stdout.split()]


# The planned hosts of the cluster scenarios: three RabbitMQ nodes, two database hosts
# (PostgreSQL + Patroni + etcd), a third etcd member, two worker hosts (which also run the relays).
PLANNED = (
    Host("mq1", f"{SUBNET}.11"), Host("mq2", f"{SUBNET}.12"), Host("mq3", f"{SUBNET}.13"),
    Host("db1", f"{SUBNET}.21"), Host("db2", f"{SUBNET}.22"), Host("etc3", f"{SUBNET}.23"),
    Host("w1", f"{SUBNET}.31"), Host("w2", f"{SUBNET}.32"),
)


def host(name: str) -> Host:
    """The planned host of that name."""
    for planned in PLANNED:
        if planned.name == name:
            return planned
    raise KeyError(name)


def addresses(hosts: Iterable[Host] = PLANNED) -> dict[str, str]:
    return {h.name: h.address for h in hosts}


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["-n", namespace] if namespace else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


def create(hosts: Iterable[Host] = PLANNED) -> list[Host]:
    """The bridge and each host's namespace and link, after removing an earlier run's leftovers."""
    if os.geteuid() != 0:
        raise RuntimeError("network namespaces need root (ip netns); CI runs as root")
    hosts = list(hosts)
    destroy(hosts)
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for h in hosts:
        peer = f"{PREFIX}p-{h.name}"
        _ip("netns", "add", h.namespace)
        _ip("link", "add", h.veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", h.namespace)
        _ip("link", "set", peer, "name", "eth0", namespace=h.namespace)
        _ip("addr", "add", f"{h.address}/24", "dev", "eth0", namespace=h.namespace)
        _ip("link", "set", "lo", "up", namespace=h.namespace)
        _ip("link", "set", "eth0", "up", namespace=h.namespace)
        _ip("link", "set", h.veth, "master", BRIDGE)
        _ip("link", "set", h.veth, "up")
    return hosts


def destroy(hosts: Iterable[Host] = PLANNED) -> None:
    """Every process left in the hosts' namespaces killed, the namespaces, links and bridge removed;
    also any namespace of this prefix an earlier run left. Safe to call again."""
    names = {h.namespace for h in hosts}
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names |= {line.split()[0] for line in listed.splitlines() if line.startswith(f"{PREFIX}-")}
    for namespace in sorted(names):
        _kill_all(namespace)
        _ip("netns", "delete", namespace, check=False)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{PREFIX}v-") or name.startswith(f"{PREFIX}p-"):
            _ip("link", "delete", name, check=False)
    _ip("link", "delete", BRIDGE, check=False)


def _kill_all(namespace: str, timeout: float = 10) -> None:
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    pids = [int(pid) for pid in listed.stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            time.sleep(0.1)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _main(argv: list[str]) -> int:
    if argv[:1] == ["up"]:
        create(PLANNED)
    elif argv[:1] == ["down"]:
        destroy(PLANNED)
    elif argv[:1] != ["list"]:
        sys.stderr.write("usage: python -m worker.local.hosts up|down|list\n")
        return 2
    for name, address in addresses(PLANNED).items():
        print(f"{name}\t{address}\t{PREFIX}-{name}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
