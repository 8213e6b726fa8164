"""`make test-oldest` tests the lower bounds pyproject.toml declares: each pin of tests/oldest.txt is
the lower bound of its library there, so that raising a bound without the pin (or the reverse) fails."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def lower_bounds() -> dict[str, str]:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for requirement in declared:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        lower = re.search(r">=\s*([0-9][0-9.]*)", requirement)
        if lower:
            bounds[name] = lower.group(1)
    return bounds


def pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "tests/oldest.txt").read_text().splitlines()]
    return dict(line.lower().split("==") for line in lines if line)


def normalized(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_each_oldest_pin_is_its_declared_lower_bound():
    bounds, pinned = lower_bounds(), pins()
    assert set(pinned) == {"celery", "kombu", "redis", "sqlalchemy", "psycopg", "pydantic", "opentelemetry-api",
                           "opentelemetry-sdk", "opentelemetry-exporter-otlp"}
    for name, version in pinned.items():
        assert name in bounds, f"{name} has no lower bound in pyproject.toml"
        assert normalized(version) == normalized(bounds[name]), (name, version, bounds[name])
