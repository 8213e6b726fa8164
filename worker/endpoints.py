"""Where the database and the broker are.

From the environment when DATABASE_URL / BROKER_URL are set; otherwise from the endpoints file
that a running `invoice-worker run` writes for its embedded servers, so that commands in
another shell (publish, invoices get, ...) find them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from worker.config import ConfigurationError, settings

ENDPOINTS_FILE = "endpoints.json"


def endpoints_path() -> Path:
    return settings().data_dir / ENDPOINTS_FILE


def write_endpoints(database: str, broker: str) -> None:
    path = endpoints_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The URLs may carry passwords (a configured DATABASE_URL beside an embedded broker): owner only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps({"databaseUrl": database, "brokerUrl": broker, "pid": os.getpid()}))


def remove_endpoints() -> None:
    endpoints_path().unlink(missing_ok=True)


def _from_file(key: str) -> str | None:
    path = endpoints_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(data["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return None  # the run that wrote it is gone
    return data.get(key)


def _resolve(configured: str | None, key: str, variable: str) -> str:
    url = configured or _from_file(key)
    if not url:
        raise ConfigurationError(
            f"{variable}: not set, and no running `invoice-worker run` with embedded servers was found "
            f"({endpoints_path()}); set it or start `invoice-worker run`"
        )
    return url


def database_url() -> str:
    return _resolve(settings().database_url, "databaseUrl", "DATABASE_URL")


def broker_url() -> str:
    return _resolve(settings().broker_url, "brokerUrl", "BROKER_URL")


def libpq_url(database_url: str) -> str:
    """psycopg's form of the SQLAlchemy URL (postgresql+psycopg://… → postgresql://…)."""
    from sqlalchemy.engine import make_url

    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
