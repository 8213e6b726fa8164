"""Callback signatures (CONTRACT.md section 7) and configuration errors, no I/O."""

from __future__ import annotations

from decimal import Decimal

import pytest

from worker.config import ConfigurationError, load_settings
from worker.delivery.signing import canonical, sign, verify

VECTOR = {"amount": "120.00", "currency": "USD", "invoiceNumber": "INV-00892", "messageId": "cb-0001",
          "paymentId": "6f1c2d3e-0000-4000-8000-000000000001", "provider": "WorldPay", "responseCode": "0",
          "responseMessage": "Approved", "result": "Approved", "tenantId": "acme", "transactionId": "T-1001"}


def test_the_contract_test_vector_signs_as_given():
    assert sign(VECTOR, "test-secret") == "fed59388df04d7aa083a1e99e08c5127a5d7f3dc585808f7d5f238c52bc5f024"


def test_the_signature_field_is_not_signed_and_key_order_does_not_matter():
    shuffled = dict(reversed(list(VECTOR.items())))
    assert canonical({**shuffled, "signature": "x"}) == canonical(VECTOR)


def test_non_ascii_is_escaped_as_python_json_does():
    assert b"\\u00e9" in canonical({"responseMessage": "refusé"})


def test_verify_accepts_the_right_signature_and_names_what_is_wrong():
    signed = {**VECTOR, "signature": sign(VECTOR, "test-secret")}
    assert verify(signed, "test-secret") is None
    assert verify(VECTOR, "test-secret") == "the callback carries no signature"
    assert verify({**signed, "amount": "1.00"}, "test-secret") == "the signature does not match the body under any configured secret"
    assert verify(signed, "other-secret") == "the signature does not match the body under any configured secret"
    assert verify({**signed, "signature": signed["signature"].upper()}, "test-secret") is not None


@pytest.mark.parametrize("variable, value, fragment", [
    ("PAYMENT_RETRY_DAYS", "abc", "expected comma-separated numbers of days"),
    ("PAYMENT_RETRY_DAYS", "3,1", "ascending"),
    ("PAYMENT_RETRY_DAYS", "-1", "not negative"),
    ("DATABASE_URL", "not a url", "not a SQLAlchemy URL"),
    ("DATABASE_URL", "mysql://u@h/db", "must be a PostgreSQL URL"),
    ("BROKER_URL", "kafka://h", "must be a redis://"),
    ("BROKER_URL", "amqp://a//;kafka://b", "must be a redis://"),
    ("BROKER_URL", "redis://a/0;redis://b/0", "for RabbitMQ (amqp://) only"),
    ("BROKER_HEARTBEAT", "-1", "greater than or equal to 0"),
    ("WORKER_CONCURRENCY", "0", "greater than or equal to 1"),
])
def test_a_wrong_setting_names_its_variable(monkeypatch, variable, value, fragment):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"{variable}: ")
    assert fragment in str(caught.value)


def test_settings_parse_lists_and_fractions(monkeypatch):
    monkeypatch.setenv("PAYMENT_RETRY_DAYS", "0, 0.5,2")
    monkeypatch.setenv("PAYMENT_HARD_DECLINE_CODES", "lost_card, fraud ")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@h:5432/db")
    config = load_settings()
    assert config.payment_retry_days == (Decimal(0), Decimal("0.5"), Decimal(2))
    assert config.payment_hard_decline_codes == ("lost_card", "fraud")
    assert config.database_url == "postgresql+psycopg://u:p@h:5432/db"


def test_a_multi_host_database_url_reaches_libpq_with_every_host(monkeypatch):
    """A primary and its standby in libpq's spelling: SQLAlchemy cannot parse h1:p1,h2:p2, so the
    setting keeps it as repeated host= parameters, and psycopg (the worker's engine, the relay's
    libpq URL) gets libpq's spelling back, target_session_attrs included."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from worker.endpoints import libpq_url

    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p%40ss@10.77.0.21:5432,10.77.0.22:5433/invoices"
                                       "?target_session_attrs=read-write")
    url = load_settings().database_url
    assert url.startswith("postgresql+psycopg://")
    assert libpq_url(url) == ("postgresql://u:p%40ss@10.77.0.21:5432,10.77.0.22:5433/invoices"
                              "?target_session_attrs=read-write")
    _, kwargs = create_engine(url).dialect.create_connect_args(make_url(url))
    assert (kwargs["host"], kwargs["port"]) == ("10.77.0.21,10.77.0.22", "5432,5433")
    assert kwargs["target_session_attrs"] == "read-write" and kwargs["password"] == "p@ss"
    # one host, or a socket folder, is left as it was
    assert libpq_url("postgresql+psycopg://a:b@h:5432/db") == "postgresql://a:b@h:5432/db"


def test_a_cluster_broker_url_lists_its_nodes_and_the_worker_heartbeats_every_10_s(monkeypatch):
    """BROKER_URL of a RabbitMQ cluster: its nodes, `;`-separated; kombu connects to the first and
    fails over to the next (docs/brokers.md). The AMQP heartbeat defaults to 10 s, not Celery's 120."""
    from kombu import Connection

    nodes = "amqp://guest:guest@10.77.0.11:5672//;amqp://guest:guest@10.77.0.12:5672//;amqp://guest:guest@10.77.0.13:5672//"
    monkeypatch.setenv("BROKER_URL", nodes)
    config = load_settings()
    assert config.broker_url == nodes and config.broker_heartbeat == 10
    connection = Connection(config.broker_url)
    assert [url.split("@")[1] for url in connection.alt] == ["10.77.0.11:5672//", "10.77.0.12:5672//", "10.77.0.13:5672//"]
    assert connection.hostname == "10.77.0.11"
    connection.maybe_switch_next()  # what kombu does when a connection attempt fails
    assert connection.hostname == "10.77.0.12"


def test_the_worker_app_carries_the_heartbeat_and_the_failover_list():
    """The Celery app's settings, as `celery -A worker worker` reads them (a fresh interpreter:
    the app reads its settings once, at import)."""
    import json
    import os
    import subprocess
    import sys

    nodes = "amqp://guest:guest@10.77.0.11:5672//;amqp://guest:guest@10.77.0.12:5672//"
    env = {**os.environ, "BROKER_URL": nodes, "BROKER_HEARTBEAT": "7", "DATABASE_URL": "postgresql://u@h/db"}
    shown = subprocess.run([sys.executable, "-c", "import json; from worker.celery_app import app; "
                            "print(json.dumps([app.conf.broker_url, app.conf.broker_heartbeat, "
                            "app.conf.broker_transport_options.get('connect_retries_timeout')]))"],
                           env=env, capture_output=True, text=True, check=True)
    # connect_retries_timeout: kombu's whole budget for connecting on first use, failover included;
    # 4 s per node and 2 more, else a first node that does not answer used it all (worker/brokers/topology.py)
    assert json.loads(shown.stdout) == [nodes, 7, 10]


def test_a_single_broker_keeps_kombus_connection_budget():
    from worker.brokers.topology import failover_options

    assert failover_options("amqp://guest:guest@10.77.0.11:5672//") == {}
    assert failover_options("redis://127.0.0.1:6379/0") == {}
    assert failover_options("amqp://a//;amqp://b//;amqp://c//") == {"connect_retries_timeout": 14}


def test_the_worker_sets_up_delayed_delivery_through_the_connected_node_only():
    """Celery's DelayedDelivery step declares the delay exchanges on every URL of a `;` list, retrying
    a dead node ~15 s before the consumer consumes again; the worker's consumer replaces it."""
    from celery.worker.consumer import Consumer

    from worker.delivery.consumer import ClusterDelayedDelivery, InvoiceConsumer

    steps = InvoiceConsumer.Blueprint.default_steps
    assert not any(step.endswith(":DelayedDelivery") for step in steps)
    if any(step.endswith(":DelayedDelivery") for step in Consumer.Blueprint.default_steps):  # Celery >= 5.5
        from celery.worker.consumer.delayed_delivery import DelayedDelivery

        assert "worker.delivery.consumer:ClusterDelayedDelivery" in steps
        assert issubclass(ClusterDelayedDelivery, DelayedDelivery)
    else:  # Celery 5.4 (make test-oldest): no native delayed delivery, Celery's steps unchanged
        assert ClusterDelayedDelivery is None and steps == Consumer.Blueprint.default_steps
