"""The operator's HTTP endpoint on METRICS_PORT (CONTRACT.md section 10): `/metrics`,
`/healthz` and `/readyz`, served by a thread of the worker's main process (and of a relay that
runs alone). A port already taken is logged as an error; the worker goes on consuming."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from worker.operations import metrics
from worker.config import settings
from worker.operations.health import Probe

log = logging.getLogger(__name__)


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
    daemon_threads = True

    def __init__(self, port: int, probe: Probe, host: str = "0.0.0.0") -> None:
        self.probe = probe
        super().__init__((host, port), Handler)


def serve(port: int, probe: Probe) -> OperatorServer | None:
    """Serve on `port` in a daemon thread; None (and an ERROR) when the port cannot be had."""
    try:
        server = OperatorServer(port, probe)
    except OSError as exc:
        log.error("cannot serve /metrics, /healthz and /readyz on port %d: %s; the worker goes on without them "
                  "(give each worker on a host its own METRICS_PORT)", port, exc.strerror or exc)
        return None
    threading.Thread(target=server.serve_forever, name="operator-endpoint", daemon=True).start()
    log.info("serving /metrics, /healthz and /readyz on port %d", port)
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
