"""Our transports take kombu's schemes (worker/brokers/__init__.py): a URL of each scheme gets its
transport, and the connection's URI is still that URL (it named the transport class where the
scheme was while Celery's broker_transport named the class, and what parsed it again failed)."""

from kombu import Connection

from worker.brokers import amqp_transport, redis_transport


def test_each_scheme_gets_its_transport_and_keeps_its_uri() -> None:
    for url, transport in (("redis://localhost:6379/0", redis_transport.Transport),
                           ("rediss://localhost:6380/0", redis_transport.Transport),
                           ("amqp://guest:guest@localhost:5672//", amqp_transport.Transport),
                           ("pyamqp://guest:guest@localhost:5672//", amqp_transport.Transport)):
        connection = Connection(url)  # lazy: nothing connects
        assert type(connection.transport) is transport, url
        again = Connection(connection.as_uri(include_password=True))  # what Celery's delayed delivery does
        assert type(again.transport) is transport and again.as_uri() == connection.as_uri(), url
    assert not isinstance(Connection("amqps://guest:guest@localhost:5671//").transport, amqp_transport.Transport)


def test_the_app_names_no_transport_class() -> None:
    from worker.celery_app import app

    assert app.conf.broker_transport is None
    with app.connection_for_write() as connection:
        assert "worker.brokers" not in connection.as_uri()
