"""kombu's Redis transport, with one fix and two changes for speed (reading up to 100 messages per
BRPOP answer, and acknowledging a batch in one round trip; see Channel). The fix: messages that could not be handed back when the broker
went away are handed back as soon as it answers again, not after the visibility timeout.

On Redis, a delivered message waits in the `unacked` hash until it is acknowledged. When the
connection drops, Celery closes the channel and kombu tries to put the channel's unacknowledged
messages back on their queues; with the broker away that fails ("UNABLE TO RESTORE"), and the
messages stay in the hash until `visibility_timeout` (an hour by default) passes. Measured before
this fix: the broker SIGKILLed and restarted 3 s later left 1 of 410 payments an hour late.

The same failure could also stop the worker outright: restoring through a connection Celery had
already torn down raised AttributeError in kombu 5.7, which Celery treats as unrecoverable (seen
in the broker-kill scenario of tests/faults with kombu's own transport).

Here the channel remembers the messages it could not restore (and any it could not even register
in the hash: BRPOP had already taken them off their list), and the next channel that reaches the
broker hands them back. A message restored twice (once here, once by kombu's visibility sweep)
runs twice; the inbox makes the second run a duplicate. A message restored while its
task still finishes on the old connection runs twice; the inbox makes the second run a duplicate.
"""

from __future__ import annotations

import logging
import threading

from time import monotonic, time

from kombu.transport import redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from kombu.utils.objects import cached_property

log = logging.getLogger(__name__)

_lock = threading.Lock()
# Messages of this process that could not be handed back (or not even registered as delivered)
# because the broker was away: delivery tag → (payload, exchange, routing key).
_orphans: dict[str, tuple[dict, str, str]] = {}
# Reads whose POP_WITHIN reply was lost: the `unacked` index score their messages were registered with.
_lost_reads: set[str] = set()


def orphans() -> frozenset[str]:
    with _lock:
        return frozenset(_orphans)


def _remember(messages: list) -> None:
    with _lock:
        for message in messages:
            info = message.delivery_info
            _orphans[message.delivery_tag] = (message._raw, info["exchange"], info["routing_key"])


def _remember_payloads(payloads: list[dict]) -> None:
    with _lock:
        for payload in payloads:
            info = payload["properties"]["delivery_info"]
            _orphans[payload["properties"]["delivery_tag"]] = (payload, info["exchange"], info["routing_key"])


class QoS(redis.QoS):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        # Delivery tags already written to the `unacked` hash by the read's script (POP_WITHIN).
        self.registered: set[str] = set()

    def held_bytes(self) -> int:
        """The bodies this channel holds: delivered, not yet acknowledged."""
        return sum(len(m.body or b"") for tag, m in self._delivered.items() if tag not in self._dirty)

    def can_consume(self) -> bool:
        """kombu's prefetch count, and a bound on the bytes held: a flood of the largest allowed
        messages (MAX_MESSAGE_BYTES each) fills HELD_BYTES, not the prefetch count times 8 MiB."""
        return super().can_consume() and (not self._delivered or self.held_bytes() < held_limit())

    def append(self, message, delivery_tag):  # noqa: ANN001 - kombu's signature
        """kombu registers a delivered message in the `unacked` hash after BRPOP took it from its
        list; when the broker goes away in between, the message would exist nowhere but here."""
        if delivery_tag in self.registered:  # registered with the others of its read: bookkeeping only
            self.registered.discard(delivery_tag)
            return super(redis.QoS, self).append(message, delivery_tag)
        try:
            return super().append(message, delivery_tag)
        except Exception:
            _remember([message])
            raise

    def restore_unacked(self, client=None):  # noqa: ANN001 - kombu's signature
        pending = [m for tag, m in self._delivered.items() if tag not in self._dirty]
        try:
            return super().restore_unacked(client)
        except Exception as exc:  # noqa: BLE001 - the broker is away, or the connection already torn down
            # (kombu 5.7 then fails on `conninfo.hostname` of a closed connection: an AttributeError
            # that Celery reports as an unrecoverable error and the worker exits; measured here)
            _remember(pending)
            self._delivered.clear()
            log.warning("broker away: %d unacknowledged message(s) will be handed back when it answers (%s)",
                        len(pending), exc)
            return None

    def ack_many(self, delivery_tags: list[str]) -> None:
        """Acknowledge a batch's messages with one round trip (kombu's ack is one pipeline each)."""
        with self.channel.conn_or_acquire() as client:
            pipe = client.pipeline()
            for tag in delivery_tags:
                self._remove_from_indices(tag, pipe)
            pipe.execute()
        for tag in delivery_tags:
            super(redis.QoS, self).ack(tag)  # the channel's own bookkeeping (kombu's virtual QoS)

    def restore_visible(self, *args, **kwargs):  # noqa: ANN002, ANN003
        restore_orphans(self)
        return super().restore_visible(*args, **kwargs)


def restore_orphans(qos: QoS) -> int:
    """Hand back the remembered messages through this channel, at the head of their queues (they
    waited longest): from the `unacked` hash where kombu registered them (removing them there), else
    from the copy kept here. Those it cannot reach yet stay remembered."""
    if not _find_lost_reads(qos):
        return 0
    with _lock:
        pending = list(_orphans.items())
    restored = 0
    for tag, (payload, exchange, routing_key) in pending:

        def hand_back(pipe) -> None:  # noqa: ANN001 - a redis pipeline in a WATCH transaction
            registered = pipe.hget(qos.unacked_key, tag)
            pipe.multi()
            pipe.zrem(qos.unacked_index_key, tag).hdel(qos.unacked_key, tag)
            message, ex, rk = loads(bytes_to_str(registered)) if registered else (payload, exchange, routing_key)
            if message is not None:  # None: a lost read's message no longer registered, acknowledged meanwhile
                qos.channel._do_restore_message(message, ex, rk, pipe)

        try:
            with qos.channel.conn_or_acquire() as client:
                client.transaction(hand_back, qos.unacked_key)
        except qos.channel.connection_errors + (OSError,):
            break
        with _lock:
            _orphans.pop(tag, None)
        restored += 1
    if restored:
        log.warning("handed back %d message(s) left unacknowledged when the broker went away", restored)
    return restored


def _find_lost_reads(qos: QoS) -> bool:
    """Turn each read whose POP_WITHIN reply was lost into orphans: the messages registered in the
    `unacked` index with that read's score (the script ran) are handed back from the hash; none
    registered (the script never ran) leaves nothing to do. False when the broker is away still."""
    with _lock:
        reads = list(_lost_reads)
    for score in reads:
        try:
            with qos.channel.conn_or_acquire() as client:
                tags = client.zrangebyscore(qos.unacked_index_key, score, score)
        except qos.channel.connection_errors + (OSError,):
            return False
        with _lock:
            for tag in tags:
                # no copy of its own: hand_back takes it from the hash, or finds it gone (acknowledged)
                _orphans.setdefault(bytes_to_str(tag), (None, None, None))
            _lost_reads.discard(score)
    return True


def held_limit() -> int:
    from worker.config import settings

    return HELD_MESSAGES_OF_MAX_SIZE * settings().max_message_bytes


# What a worker's consumer holds at most, in bodies delivered and not yet acknowledged: room for
# two of the largest allowed messages (16 MiB by default), whatever the prefetch count. A batch of
# 100 payments is 30 KB; imports are what this bounds (measured, 60 imports of 1,000 invoices with
# batching on: worker PSS 439 MB with room for eight, 357 MB with two; 254 MB with batching off).
HELD_MESSAGES_OF_MAX_SIZE = 2
# Up to ARGV[1] more messages from the list KEYS[1], while their bytes stay within ARGV[2] (the last
# one taken may pass it): one round trip, bounded memory. Each is registered in the `unacked` hash
# KEYS[2] and its index KEYS[3] (scored ARGV[3]) in the same script, as kombu registers a delivery
# ([payload, exchange, routing key], the payload's bytes as they were), and so is the message BRPOP
# answered with (tag ARGV[4], entry ARGV[5]): a reply lost on the wire leaves them all registered,
# where the channel that lost it finds them by that score (restore_orphans), none nowhere.
POP_WITHIN = """
local function delivery(item)
  local info = cjson.decode(item)['properties']
  local where = info['delivery_info']
  return info['delivery_tag'], cjson.encode(where['exchange']), cjson.encode(where['routing_key'])
end
local taken, bytes = {}, 0
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
for i = 1, tonumber(ARGV[1]) do
  if bytes >= tonumber(ARGV[2]) then break end
  local item = redis.call('RPOP', KEYS[1])
  if not item then break end
  local ok, tag, exchange, routing_key = pcall(delivery, item)
  if not ok or type(tag) ~= 'string' then
    redis.call('RPUSH', KEYS[1], item)  -- not a kombu message: back where it was, for BRPOP to take alone
    break
  end
  bytes = bytes + #item
  redis.call('ZADD', KEYS[3], ARGV[3], tag)
  redis.call('HSET', KEYS[2], tag, '[' .. item .. ',' .. exchange .. ',' .. routing_key .. ']')
  taken[#taken + 1] = item
end
return taken
"""


# While a queue is left out of BRPOP, how long BRPOP waits on the others before it looks again.
LEFT_OUT_POLL_SECONDS = 0.05


def one_at_a_time_queues() -> dict[str, int]:
    """The imports queue (large, long messages) may hold no more than the ordinary prefetch
    (WORKER_CONCURRENCY × WORKER_PREFETCH_MULTIPLIER) and one more, however far batching raises the
    channel's prefetch count for the message queues. The one more is the next import, decoded and
    ready when a pool process frees up: with exactly one per process, a freed process waited for
    the main process to notice (up to LEFT_OUT_POLL_SECONDS), fetch and hand over the next one
    (measured on a quiet machine, 50,000 invoices, alternating: 8,616 and 8,076 invoices/s
    without it, 8,951 and 8,739 with it; peak PSS 246 → 252 MB). (A worker consuming imports
    alone, which BRPOP cannot leave out, keeps kombu's behaviour: bounded by the prefetch count
    and the held bytes.)"""
    from worker.config import settings

    config = settings()
    limit = config.worker_concurrency * config.worker_prefetch_multiplier + 1
    return {"invoices.imports": limit}


class Channel(redis.Channel):
    QoS = QoS
    # The most messages taken from a queue in one read, beside the one BRPOP answered with.
    MORE_PER_READ = 100
    _pop_many = True

    def _held_per_queue(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for tag, message in self.qos._delivered.items():
            if tag not in self.qos._dirty:
                queue = (message.delivery_info or {}).get("routing_key")
                held[queue] = held.get(queue, 0) + 1
        return held

    def _brpop_start(self, timeout=None):  # noqa: ANN001 - kombu's signature
        """kombu's BRPOP over the consumed queues, leaving out a one-at-a-time queue (imports) that
        already holds its share: measured, 60 imports with batching on took 2,093 invoices/s and
        357 MB when the worker held ~27 of them, 3,368/s and 262 MB holding ~4."""
        limits = self._one_at_a_time
        if not limits:
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = self.brpop_timeout
        held = self._held_per_queue()
        consumed = self._queue_cycle.consume(len(self.active_queues))
        queues = [q for q in consumed if held.get(q, 0) < limits.get(q, 1 << 30)] or consumed
        if len(queues) < len(consumed):  # come back soon for the queue left out (Redis 6: fractions of a second)
            timeout = min(timeout or 1, LEFT_OUT_POLL_SECONDS)
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues] + [timeout or 0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        command_args = ["BRPOP", *keys]
        if self.global_keyprefix:
            command_args = self.client._prefix_args(command_args)
        self.client.connection.send_command(*command_args)
        return None

    @cached_property
    def _one_at_a_time(self) -> dict[str, int]:
        try:
            return one_at_a_time_queues()
        except Exception:  # not a worker of this project (a publisher, a tool): kombu's behaviour
            return {}

    def _brpop_read(self, **options):  # noqa: ANN003 - kombu's signature
        """kombu's read of a BRPOP answer, plus: when the consumer has room, up to MORE_PER_READ
        more messages of the same queue (within the bytes it may still hold), taken and registered
        in the `unacked` hash, with the one BRPOP answered with, by one script before any is
        delivered (kombu: a pipeline per message). A busy worker then costs two round trips per
        read instead of two per message. When the connection drops meanwhile, the BRPOP message is
        remembered, and the script's, if it ran, are found registered under its score: all are
        handed back when the broker answers again (tests/faults/test_lost_read.py)."""
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise redis.Empty()
            key, item = dest__item
            dest = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payloads = [loads(bytes_to_str(item))]
            room = self.qos.can_consume_max_estimate() - 1 if self.qos.prefetch_count else 0
            if dest in self._one_at_a_time:
                room = 0
            if room > 0 and self._pop_many:
                payloads += self._pop_more(key, min(room, self.MORE_PER_READ), payloads)
            for payload in payloads:
                self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _pop_more(self, key: bytes, count: int, taken: list[dict]) -> list[dict]:
        """Up to `count` more messages of the queue `key`, every one and the one BRPOP answered with
        (`taken`) registered as delivered by the same script (POP_WITHIN)."""
        budget = held_limit() - self.qos.held_bytes() - len(dumps(taken[0]))
        if budget <= 0:
            return []
        qos, first = self.qos, taken[0]
        tag, info = first["properties"]["delivery_tag"], first["properties"]["delivery_info"]
        score = repr(time())
        try:
            items = self.client.eval(POP_WITHIN, 3, key, qos.unacked_key, qos.unacked_index_key, count, budget, score,
                                     tag, dumps([first, info["exchange"], info["routing_key"]]))
        except redis.redis.ResponseError as exc:
            # Refused before it took anything (its first write comes before any RPOP): a full
            # noeviction server (OOM) refuses it for now; no scripting at all: one message per read, as kombu
            if not str(exc).startswith("OOM"):
                self._pop_many = False
            return []
        except Exception:
            # The script may have run with its reply lost: what it took is registered under `score`.
            _remember_payloads(taken)
            with _lock:
                _lost_reads.add(score)
            raise
        more = [loads(bytes_to_str(item)) for item in items or ()]
        qos.registered.update(p["properties"]["delivery_tag"] for p in [first, *more])
        return more

    def basic_ack_many(self, delivery_tags: list[str]) -> None:
        self.qos.ack_many(delivery_tags)

    def basic_consume(self, *args, **kwargs):  # noqa: ANN002, ANN003
        result = super().basic_consume(*args, **kwargs)
        try:
            restore_orphans(self.qos)
        except Exception:  # the next periodic restore tries again
            log.debug("could not hand back orphaned messages yet", exc_info=True)
        return result


class Transport(redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"


def transport_for(broker_url: str | None) -> str | None:
    """The transport class for a broker URL: this one for redis://, kombu's choice otherwise."""
    if broker_url and broker_url.split("://", 1)[0] in ("redis", "rediss"):
        return TRANSPORT
    return None
