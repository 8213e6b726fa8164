"""What the cluster scenarios share: the event tap on a quorum queue, the hosts' processes, the
time from the fault to all applied."""

from __future__ import annotations

import subprocess
import time

from tests.faults.checker import EventTap, Ledger, wait_settled
from tests.faults.traffic import order, send
from worker.local import hosts

W1, W2 = hosts.host("w1"), hosts.host("w2")
# The goal of every cluster scenario: everything sent applied within this many seconds of the fault.
GOAL_SECONDS = 60


class QuorumEventTap(EventTap):
    """The fault suite's event tap, its queue a quorum queue: replicated on the three nodes, so
    that losing one node loses none of the events it received (a classic queue lives on one node).
    Its connection fails over along the broker URL's list of nodes, as every client's does."""

    def _queue(self):
        from kombu import Connection, Exchange, Queue

        if self._conn is None:
            self._conn = Connection(self.broker_url, connect_timeout=3)
        exchange = Exchange("invoices.events", type="topic", durable=True)
        queue = Queue(self.queue_name, exchange, routing_key="#", durable=True,
                      queue_arguments={"x-queue-type": "quorum"})
        bound = queue(self._conn.default_channel)
        bound.declare()
        return bound

    def _take(self) -> None:
        """As EventTap's, but each event acknowledged after it is counted: the fault suite's tap takes
        with no_ack, and an event in flight to it when its node was SIGKILLed was gone (counted as
        missing in the first run of the leader-kill scenario). Unacknowledged, it comes again (a
        copy, which the checker allows)."""
        bound = self._queue()
        while (message := bound.get(no_ack=False, accept=["json", "application/data", "text/plain"])) is not None:
            if message.content_type != "application/json":
                self.not_json.append(message.content_type)
            else:
                event = message.decode()
                self.received += 1
                self.copies[event["eventId"]] += 1
                self.events.setdefault(event["eventId"], event)
            message.ack()


def invoices(scenario, ledger: Ledger, tenant: str, count: int, held: bool = False) -> list[str]:
    """`count` issued invoices of 1000.00 (F-00000, …), applied before the scenario's fault; with
    `held`, one more, F-HELD, for InvoiceHold."""
    publisher = scenario.publisher()
    numbers = [f"F-{i:05d}" for i in range(count)]
    for number in [*numbers, *(["F-HELD"] if held else [])]:
        send(publisher, ledger, "invoices.order_shipped", order(tenant, number))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    return numbers


def held_by(environment, host: hosts.Host) -> int:
    """Messages delivered to the consumers of `host` and not acknowledged (RabbitMQ's channels are
    named after the client's address), asked of a node that answers."""
    for node in environment.rabbit.nodes.values():
        if node.process is None or node.host.is_cut():
            continue
        try:
            done = node.cli("rabbitmqctl", "list_channels", "--no-table-headers", "name", "messages_unacknowledged",
                            timeout=20)
        except subprocess.TimeoutExpired:
            continue
        if done.returncode != 0:
            continue
        total = 0
        for line in done.stdout.splitlines():
            fields = line.split()
            if fields and fields[0].startswith(f"{host.address}:") and fields[-1].isdigit():
                total += int(fields[-1])
        return total
    return 0


def wait_until(predicate, timeout: float, interval: float = 0.2) -> float | None:
    """Poll until predicate() holds; the moment it did (time.monotonic()), or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(interval)
    return None
