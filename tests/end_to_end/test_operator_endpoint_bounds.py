"""Issue #23, item 7: the operator's endpoint costs a bounded number of threads whatever callers
do, listens on loopback unless told otherwise, and tells an unauthenticated caller what is wrong
in a word, never the servers' error text (CONTRACT.md section 10)."""

from __future__ import annotations

import json
import logging
import socket
import uuid
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.conftest import isolated_broker_url, wait_for
from tests.end_to_end.operator_endpoint import free_port, get
from worker.operations.endpoint import MAX_CONNECTIONS, READ_TIMEOUT_SECONDS, serve
from worker.operations.health import Probe

HALF_SENT = 100  # three times MAX_CONNECTIONS: past the bound, as 300 was, at a third of the wait


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no thread count for {pid}")


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_half_sent_requests_cost_bounded_threads_are_closed_after_the_timeout_and_healthz_answers(processes, broker):
    """Before the fix every half-sent request held a thread of the worker's main process for good:
    the count grew by one per connection (100 here) and none was ever closed."""
    port = free_port()
    worker = processes.worker(name=f"endpoint-{uuid.uuid4().hex[:6]}@localhost", queues="invoices.maintenance",
                              extra_env={"METRICS_PORT": str(port), "BROKER_URL": isolated_broker_url(broker)})
    wait_for(lambda: get(port, "/healthz")[0] == 200, 30, what="the endpoint to answer")
    before = threads_of(worker.pid)
    # the connection threads, plus as many again for threads of closed connections still ending on a
    # loaded machine, and Celery's own that come and go: bounded, where one per request is not
    bound = before + 2 * MAX_CONNECTIONS
    counts, held = [], []
    try:
        for _ in range(HALF_SENT):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # the headers never end
            held.append(sock)
            counts.append(threads_of(worker.pid))
        status, body = get(port, "/healthz")
        assert status == 200 and json.loads(body) == {"alive": True}
        counts.append(threads_of(worker.pid))
        assert max(counts) <= bound, f"threads grew from {before} to {max(counts)} with {HALF_SENT} half-sent requests"
        unclosed = [s for s in held if not closed_by_server(s, READ_TIMEOUT_SECONDS + 30)]
        assert unclosed == [], f"{len(unclosed)} of {HALF_SENT} half-sent requests still open after the timeout"
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: threads_of(worker.pid) <= before + 4, 30, what="the connection threads to end")
    assert get(port, "/healthz")[0] == 200 and worker.poll() is None


def test_readyz_with_the_database_away_names_it_in_a_word_and_logs_the_error_text(urls, broker, caplog):
    """Before the fix the 503's body carried psycopg's message: host, port and role."""
    url = make_url(urls["DATABASE_URL"]).set(username=f"role_{uuid.uuid4().hex[:8]}", password="wrong")
    port = free_port()
    server = serve(port, Probe(url.render_as_string(hide_password=False), broker, []))
    assert server is not None
    try:
        with caplog.at_level(logging.WARNING, logger="worker.operations.health"):
            status, body = get(port, "/readyz")
        report = json.loads(body)
        assert status == 503 and report["ready"] is False and list(report["problems"]) == ["database"], report
        # where the server is: host and port, or the socket's folder (the embedded server's)
        where = [str(part) for part in (url.host, url.port, url.query.get("host")) if part]
        for secret in (url.username, *where):
            assert secret not in body, f"{secret!r} shown to the caller: {body}"
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert url.username in logged and where and all(part in logged for part in where)  # the detail is logged
    finally:
        server.shutdown()
        server.server_close()


def test_the_endpoint_listens_on_loopback_unless_metrics_address_says_otherwise(urls, broker):
    """Before the fix it bound 0.0.0.0, with no setting to change it."""
    from worker.config import settings

    assert settings().metrics_address == "127.0.0.1"
    server = serve(free_port(), Probe(urls["DATABASE_URL"], broker, []))
    assert server is not None
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
    compose = (Path(__file__).parents[2] / "docker-compose.yml").read_text()
    dockerfile = (Path(__file__).parents[2] / "Dockerfile").read_text()
    assert "METRICS_ADDRESS: 0.0.0.0" in compose and "ENV METRICS_ADDRESS=0.0.0.0" in dockerfile
