"""A three-node RabbitMQ cluster on namespace hosts (worker/local/hosts.py), for `make test-cluster`.

Each node is a RabbitNode (worker/local/rabbitmq_node.py) on its own host: `rabbit@10.77.0.11`
… `.13`, AMQP on 5672 of its address, one shared Erlang cookie, data under the cluster's folder.
The settings that make it a cluster a worker can rely on (docs/brokers.md, "A cluster"):

- `cluster_partition_handling = pause_minority`: a node cut off from the other two pauses (closes
  its listeners, its clients fail over) instead of running on as a second cluster whose state
  would have to be thrown away when the partition heals.
- `net_ticktime = 10`: a node that stops answering is declared down after 10-13 s (ticks every
  2.5 s, down after four missed), so a 30 s partition is noticed and handled well inside it
  (Erlang's default of 60 s would notice it only near its end).
- quorum queues for the contract's queues (RABBITMQ_QUEUE_TYPE=quorum, set by the worker and the
  publishers): replicated on all three nodes, a new leader elected when one is lost.

    python -m worker.local.cluster start DIR   # hosts, then the nodes; prints BROKER_URL
    python -m worker.local.cluster stop DIR
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from worker.local import hosts
from worker.local.rabbitmq_node import RabbitNode, install

NET_TICKTIME = 10
BROKER_HOSTS = ("mq1", "mq2", "mq3")


def cluster_config(members: list[hosts.Host]) -> str:
    nodes = "".join(f"cluster_formation.classic_config.nodes.{i} = rabbit@{h.address}\n"
                    for i, h in enumerate(members, 1))
    return ("cluster_partition_handling = pause_minority\n"
            f"net_ticktime = {NET_TICKTIME}\n"
            "cluster_formation.peer_discovery_backend = classic_config\n" + nodes)


class RabbitCluster:
    """Three RabbitNodes, one per host, joined at start (the first node alone, then the others
    join it: started all at once, two could each form a cluster of their own)."""

    def __init__(self, root: Path, members: list[hosts.Host] | None = None) -> None:
        self.root = Path(root)
        self.members = members or [hosts.host(name) for name in BROKER_HOSTS]
        cookie_file = self.root / "cookie"
        self.root.mkdir(parents=True, exist_ok=True)
        if not cookie_file.exists():
            cookie_file.write_text(secrets.token_hex(16).upper())
        cookie = cookie_file.read_text()
        config = cluster_config(self.members)
        self.nodes = {h.name: RabbitNode(self.root / h.name, host=h, config=config, cookie=cookie)
                      for h in self.members}

    @property
    def url(self) -> str:
        """BROKER_URL for a client of the cluster: every node, `;`-separated (kombu fails over in turn)."""
        return ";".join(node.url for node in self.nodes.values())

    def start(self, timeout: float = 180) -> str:
        first, *others = self.nodes.values()
        first.start(timeout)
        with ThreadPoolExecutor(len(others)) as pool:
            list(pool.map(lambda node: node.start(timeout), others))
        self.wait_formed(timeout)
        return self.url

    def wait_formed(self, timeout: float = 120) -> None:
        """Until every node lists all three as running."""
        deadline = time.monotonic() + timeout
        while True:
            missing = {name: self.running_nodes(name) for name in self.nodes}
            if all(len(running) == len(self.nodes) for running in missing.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the RabbitMQ cluster did not form within {timeout:.0f} s: {missing}")
            time.sleep(1)

    def running_nodes(self, name: str) -> list[str]:
        """The running nodes of the cluster as the node on host `name` sees them ([] when it does
        not answer). Its own view (mnesia's), asked of it alone: `rabbitmqctl cluster_status` asks
        every node and hung past 30 s while one was cut off (seen in the partition scenario)."""
        import re

        try:
            done = self.nodes[name].cli("rabbitmqctl", "eval", "rabbit_mnesia:cluster_nodes(running).", timeout=15)
        except subprocess.TimeoutExpired:
            return []
        if done.returncode != 0:
            return []
        return re.findall(r"'([^']+)'", done.stdout)

    def node_of(self, erlang_name: str) -> RabbitNode:
        for node in self.nodes.values():
            if node.name == erlang_name:
                return node
        raise KeyError(erlang_name)

    def leader(self, queue: str) -> RabbitNode:
        """The node that leads the quorum queue `queue` now (asked of a node that answers)."""
        for node in self.nodes.values():
            if node.process is None:
                continue
            try:
                done = node.cli("rabbitmqctl", "list_queues", "--no-table-headers", "name", "leader", timeout=30)
            except subprocess.TimeoutExpired:
                continue
            if done.returncode != 0:
                continue
            for line in done.stdout.splitlines():
                fields = line.split()
                if len(fields) == 2 and fields[0] == queue:
                    return self.node_of(fields[1])
        raise RuntimeError(f"no node named a leader of {queue}")

    def stop(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(), self.nodes.values()))


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        sys.stderr.write("usage: python -m worker.local.cluster start|stop DIR\n")
        return 2
    root = Path(argv[1])
    if argv[0] == "stop":
        hosts.destroy()  # every node and epmd in the hosts' namespaces
        return 0
    install()
    hosts.create()
    cluster = RabbitCluster(root)
    started = time.monotonic()
    url = cluster.start()
    sys.stderr.write(f"RabbitMQ cluster formed in {time.monotonic() - started:.1f} s\n")
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
