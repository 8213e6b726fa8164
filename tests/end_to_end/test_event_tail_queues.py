"""Issue #23, item 9: `invoice-worker events tail` leaves no queue behind. Real tail processes on
the session's broker: on Redis, ended by SIGTERM or SIGHUP they delete their queue and binding,
and the queue of one killed outright (SIGKILL) is pruned by beat's housekeeping task while a live
tail's is kept; on RabbitMQ the queue carries x-expires, so the broker removes it whatever
happens to the tail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT, send, wait_for

TAIL_PREFIX = "invoices.events.tail."
BINDINGS = "_kombu.binding.invoices.events"
on_redis = pytest.mark.skipif(os.environ.get("BROKER_URL", "").startswith("amqp"), reason="Redis's tail queues")
on_rabbitmq = pytest.mark.skipif(not os.environ.get("BROKER_URL", "").startswith("amqp"), reason="RabbitMQ's x-expires")


class TailProcess:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "events", "tail"], cwd=ROOT,
                                     env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        for line in self.proc.stderr:  # log lines may come first; EOF (tail exited) ends the loop
            if line.startswith("tailing invoices.events"):
                self.line = line.strip()
                break
        else:
            raise AssertionError("the tail exited before it bound its queue")

    def stop(self, signum: int) -> int:
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(30)
            self.rest = self.proc.stderr.read()
            return code
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the tail did not end within 30 s of signal {signum}") from None


@pytest.fixture
def redis_client(broker: str) -> Any:
    import redis

    client = redis.Redis.from_url(broker)
    yield client
    client.close()


def tail_queues(client: Any) -> set[str]:
    """The tail queues bound to invoices.events, and those that exist as lists."""
    bound = {m.decode().split("\x06\x16")[-1] for m in client.smembers(BINDINGS)}
    lists = {k.decode().split("\x06\x16")[0] for k in client.scan_iter(match=TAIL_PREFIX + "*")}
    return {q for q in bound | lists if q.startswith(TAIL_PREFIX)}


def publish_event(broker: str) -> None:
    """An event on the exchange, as the relay publishes one: it lands in every bound queue."""
    from kombu import Connection

    from worker.brokers.relay import EVENTS_EXCHANGE

    with Connection(broker) as conn:
        conn.Producer().publish({"type": "invoice.updated", "eventId": "tail-test"}, exchange=EVENTS_EXCHANGE,
                                routing_key="invoice.updated", serializer="json", declare=[EVENTS_EXCHANGE])


@on_redis
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_tail_ended_by_a_signal_leaves_no_queue_and_no_binding(running, broker, redis_client, signum):
    """Before the fix SIGTERM and SIGHUP ended the process without its `finally`: the queue stayed
    bound and collected every later event."""
    before = tail_queues(redis_client)
    tail = TailProcess()
    (mine,) = wait_for(lambda: tail_queues(redis_client) - before, 10, what="the tail's binding")
    publish_event(broker)  # something in its list, so the list exists too
    assert tail.stop(signum) == 0, tail.rest[-3000:]
    assert mine not in tail_queues(redis_client)
    assert not redis_client.exists(mine) and not redis_client.keys(f"*{mine}*")
    publish_event(broker)
    assert not redis_client.exists(mine)  # nothing collects later events under its name


@on_redis
def test_beat_prunes_the_queue_of_a_killed_tail_and_keeps_a_live_ones(running, broker, redis_client):
    """Before the fix nothing ever removed the queue of a tail killed outright."""
    before = tail_queues(redis_client)
    killed = TailProcess()
    (orphan,) = wait_for(lambda: tail_queues(redis_client) - before, 10, what="the killed tail's binding")
    killed.stop(signal.SIGKILL)
    live = TailProcess()
    (kept,) = wait_for(lambda: tail_queues(redis_client) - before - {orphan}, 10, what="the live tail's binding")
    try:
        publish_event(broker)
        assert redis_client.exists(orphan)  # the orphan collects events
        # the killed tail's heartbeat runs out (60 s after its last beat; here at once)
        redis_client.pexpire(f"invoices.events.tail-alive.{orphan}", 1)
        send("invoices.prune_records", {})  # what beat sends every hour
        wait_for(lambda: orphan not in tail_queues(redis_client) and not redis_client.keys(f"*{orphan}*"), 60,
                 what="the orphan queue to be pruned")
        assert kept in tail_queues(redis_client) and live.proc.poll() is None
        publish_event(broker)
    finally:
        assert live.stop(signal.SIGTERM) == 0, live.rest[-3000:]
    assert kept not in tail_queues(redis_client)


@on_rabbitmq
def test_on_rabbitmq_the_tail_queue_expires_by_itself(running, broker):
    """The queue carries x-expires: declaring it with other arguments is refused (inequivalent
    arg), with the same ones accepted. Before the fix it carried none."""
    import amqp

    from tests.end_to_end.test_ingress import plain_connection

    tail = TailProcess()
    try:
        assert " through " in tail.line, tail.line
        name = tail.line.rsplit(" through ", 1)[1]
        assert name.startswith(TAIL_PREFIX)
        conn = plain_connection(broker)
        try:
            conn.channel().queue_declare(name, durable=False, auto_delete=True, arguments={"x-expires": 60_000})
            with pytest.raises(amqp.exceptions.PreconditionFailed):
                conn.channel().queue_declare(name, durable=False, auto_delete=True)  # no x-expires
        finally:
            conn.close()
        # Beat's housekeeping leaves them to RabbitMQ, through the app's own transport (the AMQP
        # subclass, whose connection URI names its class where the scheme was: the Redis pruning
        # ran on it and failed with AttributeError).
        from worker.celery_app import app
        from worker.delivery.scheduler import prune_event_tails

        assert prune_event_tails(app) == []
    finally:
        assert tail.stop(signal.SIGTERM) == 0, tail.rest[-3000:]
