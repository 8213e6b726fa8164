"""The operator's HTTP endpoint on METRICS_ADDRESS:METRICS_PORT (CONTRACT.md section 10):
`/metrics`, `/healthz` and `/readyz`, served by threads of the worker's main process (and of a
relay that runs alone). A port already taken is logged as an error; the worker goes on consuming.

Anyone who can reach the port can open connections, so they are bounded (issue #23): loopback by
default; a request must arrive within READ_TIMEOUT_SECONDS of each read; at most MAX_CONNECTIONS
are open at once, and a new one beyond that closes the oldest that is still sending its request
(an answer takes milliseconds, so the oldest unfinished request is a stalled or hostile one): a
flood of half-sent requests costs a bounded number of threads and never stops /healthz for long.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from worker.operations import metrics
from worker.config import settings
from worker.operations.health import Probe

log = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 5.0
MAX_CONNECTIONS = 32


class ScrapeGauges:
    """The gauges read at scrape time, from the probe's cached snapshot. A part that could not be
    read is left out (a stale number would look healthy); `invoice_worker_ready` says why not."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def describe(self) -> list[Any]:
        return []  # registering must not probe

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        snapshot = self.probe.snapshot()
        ready, _ = self.probe.readiness()
        yield GaugeMetricFamily("invoice_worker_ready", "1 while PostgreSQL and the broker answer and the "
                                "worker consumes (as /readyz).", value=1 if ready else 0)
        if snapshot.outbox_unpublished is not None:
            yield GaugeMetricFamily("invoice_worker_outbox_unpublished", "Events in the outbox not yet published.",
                                    value=snapshot.outbox_unpublished)
            yield GaugeMetricFamily("invoice_worker_outbox_oldest_age_seconds",
                                    "Age of the oldest unpublished event (0 when none).",
                                    value=snapshot.outbox_oldest_age_seconds)
            yield GaugeMetricFamily("invoice_worker_dead_letters_open", "Dead letters waiting for a person.",
                                    value=snapshot.dead_letters_open)
        if snapshot.queue_depth is not None:
            depth = GaugeMetricFamily("invoice_worker_queue_depth", "Messages waiting in the queue.",
                                      labels=["queue"])
            for queue, count in sorted(snapshot.queue_depth.items()):
                depth.add_metric([queue], count)
            yield depth


class Handler(BaseHTTPRequestHandler):
    server: "OperatorServer"
    timeout = READ_TIMEOUT_SECONDS  # of each read of the socket (StreamRequestHandler.setup)

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        self.server.request_read(self.connection)
        return parsed

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = metrics.exposition(ScrapeGauges(self.server.probe))
            self._send(200, body, content_type)
        elif path == "/healthz":
            self._send_json(200, {"alive": True})
        elif path == "/readyz":
            ready, report = self.server.probe.readiness()
            self._send_json(200 if ready else 503, report)
        else:
            self._send_json(404, {"error": f"no such path {path}; try /metrics, /healthz or /readyz"})

    def _send_json(self, status: int, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s " + format, self.address_string(), *args)


class OperatorServer(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS of them (see the module's docstring)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, probe: Probe) -> None:
        self.probe = probe
        self._guard = threading.Lock()
        self._open = 0
        self._sending: dict[socket.socket, float] = {}  # connections whose request is not read yet
        super().__init__((host, port), Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._guard:
            if self._open >= MAX_CONNECTIONS:
                if not self._sending:  # every slot is answering a request: this one waits for none
                    super().shutdown_request(request)
                    return
                oldest = min(self._sending, key=self._sending.__getitem__)
                del self._sending[oldest]
                try:
                    oldest.shutdown(socket.SHUT_RDWR)  # its thread's read ends; the thread ends with it
                except OSError:
                    pass
                log.debug("operator endpoint: %d connections open; closed the oldest unfinished request", self._open)
            self._open += 1
            self._sending[request] = time.monotonic()
        super().process_request(request, client_address)

    def request_read(self, request: Any) -> None:
        with self._guard:
            self._sending.pop(request, None)

    def shutdown_request(self, request: Any) -> None:
        with self._guard:
            self._sending.pop(request, None)
            self._open -= 1
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A caller that went away mid-answer, or a connection closed above: not the worker's problem.
        log.debug("operator endpoint: a connection from %s ended with an error", client_address, exc_info=True)


def serve(port: int, probe: Probe, host: str | None = None) -> OperatorServer | None:
    """Serve on METRICS_ADDRESS (or `host`):`port` in a daemon thread; None (and an ERROR) when the
    port cannot be had."""
    host = host or settings().metrics_address
    try:
        server = OperatorServer(host, port, probe)
    except OSError as exc:
        log.error("cannot serve /metrics, /healthz and /readyz on port %d: %s; the worker goes on without them "
                  "(give each worker on a host its own METRICS_PORT)", port, exc.strerror or exc)
        return None
    threading.Thread(target=server.serve_forever, name="operator-endpoint", daemon=True).start()
    log.info("serving /metrics, /healthz and /readyz on %s port %d", host, port)
    return server


def serve_relay(database_url: str, broker_url: str) -> OperatorServer | None:
    """The relay's metrics: into the worker's folder when `invoice-worker run` gave one (its
    METRICS_PORT is then 0, and the worker's scrape shows them); alone, on its own METRICS_PORT."""
    import os

    port = settings().metrics_port
    shared = bool(os.environ.get(metrics.MULTIPROC_VARIABLE))
    if not port and not shared:
        return None
    metrics.enable(multiprocess=shared)
    return serve(port, Probe(database_url, broker_url, [])) if port else None
