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
    from urllib.parse import quote

    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(drivername="postgresql")
    hosts = url.query.get("host")
    if isinstance(hosts, tuple) or (isinstance(hosts, str) and ":" in hosts):
        # several hosts (a primary and its standbys): libpq takes them as h1:p1,h2:p2 in the authority
        hosts = (hosts,) if isinstance(hosts, str) else hosts
        query = "&".join(f"{key}={quote(str(value))}" for key, values in url.query.items() if key != "host"
                         for value in (values if isinstance(values, tuple) else (values,)))
        userinfo = ""
        if url.username:
            userinfo = quote(url.username, safe="") + (f":{quote(url.password, safe='')}" if url.password else "") + "@"
        return f"postgresql://{userinfo}{','.join(hosts)}/{url.database or ''}" + (f"?{query}" if query else "")
    return url.render_as_string(hide_password=False)


# The client's half of "a host cut off holds no lock for long" (the server's half: the same
# keepalives and idle_in_transaction_session_timeout in worker/local/pg_cluster.py). A connection
# whose peer went silent (a partition, a machine lost) is given up in about 11 s when idle
# (keepalive after 5 s, then 3 probes 2 s apart) and in 10 s when data it sent is not
# acknowledged (tcp_user_timeout); a host that does not answer a connect is passed over after 5 s
# (connect_timeout, per host of a multi-host URL), so that a failover finds the new primary.
CONNECT_OPTIONS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
                   "tcp_user_timeout": 10_000, "connect_timeout": 5}
# A transaction left open by a client that went silent ends on the server after 10 s, its row and
# inbox locks released: the worker never waits on itself between two statements of a transaction
# (a batch's statements run back to back), so 10 s idle inside one means the client is gone.
IDLE_IN_TRANSACTION_MS = 10_000
