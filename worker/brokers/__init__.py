"""Talking to brokers: the contract's queues and routes on each broker (`topology`), our Redis
transport, and the relay that publishes the outbox's events.

May import `operations`, `config` and `endpoints`; never `tasks`, `delivery`, `storage` or `cli`
(the relay reads the outbox with plain SQL).

Our transports take kombu's own schemes: importing this package points kombu's `redis://` and
`rediss://` at worker/brokers/redis_transport.py and `amqp://` and `pyamqp://` at
worker/brokers/amqp_transport.py (one acknowledgement per batch), for every connection the process
makes, whichever URL it is given; `amqps://` keeps kombu's own, which sets up TLS from the scheme.
Registered under the scheme, a transport keeps the URL a URL: Celery's `broker_transport` naming
the class made `Connection.as_uri()` put the class path where the scheme was, and what parsed that
URL again (Celery's delayed-delivery step, the event tails' pruning) failed on it.
"""

from kombu.transport import TRANSPORT_ALIASES

TRANSPORTS = {
    "redis": "worker.brokers.redis_transport:Transport",
    "rediss": "worker.brokers.redis_transport:Transport",
    "amqp": "worker.brokers.amqp_transport:Transport",
    "pyamqp": "worker.brokers.amqp_transport:Transport",
}
TRANSPORT_ALIASES.update(TRANSPORTS)
