"""The queues of `invoice-worker events tail` (worker/cli/events.py): each tail reads the events
through a queue of its own bound to `invoices.events`, and such a queue must not outlive its
tail. A queue left behind collects every later event; on Redis, under `noeviction`, until Redis
refuses all writes (issue #23, item 9).

- RabbitMQ expires the queue itself: `x-expires` (TAIL_EXPIRES_MS) deletes it once no consumer
  has used it for that long, however its tail ended (auto-delete alone needs a consumer to have
  attached and to be cancelled).
- Redis has no such thing. The tail deletes its queue on every signal it can catch (SIGTERM,
  SIGHUP, SIGINT); for what it cannot (SIGKILL, a lost host) its queue is findable by its name
  (TAIL_PREFIX) and beat prunes it (`invoices.prune_records`, hourly). A live tail is told from an
  orphan by a heartbeat key the tail refreshes every HEARTBEAT_SECONDS and that Redis expires
  after HEARTBEAT_TTL_SECONDS: a queue whose heartbeat has expired belongs to no tail.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from kombu import Queue
from kombu.utils.encoding import bytes_to_str

from worker.brokers.relay import EVENTS_EXCHANGE

log = logging.getLogger(__name__)

TAIL_PREFIX = "invoices.events.tail."
HEARTBEAT_PREFIX = "invoices.events.tail-alive."  # not under TAIL_PREFIX: a heartbeat is not a queue
HEARTBEAT_SECONDS = 10.0
HEARTBEAT_TTL_SECONDS = 60  # six missed beats: a tail stopped (SIGSTOP, a paused laptop) this long is gone
TAIL_EXPIRES_MS = 60_000


def heartbeat_key(queue_name: str) -> str:
    return HEARTBEAT_PREFIX + queue_name


class Tail:
    """The queue of one tail: declared with its heartbeat, kept alive by `beat()`, removed by
    `close()` (queue, bindings and heartbeat)."""

    def __init__(self, connection: Any, types: tuple[str, ...]) -> None:
        self.connection = connection
        self.name = TAIL_PREFIX + uuid.uuid4().hex[:12]
        self.amqp = speaks_amqp(connection)
        arguments = {"x-expires": TAIL_EXPIRES_MS} if self.amqp else None
        self.queues = [Queue(self.name, EVENTS_EXCHANGE, routing_key=t, durable=False, auto_delete=True,
                             queue_arguments=arguments) for t in types]
        self._last_beat = 0.0

    def open(self) -> None:
        self._beat()  # before the queue exists: prune never sees this queue without its heartbeat
        self._declare()

    def beat(self) -> None:
        """Refresh the heartbeat (at most every HEARTBEAT_SECONDS). A tail that was stopped past
        the TTL finds its heartbeat gone, and its queue perhaps pruned: it declares it again."""
        if self.amqp or time.monotonic() - self._last_beat < HEARTBEAT_SECONDS:
            return
        with self._client() as client:
            alive = client.expire(heartbeat_key(self.name), HEARTBEAT_TTL_SECONDS)
        if not alive:
            log.warning("events tail: the heartbeat of %s had expired; declaring its queue again", self.name)
            self._beat()
            self._declare()
        self._last_beat = time.monotonic()

    def close(self) -> None:
        channel = self.connection.default_channel
        for queue in self.queues:
            queue(channel).delete()
        if not self.amqp:
            with self._client() as client:
                client.delete(heartbeat_key(self.name))

    def _beat(self) -> None:
        if not self.amqp:
            with self._client() as client:
                client.set(heartbeat_key(self.name), "1", ex=HEARTBEAT_TTL_SECONDS)
            self._last_beat = time.monotonic()

    def _declare(self) -> None:
        channel = self.connection.default_channel
        for queue in self.queues:
            queue(channel).declare()

    def _client(self) -> Any:
        # Not the channel's own client: that one's connection may be waiting for a BRPOP's answer.
        return self.connection.default_channel.conn_or_acquire()


def speaks_amqp(connection: Any) -> bool:
    """Whether a kombu connection is to RabbitMQ: by its transport's driver (amqp:// and pyamqp://
    take worker/brokers/amqp_transport.py, amqps:// kombu's own)."""
    return connection.transport.driver_type == "amqp"


def prune_orphans(connection: Any) -> list[str]:
    """Remove the tail queues whose heartbeat has expired, with their bindings to invoices.events;
    return their names. RabbitMQ expires its own (x-expires): nothing to do there."""
    if speaks_amqp(connection):
        return []
    channel = connection.default_channel
    with channel.conn_or_acquire() as client:
        return _prune(channel, client)


def _prune(channel: Any, client: Any) -> list[str]:
    bindings = channel.keyprefix_queue % EVENTS_EXCHANGE.name  # kombu's set of the exchange's bindings
    orphans: set[str] = set()
    for member in client.smembers(bindings):
        queue = bytes_to_str(member).split(channel.sep)[-1]
        if queue.startswith(TAIL_PREFIX) and not client.exists(heartbeat_key(queue)):
            client.srem(bindings, member)
            orphans.add(queue)
    # lists left without a binding (a tail killed half-way through its own delete)
    for key in client.scan_iter(match=TAIL_PREFIX + "*", count=500):
        queue = bytes_to_str(key).split(channel.sep)[0]  # kombu's priority lists are `queue<sep><priority>`
        if not client.exists(heartbeat_key(queue)):
            orphans.add(queue)
    for queue in orphans:
        client.delete(*{channel._q_for_pri(queue, pri) for pri in channel.priority_steps})
    if orphans:
        log.info("pruned %d queues of event tails that are gone: %s", len(orphans), ", ".join(sorted(orphans)))
    return sorted(orphans)
