"""Reading a worker's operator endpoint the way Prometheus and a load balancer do: plain HTTP,
the text format parsed by prometheus_client's own parser."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body); (0, reason) while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)


def scraped(port: int) -> str:
    status, body = get(port, "/metrics")
    assert status == 200, body
    return body


def metric_values(text: str, name: str, *, with_labels: bool = False, **labels: str) -> list[Any]:
    """The values of the samples called `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found.append((sample.labels, sample.value) if with_labels else sample.value)
    return found
