"""(~700 lines on purpose: one subclass of kombu's channel with its two scripts, the read (TAKE)
and the parking (PARK), and the rules that read what they registered: the hand-back of an entry,
the check of a taken item, the orphans. Each rule depends on the entry format the read writes, so
they are read together; splitting them would put that format in two places.)

kombu's Redis transport, with one fix and two changes for speed (reading up to 100 messages per
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

The read: kombu takes a message with BRPOP, which removes it from its list as it answers; an
answer the network drops (a cut in that instant, or a connection the broker still thinks alive)
loses the message. Here a read is one script (TAKE) that takes up to 100 messages of the first
consumed list that has any and registers each as delivered (`unacked`) before it answers: a lost
answer leaves them registered, and the channel hands them back (restore_orphans). Nothing blocks
in the script, so an empty read is followed by a wait at the broker on a key nobody writes
(BLPOP, 5 ms and doubling while the queues stay empty, at most POLL_MAX_SECONDS), then the next
read: an idle worker polls, and a message waits at most that long before it is taken.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import uuid
from datetime import datetime, timezone
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
# Reads (TAKE) whose reply was lost: the `unacked` index score their messages were registered with.
_lost_reads: set[str] = set()


def orphans() -> frozenset[str]:
    with _lock:
        return frozenset(_orphans)


def _remember(messages: list) -> None:
    with _lock:
        for message in messages:
            info = message.delivery_info
            _orphans[message.delivery_tag] = (message._raw, info["exchange"], info["routing_key"])


class QoS(redis.QoS):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        # Delivery tags already written to the `unacked` hash by the read's script (TAKE).
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

    def restore_by_tag(self, tag, client=None, leftmost=False):  # noqa: ANN001 - kombu's signature
        """kombu's hand-back of one delivered message (a reject, a lost channel, the visibility
        sweep), through restore_entry: kombu's own parsed the entry and, for an item TAKE had
        registered as it was taken (not a kombu message, or one with blanks around it), failed
        and removed the entry: the message was gone."""

        def restore_transaction(pipe) -> None:  # noqa: ANN001 - a redis pipeline in a WATCH transaction
            entry = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if entry:
                restore_entry(self.channel, entry, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as client:
            client.transaction(restore_transaction, self.unacked_key)


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
            if registered:
                restore_entry(qos.channel, registered, pipe)
            elif payload is not None:  # None: a lost read's message no longer registered, acknowledged meanwhile
                qos.channel._do_restore_message(payload, exchange, routing_key, pipe)

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
    """Turn each read whose TAKE reply was lost into orphans: the messages registered in the
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


# Where an `unacked` entry that neither TAKE nor kombu could have written goes (never observed; kept
# rather than dropped, for an operator to look at).
UNRESTORABLE_KEY = "invoices.unrestorable"


def taken_item(entry: bytes) -> tuple[bytes, str] | None:
    """The item and queue of an entry TAKE registered (`[` item `,"",` queue `]`), the item's bytes
    as they were taken; None for an entry of kombu's own (its JSON has blanks after the commas)."""
    cut = entry.rfind(b',"",')
    if not entry.startswith(b"[") or not entry.endswith(b"]") or cut < 0:
        return None
    try:
        queue = json.loads(entry[cut + 4:-1])
    except ValueError:
        return None
    if not isinstance(queue, str):
        return None
    raw = entry[1:cut]
    if raw.startswith(b'"'):  # registered as a JSON string (cjson): the item's bytes, escaped
        try:
            text = json.loads(raw.decode("utf-8", "surrogateescape"))
        except ValueError:
            return None
        raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else raw
    return raw, queue


def envelope(raw: bytes | str) -> dict | None:
    """The item as a kombu message that kombu and Celery can take without failing, or None."""
    try:
        payload = loads(bytes_to_str(raw))
    except Exception:  # noqa: BLE001 - whatever it is, it is no message
        return None
    return payload if readable(payload) else None


def readable(payload: object) -> bool:
    """Whether kombu's Message can be made of it: a JSON object whose properties (and delivery_info
    in them) and headers are objects, whose content type and encoding are text, and whose body
    decodes by its body_encoding (kombu's base64 is what failed: binascii.Error stopped the worker)."""
    if not isinstance(payload, dict):
        return False
    properties, headers, body = payload.get("properties"), payload.get("headers"), payload.get("body")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_info", {}), dict):
        return False
    if not isinstance(headers, (dict, type(None))) or not isinstance(body, str) or not body:
        return False  # (no body: Celery unpacked nothing from it, failed in the pool, and acknowledged it)
    if not all(isinstance(payload.get(key), (str, type(None))) for key in ("content-type", "content-encoding")):
        return False
    encoding = properties.get("body_encoding")
    if encoding is None:
        return True
    if not isinstance(encoding, str):
        return False
    if encoding.lower() == "utf-8":
        return True
    codec = Channel.codecs.get(encoding)
    try:
        return codec is not None and len(codec.decode(body)) > 0
    except Exception:  # noqa: BLE001 - binascii.Error: a body that is no base64
        return False


def restore_entry(channel: "Channel", entry: bytes, pipe, leftmost: bool = False) -> None:  # noqa: ANN001
    """Hand back a delivered message from its `unacked` entry, inside the caller's transaction. A
    kombu message goes back marked redelivered, as kombu hands it back; anything else goes back
    byte for byte, and the worker dead-letters it (`not-a-message`) when it reads it again."""
    taken = taken_item(entry)
    if taken is not None:
        raw, queue = taken
        payload = envelope(raw)
        if payload is not None:
            channel._do_restore_message(payload, "", queue, pipe, leftmost)
        else:
            (pipe.lpush if leftmost else pipe.rpush)(channel._q_for_pri(queue, 0), raw)
        return
    try:
        message, exchange, routing_key = loads(bytes_to_str(entry))
    except Exception:  # noqa: BLE001 - kept, never dropped
        log.critical("an unacknowledged entry that is no message; kept in %s", UNRESTORABLE_KEY)
        pipe.rpush(UNRESTORABLE_KEY, entry)
        return
    channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)


# Messages whose eta is further ahead than this wait in Redis, not in the worker (Channel._park).
PARK_AFTER_SECONDS = 1.0
PARKED_KEY = "invoices.parked"
PARKED_ITEMS_KEY = "invoices.parked.items"
# KEYS: the `unacked` hash, its index, the parked index, the parked hash. ARGV: for each message its
# tag, its eta (epoch seconds), its list's key and the item as taken. A message no longer registered
# (handed back meanwhile) is not parked.
PARK = """
for i = 1, #ARGV, 4 do
  local tag = ARGV[i]
  if redis.call('HDEL', KEYS[1], tag) == 1 then
    redis.call('ZREM', KEYS[2], tag)
    redis.call('ZADD', KEYS[3], ARGV[i + 1], tag)
    redis.call('HSET', KEYS[4], tag, ARGV[i + 2] .. '\\0' .. ARGV[i + 3])
  end
end
return 1
"""


def eta_of(payload: dict) -> datetime | None:
    """The message's eta (Celery's header), when it has a readable one."""
    return header_time((payload.get("headers") or {}).get("eta"))


def header_time(value: object) -> datetime | None:
    """A time header of Celery's (`eta`, `expires`): ISO 8601, read as UTC when it has no offset."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def parkable(payload: dict, horizon: float) -> bool:
    """Due later than PARK_AFTER_SECONDS, and not beyond the horizon (the visibility timeout),
    past which the consumer dead-letters it `eta-too-far` at once."""
    eta = eta_of(payload)
    return eta is not None and PARK_AFTER_SECONDS < (eta - datetime.now(timezone.utc)).total_seconds() <= horizon


NOT_A_MESSAGE = "application/x-not-a-kombu-message"


def not_a_message(item: bytes, tag: str, queue: str) -> dict:
    """A kombu message carrying the item's bytes, of a content type no serializer reads: the
    consumer dead-letters it whole, reason `not-a-message` (worker/delivery/consumer.py)."""
    return {"body": base64.b64encode(item).decode(), "content-encoding": "binary", "content-type": NOT_A_MESSAGE,
            "headers": {}, "properties": {"body_encoding": "base64", "delivery_tag": tag, "priority": 0,
                                          "delivery_info": {"exchange": "", "routing_key": queue}}}


def held_limit() -> int:
    from worker.config import settings

    return HELD_MESSAGES_OF_MAX_SIZE * settings().max_message_bytes


# What a worker's consumer holds at most, in bodies delivered and not yet acknowledged: room for
# two of the largest allowed messages (16 MiB by default), whatever the prefetch count. A batch of
# 100 payments is 30 KB; imports are what this bounds (measured, 60 imports of 1,000 invoices with
# batching on: worker PSS 439 MB with room for eight, 357 MB with two; 254 MB with batching off).
HELD_MESSAGES_OF_MAX_SIZE = 2
# A read. KEYS: the `unacked` hash, its index, the parked messages' index and their hash, then the
# consumed lists in the order to try them. First, parked messages whose eta has come (at most 100)
# go back to the head of their lists (the list's key is in the parked value: a key the script was
# not given, which a Redis Cluster would refuse; the worker runs on one Redis).
# Then the read.
# ARGV: the byte budget, the index score, the tag prefix, then for each list the most messages to
# take from it, its queue's name as JSON, and '1' to register what it takes ('0' for a no-ack
# consumer's). From the first list that has any: up to that many messages, while their bytes stay
# within the budget (the last one taken may pass it), each
# registered in the hash (tag = prefix .. n) as kombu registers a delivery ([payload, exchange,
# routing key]; the default exchange and the queue's name, which is where kombu's restore puts a
# message back) and in the index, before the reply. Reply: the list's position, then the messages.
# An item that does not look like a JSON object (its first and last characters, blanks aside) is
# registered as a JSON string; the worker dead-letters it (Channel._payload). Either way the item
# stands in the entry as it was taken, and restore_entry hands it back byte for byte.
TAKE = """
local budget, score, prefix = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local now = redis.call('TIME')
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', tonumber(now[1]) + tonumber(now[2]) / 1000000, 'LIMIT', 0, 100)
for _, tag in ipairs(due) do
  local parked = redis.call('HGET', KEYS[4], tag)
  redis.call('ZREM', KEYS[3], tag)
  redis.call('HDEL', KEYS[4], tag)
  if parked then
    local cut = string.find(parked, '\\0', 1, true)
    redis.call('RPUSH', string.sub(parked, 1, cut - 1), string.sub(parked, cut + 1))
  end
end
for i = 1, #KEYS - 4 do
  local item = redis.call('RPOP', KEYS[i + 4])
  if item then
    local most, queue, register = tonumber(ARGV[1 + 3 * i]), ARGV[2 + 3 * i], ARGV[3 + 3 * i] == '1'
    local taken, bytes = {i}, 0
    while item do
      if register then
        local tag = prefix .. #taken
        local first, last = 1, #item
        while first <= last and string.find(' \\t\\r\\n', string.sub(item, first, first), 1, true) do first = first + 1 end
        while last >= first and string.find(' \\t\\r\\n', string.sub(item, last, last), 1, true) do last = last - 1 end
        local entry = item
        if string.byte(item, first) ~= 123 or string.byte(item, last) ~= 125 then entry = cjson.encode(item) end
        redis.call('HSET', KEYS[1], tag, '[' .. entry .. ',"",' .. queue .. ']')
        redis.call('ZADD', KEYS[2], score, tag)
      end
      taken[#taken + 1] = item
      bytes = bytes + #item
      if #taken > most or bytes >= budget then break end
      item = redis.call('RPOP', KEYS[i + 4])
    end
    return taken
  end
end
return {}
"""
# After an empty read, the wait at the broker before the next: 5 ms, doubling while reads stay
# empty, at most POLL_MAX_SECONDS (an idle worker then costs two round trips per POLL_MAX_SECONDS;
# a message published to an idle worker waits at most that long).
POLL_MIN_SECONDS = 0.005
POLL_MAX_SECONDS = 0.05


def one_at_a_time_queues() -> dict[str, int]:
    """The imports queue (large, long messages) may hold no more than the ordinary prefetch
    (WORKER_CONCURRENCY × WORKER_PREFETCH_MULTIPLIER) and one more, however far batching raises the
    channel's prefetch count for the message queues. The one more is the next import, decoded and
    ready when a pool process frees up: with exactly one per process, a freed process waited for
    the main process to notice, fetch and hand over the next one (measured on a quiet machine,
    50,000 invoices, alternating: 8,616 and 8,076 invoices/s without it, 8,951 and 8,739 with it;
    peak PSS 246 → 252 MB). A read takes one import at most."""
    from worker.config import settings

    config = settings()
    limit = config.worker_concurrency * config.worker_prefetch_multiplier + 1
    return {"invoices.imports": limit}


class Channel(redis.Channel):
    QoS = QoS
    # The most messages taken in one read.
    MOST_PER_READ = 101
    # False when the broker refuses scripts: kombu's BRPOP, with its window (docs/brokers.md).
    _scripted = True
    _brpop_once = False
    _no_ack_queues: frozenset[str] = frozenset()
    _empty_reads = 0  # empty reads in a row: the wait after the last one doubles with each
    _wait_next = False
    # The read in flight: its index score, its queues (one per list) and its tag prefix.
    _take: tuple[str, list[str], str] | None = None

    def _held_per_queue(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for tag, message in self.qos._delivered.items():
            if tag not in self.qos._dirty:
                queue = (message.delivery_info or {}).get("routing_key")
                held[queue] = held.get(queue, 0) + 1
        return held

    def _consumable(self) -> tuple[list[str], bool]:
        """The consumed queues in kombu's fair order, leaving out a one-at-a-time queue (imports)
        that already holds its share (measured, 60 imports with batching on took 2,093 invoices/s
        and 357 MB when the worker held ~27 of them, 3,368/s and 262 MB holding ~4); and whether
        one was left out."""
        consumed = self._queue_cycle.consume(len(self.active_queues))
        limits = self._one_at_a_time
        if not limits:
            return consumed, False
        held = self._held_per_queue()
        queues = [q for q in consumed if held.get(q, 0) < limits.get(q, 1 << 30)] or consumed
        return queues, len(queues) < len(consumed)

    def _send(self, *command_args: object) -> None:
        """Send a read's command on the channel's polled connection. Keys get the global key
        prefix: kombu's for BRPOP, here for TAKE's (kombu prefixes no EVAL); the wait's key is
        private either way."""
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        if self.global_keyprefix and command_args[0] != "EVAL":
            command_args = tuple(self.client._prefix_args(list(command_args)))
        self.client.connection.send_command(*command_args)

    def _brpop_start(self, timeout=None):  # noqa: ANN001 - kombu's signature
        """Send the next read: TAKE over the consumable queues, or, after an empty read, the wait."""
        queues, left_out = self._consumable()
        if not queues:
            return None
        if not self._scripted or self._brpop_once:
            self._brpop_once = False
            keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
            wait = timeout if timeout is not None else self.brpop_timeout
            if left_out:  # come back soon for the queue left out (Redis 6: fractions of a second)
                wait = min(wait or 1, POLL_MAX_SECONDS)
            return self._send("BRPOP", *keys, wait or 0)
        if self._wait_next:
            self._wait_next = False
            wait = min(POLL_MIN_SECONDS * 2 ** min(self._empty_reads - 1, 10), POLL_MAX_SECONDS)
            return self._send("BLPOP", self._wait_key, wait)
        pairs = [(self._q_for_pri(queue, pri), queue) for pri in self.priority_steps for queue in queues]
        room = self.qos.can_consume_max_estimate() if self.qos.prefetch_count else self.MOST_PER_READ
        most = max(1, min(room or 1, self.MOST_PER_READ))
        budget = max(1, held_limit() - self.qos.held_bytes())
        score, prefix = repr(time()), f"{uuid.uuid4()}:"
        argv: list[object] = [budget, score, prefix]
        for _, queue in pairs:
            argv += [1 if queue in self._one_at_a_time else most, dumps(queue),
                     "0" if queue in self._no_ack_queues else "1"]
        p = self.global_keyprefix or ""
        keys = [p + key for key in (self.qos.unacked_key, self.qos.unacked_index_key, PARKED_KEY, PARKED_ITEMS_KEY,
                                    *(key for key, _ in pairs))]
        self._take = (score, [queue for _, queue in pairs], prefix)
        try:
            self._send("EVAL", TAKE, len(keys), *keys, *argv)
        except Exception:
            self._lost_take()
            raise
        return None

    @cached_property
    def _wait_key(self) -> str:
        """A key nobody writes: a BLPOP on it is a wait at the broker that takes nothing."""
        return f"{self.unacked_key}:wait:{uuid.uuid4().hex}"

    @cached_property
    def _one_at_a_time(self) -> dict[str, int]:
        try:
            return one_at_a_time_queues()
        except Exception:  # not a worker of this project (a publisher, a tool): kombu's behaviour
            return {}

    def _lost_take(self) -> None:
        """The read in flight may have run with its reply lost: what it took is registered under its
        score, and the channel that reaches the broker next hands it back (restore_orphans)."""
        take, self._take = self._take, None
        if take is not None:
            with _lock:
                _lost_reads.add(take[0])

    def _brpop_read(self, **options):  # noqa: ANN003 - kombu's signature
        """Read the reply of the read in flight: TAKE's messages delivered; nothing (Empty) for an
        empty read or a wait. A reply lost to the connection: see _lost_take."""
        take = self._take
        if take is None:  # a wait, or kombu's BRPOP
            return self._read_brpop(**options)
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVAL", **options)
            except self.connection_errors:
                self._lost_take()
                self.client.connection.disconnect()
                raise
            except redis.redis.ResponseError as exc:
                # Refused before it took anything (its first write is an RPOP): a full noeviction
                # server (OOM) refuses scripts for now, and BRPOP takes the next message; no
                # scripting at all: BRPOP from now on.
                self._take = None
                if str(exc).startswith("OOM"):
                    self._brpop_once = True
                else:
                    log.warning("the broker refuses scripts (%s); reading with BRPOP, which can lose a message "
                                "whose answer the network drops (docs/brokers.md)", exc)
                    self._scripted = False
                raise redis.Empty() from None
            self._take = None
            if not reply:
                self._empty_reads += 1
                self._wait_next = True
                raise redis.Empty()
            self._empty_reads = 0
            _score, queues, prefix = take
            dest = queues[int(reply[0]) - 1]
            self._queue_cycle.rotate(dest)
            tags = [f"{prefix}{n}" for n in range(1, len(reply))]
            registered = dest not in self._no_ack_queues
            payloads = [self._payload(item, tag, dest) for tag, item in zip(tags, reply[1:])]
            later = self._park([(tag, item, payload) for tag, item, payload in zip(tags, reply[1:], payloads)
                                if registered and parkable(payload, self.qos.visibility_timeout)], dest)
            if registered:
                self.qos.registered.update(tag for tag in tags if tag not in later)
            for tag, item, payload in zip(tags, reply[1:], payloads):
                if tag not in later:
                    self._deliver_one(payload, item, tag, dest)
            return True
        finally:
            self._in_poll = None
            self._after_read()

    def _park(self, taken: list[tuple[str, bytes, dict]], queue: str) -> set[str]:
        """Park the read's messages whose eta is more than PARK_AFTER_SECONDS ahead: out of
        `unacked`, into the parked index by eta, in one script; TAKE puts each back on its list when
        its eta comes. Held in the worker instead, they counted against the bytes it may hold and
        stopped it taking ready work (three 6 MB messages due in 50 minutes stopped every tenant's
        payments for 50 minutes). Returns the tags not to deliver: all of them, parked, or, when the
        broker could not be reached, left registered and handed back when it answers."""
        if not taken:
            return set()
        tags = {tag for tag, _item, _payload in taken}
        p = self.global_keyprefix or ""
        argv: list[object] = []
        for tag, item, payload in taken:
            argv += [tag, repr(eta_of(payload).timestamp()), p + self._q_for_pri(queue, 0), item]
        try:
            with self.conn_or_acquire() as client:
                client.eval(PARK, 4, p + self.qos.unacked_key, p + self.qos.unacked_index_key, p + PARKED_KEY,
                            p + PARKED_ITEMS_KEY, *argv)
        except self.connection_errors + (OSError,) as exc:
            log.warning("could not park %d message(s) until their eta (%s); handed back when the broker answers",
                        len(taken), exc)
            with _lock:
                for tag in tags:
                    _orphans.setdefault(tag, (None, None, None))
        return tags

    def _deliver_one(self, payload: dict, item: bytes, tag: str, queue: str) -> None:
        """Deliver one message of a read. What the consumer cannot take (it raised) is delivered
        again as not-a-message, to be dead-lettered whole: the read's other messages go on, and the
        worker with them (an exception here stopped the worker, its read stranded in `unacked`)."""
        try:
            self.connection._deliver(payload, queue)
        except self.connection_errors:
            raise
        except Exception:
            log.exception("a message the consumer could not take (%s); dead-lettering it whole", tag)
            self.connection._deliver(not_a_message(item, tag, queue), queue)

    def _after_read(self) -> None:
        """What kombu's own read does after its reply: a credential refresh that arrived during the
        wait (kombu 5.6 on; older kombu has no re-authentication to flush)."""
        flush = getattr(self, "_flush_brpop_reauth", None)
        if flush is not None:
            flush()

    def _read_brpop(self, **options):  # noqa: ANN003
        """A wait's reply (nothing), or kombu's BRPOP read (no scripting, or a full server)."""
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
            self._empty_reads = 0
            tag = str(uuid.uuid4())
            self._deliver_one(self._payload(item, tag, dest), item, tag, dest)
            return True
        finally:
            self._in_poll = None
            self._after_read()

    @staticmethod
    def _payload(item: bytes, tag: str, queue: str) -> dict:
        """A taken message as kombu delivers it, under the tag TAKE registered it with. An item that
        is no kombu message kombu and Celery can read (envelope) becomes one that no serializer
        reads, so that the worker dead-letters it whole (`not-a-message`) and acknowledges it,
        instead of failing the read (CONTRACT.md section 2)."""
        payload = envelope(item)
        if payload is None:
            return not_a_message(item, tag, queue)
        properties = payload["properties"]
        properties["delivery_tag"] = tag
        properties.setdefault("delivery_info", {}).setdefault("routing_key", queue)
        return payload

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):  # noqa: ANN001
        """kombu's hand-back marks the message redelivered; something that is no kombu message
        (kombu logged it CRITICAL and dropped it) goes back as it is."""
        if readable(payload) and isinstance(payload.get("headers"), dict):
            return super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        raw = payload if isinstance(payload, (str, bytes)) else dumps(payload)
        for queue in self._lookup(exchange, routing_key):
            (pipe.lpush if leftmost else pipe.rpush)(self._q_for_pri(queue, 0), raw)
        return None

    def _poll_error(self, type, **options):  # noqa: ANN001, ANN003 - kombu's signature
        if type == "BRPOP":
            self._lost_take()
        return super()._poll_error(type, **options)

    def close(self):
        """kombu reads the reply of a read in flight before it closes; when that fails, what the
        read took is handed back by the next channel."""
        try:
            return super().close()
        finally:
            self._lost_take()

    def basic_cancel(self, consumer_tag):  # noqa: ANN001 - kombu's signature
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._tag_to_queue.values():
            self._no_ack_queues = self._no_ack_queues - {queue}
        return result

    def basic_ack_many(self, delivery_tags: list[str]) -> None:
        self.qos.ack_many(delivery_tags)

    def basic_consume(self, queue, no_ack, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - kombu's signature
        # A no-ack consumer (a reply queue: Celery's control replies) is never acknowledged: what a
        # read takes for it is not registered as delivered (it would come back after the
        # visibility timeout), as kombu does not register it.
        if no_ack:
            self._no_ack_queues = self._no_ack_queues | {queue}
        else:
            self._no_ack_queues = self._no_ack_queues - {queue}
        result = super().basic_consume(queue, no_ack, *args, **kwargs)
        try:
            restore_orphans(self.qos)
        except Exception:  # the next periodic restore tries again
            log.debug("could not hand back orphaned messages yet", exc_info=True)
        return result


class Transport(redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
