"""kombu's Redis transport, with one fix: messages that could not be handed back when the broker
went away are handed back as soon as it answers again, not after the visibility timeout.

On Redis, a delivered message waits in the `unacked` hash until it is acknowledged. When the
connection drops, Celery closes the channel and kombu tries to put the channel's unacknowledged
messages back on their queues; with the broker away that fails ("UNABLE TO RESTORE"), and the
messages stay in the hash until `visibility_timeout` (an hour by default) passes. Measured before
this fix: the broker SIGKILLed and restarted 3 s later left 1 of 410 payments an hour late.

The same failure could also stop the worker outright: restoring through a connection Celery had
already torn down raised AttributeError in kombu 5.7, which Celery treats as unrecoverable (seen
in the broker-kill scenario of tests/faults with kombu's own transport).

Here the channel remembers the delivery tags it could not restore, and the next channel that
reaches the broker restores them, by tag, as kombu itself would have (a tag that is no longer in
the hash was acknowledged or restored meanwhile, and is skipped). A message restored while its
task still finishes on the old connection runs twice; the inbox makes the second run a duplicate.
"""

from __future__ import annotations

import logging
import threading

from kombu.transport import redis

log = logging.getLogger(__name__)

_lock = threading.Lock()
# Delivery tags of this process whose restore failed, waiting for a connection that works.
_orphans: set[str] = set()


def orphans() -> frozenset[str]:
    with _lock:
        return frozenset(_orphans)


class QoS(redis.QoS):
    def restore_unacked(self, client=None):  # noqa: ANN001 - kombu's signature
        pending = [tag for tag in self._delivered if tag not in self._dirty]
        try:
            return super().restore_unacked(client)
        except Exception as exc:  # noqa: BLE001 - the broker is away, or the connection already torn down
            # (kombu 5.7 then fails on `conninfo.hostname` of a closed connection: an AttributeError
            # that Celery reports as an unrecoverable error and the worker exits; measured here)
            with _lock:
                _orphans.update(pending)
            self._delivered.clear()
            log.warning("broker away: %d unacknowledged message(s) will be handed back when it answers (%s)",
                        len(pending), exc)
            return None

    def restore_visible(self, *args, **kwargs):  # noqa: ANN002, ANN003
        restore_orphans(self)
        return super().restore_visible(*args, **kwargs)


def restore_orphans(qos: QoS) -> int:
    """Hand back the remembered tags through this channel; keep those it cannot reach."""
    with _lock:
        tags = list(_orphans)
    restored = 0
    for tag in tags:
        try:
            qos.restore_by_tag(tag)  # at the head of its queue: it has waited longest
        except qos.channel.connection_errors + (OSError,):
            break
        with _lock:
            _orphans.discard(tag)
        restored += 1
    if restored:
        log.warning("handed back %d message(s) left unacknowledged when the broker went away", restored)
    return restored


class Channel(redis.Channel):
    QoS = QoS

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
