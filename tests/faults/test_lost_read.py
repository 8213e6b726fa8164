"""A read's reply lost on the wire (worker/brokers/redis_transport.py). A read is one script (TAKE) that
takes up to 100 messages of a queue and registers them as delivered (the `unacked` hash) in the
same step. When the connection drops after the broker ran it and before its reply arrived, those
messages are off their list but registered, so the channel that lost the reply finds and hands
them back as soon as the broker answers again. (With kombu's BRPOP, and later with BRPOP followed
by such a script, the messages of a lost reply existed nowhere: 0, then 1, of 5 came back.) And
nothing blocks at the broker waiting to take a message: behind a silent partition, a message
published meanwhile stays on its list (kombu's BRPOP took it and lost it). Real broker, real
sockets: the proxy cuts exactly at the reply, or drops everything while the connections stay up.
A no-ack consumer's reads are not registered at all (kombu does not register them either)."""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.conftest import wait_for
from tests.faults.conftest import TcpCut

EVAL = b"$4\r\nEVAL\r\n"  # the request of a script sent whole (EVALSHA is another command)


def redis_queue(fault_environment, prefix: str) -> tuple[Any, Queue, str]:  # noqa: ANN001 - a fixture
    """The fault environment's broker, flushed, with a fresh queue declared on it, and the Redis
    transport: these tests are of its read (skipped on RabbitMQ)."""
    broker = fault_environment.broker
    if not broker.url.startswith("redis"):
        pytest.skip("the Redis transport's read")
    from worker.brokers.redis_transport import TRANSPORT

    broker.flush()
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(broker.url, transport=TRANSPORT) as conn:
        queue(conn.default_channel).declare()
    return broker, queue, TRANSPORT


def publish(url: str, transport: str, queue: Queue, bodies: list[dict]) -> None:
    with Connection(url, transport=transport) as conn:
        producer = Producer(conn.default_channel)
        for body in bodies:
            producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key, serializer="json")


class CutAtScriptReply(TcpCut):
    """Forwards everything until a client sends EVAL; the broker runs it, and the proxy cuts every
    connection instead of passing its reply on."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.script_sent = threading.Event()
        self.reply_dropped = threading.Event()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            to_server = sink.getpeername()[1] == self.target[1]
            while data := source.recv(65536):
                if not to_server and self.script_sent.is_set():
                    self.reply_dropped.set()
                    self.cut()
                    return
                if to_server and EVAL in data:
                    self.script_sent.set()
                sink.sendall(data)
        except OSError:
            pass


def test_messages_taken_by_a_script_whose_reply_is_lost_come_back(fault_environment):
    broker, queue, transport = redis_queue(fault_environment, "lost-read")
    sent = [f"m-{i}" for i in range(5)]
    publish(broker.url, transport, queue, [{"messageId": message_id} for message_id in sent])

    received: list[str] = []

    def consume(url: str, until_error: bool) -> None:
        with Connection(url, transport=transport, transport_options={"visibility_timeout": 3600}) as conn:
            channel = conn.channel()
            channel.basic_qos(0, 10, False)

            def on_message(body, message):  # noqa: ANN001
                received.append(body["messageId"])
                message.ack()

            with Consumer(channel, queues=[queue], callbacks=[on_message], accept=["json"]):
                if until_error:
                    with pytest.raises(conn.connection_errors):
                        conn.drain_events(timeout=5)
                    return
                while len(received) < len(sent):
                    try:
                        conn.drain_events(timeout=5)
                    except socket.timeout:
                        break

    proxy = CutAtScriptReply(broker.port)
    proxy.up()
    consume(broker.url_via(proxy.port), until_error=True)
    assert proxy.reply_dropped.is_set(), "the proxy never saw the read's script"
    assert received == []
    # The read ran at the broker: every message is off its list, and registered as delivered.
    server = redis.Redis(port=broker.port)
    assert (server.llen(queue.name), server.hlen("unacked")) == (0, len(sent))
    # The broker answers again (the proxy is not needed for that): the same worker process reads on.
    consume(broker.url, until_error=False)
    proxy.cut()
    assert sorted(received) == sent, f"taken off the queue and never delivered: {sorted(set(sent) - set(received))}"


class Partition(TcpCut):
    """Forwards until partitioned; then drops whatever either side sends while every connection
    stays open: the broker does not notice its client is gone, as behind a silent partition.
    `reads` counts the read scripts forwarded to the broker."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.partitioned = threading.Event()
        self.reads = 0

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            to_server = sink.getpeername()[1] == self.target[1]
            while data := source.recv(65536):
                if not self.partitioned.is_set():
                    if to_server and (EVAL in data or b"EVALSHA" in data):
                        self.reads += 1
                    sink.sendall(data)
        except OSError:
            pass


def blocked_clients(server: redis.Redis) -> int:
    """Clients the broker holds in a blocking command (flag b)."""
    return sum(1 for client in server.client_list() if "b" in client.get("flags", ""))


def test_a_message_published_behind_a_silent_partition_stays_on_its_queue(fault_environment):
    broker, queue, transport = redis_queue(fault_environment, "partition")
    proxy = Partition(broker.port)
    proxy.up()
    received: list[str] = []
    stop = threading.Event()

    def consume() -> None:
        with Connection(broker.url_via(proxy.port), transport=transport) as conn:
            channel = conn.channel()
            with Consumer(channel, queues=[queue], callbacks=[lambda body, message: received.append(body)],
                          accept=["json"]):
                while not stop.is_set():
                    try:
                        conn.drain_events(timeout=0.1)
                    except (socket.timeout, *conn.connection_errors):
                        pass

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    server = redis.Redis(port=broker.port)
    wait_for(lambda: proxy.reads >= 3, 30, what="the consumer to read on, idle, through the proxy")
    proxy.partitioned.set()
    # What it sent before has run: nothing is left blocked at the broker (kombu's BRPOP would be,
    # for up to 1 s, and take the next message published).
    wait_for(lambda: blocked_clients(server) == 0, 5, what="no command of the consumer left waiting at the broker")
    publish(broker.url, transport, queue, [{"messageId": "behind-the-partition"}])
    on_queue, registered = server.llen(queue.name), server.hlen("unacked")
    stop.set()
    consumer.join(timeout=5)
    proxy.cut()
    assert received == []
    assert (on_queue, registered) == (1, 0), "taken off its queue by a read whose answer went nowhere"


def test_what_a_no_ack_consumer_reads_is_not_left_registered(fault_environment):
    """A no-ack consumer (Celery's control replies) never acknowledges: a read that registered what
    it took for one left it in `unacked`, to come back after the visibility timeout."""
    broker, queue, transport = redis_queue(fault_environment, "no-ack")
    publish(broker.url, transport, queue, [{"messageId": "reply"}])
    received: list[dict] = []
    with Connection(broker.url, transport=transport) as conn:
        with Consumer(conn.channel(), queues=[queue], callbacks=[lambda body, message: received.append(body)],
                      accept=["json"], no_ack=True):
            conn.drain_events(timeout=5)
    assert received == [{"messageId": "reply"}]
    assert redis.Redis(port=broker.port).hlen("unacked") == 0
