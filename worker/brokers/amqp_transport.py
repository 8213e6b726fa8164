"""kombu's py-amqp transport with one acknowledgement per batch (RabbitMQ).

A batch of 100 payments was acknowledged with 100 `basic.ack` frames, each a write to the socket
and a frame for RabbitMQ to parse. AMQP acknowledges many deliveries with one frame
(`multiple=True`: every unsettled delivery of the channel up to that tag), but only where no
earlier delivery of the channel is still unsettled: one in another batch still being applied, a
message of Celery's ordinary path still running, an import. So the channel remembers its
unsettled delivery tags (every message handed to a consumer that acknowledges, in delivery order,
as RabbitMQ numbers them) and forgets each when it is acknowledged or handed back.
`basic_ack_many` (worker/delivery/batching.py acknowledge) then sends one multiple
acknowledgement up to the batch's highest tag when every earlier unsettled tag belongs to the
batch; else one for the batch's leading run and one frame for each of the others. Nothing is
acknowledged that the batch does not hold, so the poison count and every hand-back are as before.

Publishing, the relay's batch of events goes with its confirms pipelined (publish_confirmed_many):
every event sent, then every confirm awaited, instead of a round trip per event.
"""

from __future__ import annotations

import time
from typing import Any

from kombu.transport import pyamqp


class Channel(pyamqp.Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The deliveries not yet acknowledged or handed back, in delivery (= tag) order.
        self.unsettled: dict[int, None] = {}
        # Publishes since confirm.select: RabbitMQ numbers their confirms from 1.
        self.published = 0

    def _basic_publish(self, *args: Any, **kwargs: Any) -> Any:
        if self._confirm_selected:
            self.published += 1
        return super()._basic_publish(*args, **kwargs)

    def publish_confirmed_many(self, messages: list[tuple[Any, str, str]], timeout: float) -> list[bool]:
        """Publish (message, exchange, routing key) one after the other and then wait for all their
        confirms at once (py-amqp's confirm mode waits for each before the next: a round trip per
        message). Per message, whether RabbitMQ confirmed it (False: it refused it, basic.nack).
        A channel RabbitMQ closes meanwhile raises, as a confirmed publish does; so does the timeout."""
        if not self._confirm_selected:
            self._confirm_selected = True
            self.confirm_select()
        first = self.published + 1
        pending: set[int] = set()
        refused: set[int] = set()

        def settle(ok: bool) -> Any:
            def on_confirm(tag: int, multiple: bool) -> None:
                done = [t for t in pending if t <= tag] if multiple else [tag]
                pending.difference_update(done)
                if not ok:
                    refused.update(done)
            return on_confirm

        on_ack, on_nack = settle(True), settle(False)
        self.events["basic_ack"].add(on_ack)
        self.events["basic_nack"].add(on_nack)
        try:
            for message, exchange, routing_key in messages:
                pending.add(self.published + 1)  # before the publish: py-amqp may read confirms while it writes
                self._basic_publish(message, exchange, routing_key)
            deadline = time.monotonic() + timeout
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(pending)} publishes not confirmed within {timeout} s")
                self.connection.drain_events(timeout=left)
        finally:
            self.events["basic_ack"].discard(on_ack)
            self.events["basic_nack"].discard(on_nack)
        return [tag not in refused for tag in range(first, first + len(messages))]

    def message_to_python(self, raw_message: Any) -> Any:
        info = raw_message.delivery_info or {}
        if info.get("consumer_tag") not in self.no_ack_consumers:
            self.unsettled[raw_message.delivery_tag] = None
        return super().message_to_python(raw_message)

    def basic_ack(self, delivery_tag: int, multiple: bool = False, *args: Any, **kwargs: Any) -> Any:
        if multiple:
            for tag in [t for t in self.unsettled if t <= delivery_tag]:
                del self.unsettled[tag]
        else:
            self.unsettled.pop(delivery_tag, None)
        return super().basic_ack(delivery_tag, multiple, *args, **kwargs)

    def basic_reject(self, delivery_tag: int, requeue: bool, *args: Any, **kwargs: Any) -> Any:
        self.unsettled.pop(delivery_tag, None)
        return super().basic_reject(delivery_tag, requeue, *args, **kwargs)

    def basic_recover(self, requeue: bool = False) -> Any:
        self.unsettled.clear()
        return super().basic_recover(requeue)

    def basic_ack_many(self, delivery_tags: list[int]) -> None:
        """Acknowledge these deliveries with as few frames as the channel allows (module docstring)."""
        for tag, multiple in ack_frames(list(self.unsettled), delivery_tags):
            self.basic_ack(tag, multiple=multiple)


def ack_frames(unsettled: list[int], wanted: list[int]) -> list[tuple[int, bool]]:
    """The acknowledgements (tag, multiple) that settle exactly `wanted` on a channel whose unsettled
    deliveries are `unsettled` (in tag order): one multiple acknowledgement for the wanted tags below
    the first unsettled tag that is not wanted, when there are two or more of them, and a single one
    for each other wanted tag. A multiple acknowledgement settles every unsettled tag up to its own,
    so it never reaches past an unsettled delivery that is someone else's."""
    chosen = set(wanted)
    barrier = next((tag for tag in unsettled if tag not in chosen), None)
    leading = sorted(tag for tag in chosen if barrier is None or tag < barrier)
    frames = [(leading[-1], True)] if len(leading) > 1 else [(tag, False) for tag in leading]
    return frames + [(tag, False) for tag in sorted(chosen.difference(leading))]


class Connection(pyamqp.Connection):
    Channel = Channel


class Transport(pyamqp.Transport):
    Connection = Connection


TRANSPORT = f"{__name__}:Transport"
