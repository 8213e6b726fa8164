"""Which kombu transport each broker URL gets (worker/brokers/topology.py)."""

from kombu.utils.imports import symbol_by_name

from worker.brokers import amqp_transport, redis_transport
from worker.brokers.topology import transport_for


def test_each_scheme_gets_its_transport() -> None:
    """topology.transport_for names the transports by path (no import of either from there)."""
    for url in ("redis://localhost:6379/0", "rediss://localhost:6380/0"):
        assert symbol_by_name(transport_for(url)) is redis_transport.Transport
    for url in ("amqp://guest:guest@localhost:5672//", "pyamqp://localhost//"):
        assert symbol_by_name(transport_for(url)) is amqp_transport.Transport
    assert transport_for("amqps://localhost//") is None and transport_for(None) is None
