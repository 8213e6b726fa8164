"""`invoice-worker run`: migrate, then run the Celery worker, Celery beat and the event relay
as one supervised job, on the embedded servers when no URLs are set. Ctrl-C or SIGTERM stops
everything (children first, then the embedded servers) and leaves no stray process."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from worker.brokers.topology import QUEUES
from worker.config import settings
from worker.operations.logs import announce

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(self.argv, env={**env, **self.extra_env}, start_new_session=True)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def children(data_dir: str) -> list[Child]:
    """The worker serves METRICS_PORT; beat and the relay do not (the relay's counter reaches the
    worker's scrape through the shared PROMETHEUS_MULTIPROC_DIR)."""
    python = sys.executable
    host = socket.gethostname()
    quiet = ["--quiet"] if settings().log_format == "json" else []  # beat's banner is printed, not logged
    silent = {"METRICS_PORT": "0"}
    return [
        Child("worker", [python, "-m", "celery", "-A", "worker", "worker", "-Q", ",".join(QUEUES),
                         "-n", f"invoice-worker@{host}", "--loglevel", "INFO", "--without-mingle",
                         "--without-gossip"]),
        Child("beat", [python, "-m", "celery", "-A", "worker", *quiet, "beat", "--loglevel", "INFO",
                       "-s", os.path.join(data_dir, "celerybeat-schedule")], extra_env=silent),
        Child("relay", [python, "-m", "worker.cli", "relay"], extra_env=silent),
    ] + ([Child("console", [python, "-m", "worker.cli", "console"], extra_env=silent)] if console_url() else [])


def console_url() -> str | None:
    """Where `run` serves the console; None when CONSOLE_PORT is 0 or the console would refuse to
    start (beyond loopback without CONSOLE_TOKEN: logged as an error, the worker runs without it)."""
    from worker.console.access import BindingRefused, check_binding
    from worker.console.serve import url

    config = settings()
    if not config.console_port:
        return None
    try:
        check_binding(config.console_address, config.console_tokens)
    except BindingRefused as exc:
        log.error("console not started: %s", exc)
        return None
    return url(config.console_address, config.console_port)


def run() -> int:
    from worker.endpoints import remove_endpoints, write_endpoints
    from worker.local.embedded import EmbeddedServers
    from worker.storage import migrate

    config = settings()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    servers = None
    database_url, broker_url = config.database_url, config.broker_url
    if database_url is None or broker_url is None:
        servers = EmbeddedServers(config.data_dir)
        # Ctrl-C signals the whole foreground process group. The embedded servers must outlive the
        # worker's shutdown (it still talks to the broker while it stops: a Valkey gone first left it
        # retrying for 25 s), so they start with SIGINT ignored, which they inherit; `stop()` ends them.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if database_url is None:
                database_url = servers.start_postgres()
            if broker_url is None:
                broker_url = servers.start_broker()
        finally:
            signal.signal(signal.SIGINT, lambda *_: stop.set())
        write_endpoints(database_url, broker_url)
        # Passwords hidden: one of the two URLs may be a configured one.
        announce(f"{'embedded PostgreSQL' if config.database_url is None else 'database'}: {_safe(database_url)}")
        announce(f"{'embedded Redis-compatible broker' if config.broker_url is None else 'broker'}: {_safe(broker_url)}")
    else:
        announce(f"database: {_safe(database_url)}")
        announce(f"broker: {_safe(broker_url)}")

    procs: list[Child] = []
    # Every child counts into one fresh folder; the worker's /metrics adds it up (worker.operations.metrics).
    metrics_dir = tempfile.mkdtemp(prefix="invoice-worker-metrics-")
    try:
        migrate.upgrade(database_url)
        announce("database schema is current")
        env = {**os.environ, "DATABASE_URL": database_url, "BROKER_URL": broker_url,
               "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        procs = children(str(_state_dir(config.data_dir)))
        for child in procs:
            child.start(env)
        if (address := console_url()) is not None:
            announce(f"console: {address}" + ("" if settings().console_tokens else " (read-only: no CONSOLE_TOKEN)"))
        announce("worker, beat and relay running; Ctrl-C stops them")
        _supervise(procs, env, stop)
    finally:
        _stop_children(procs)
        if servers is not None:
            remove_endpoints()
            servers.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        announce("stopped")
    return 0


def _state_dir(data_dir: Path) -> Path:
    """Where beat keeps its schedule file: DATA_DIR, made when missing (a service manager starts
    the worker from a folder without .data/, and beat died on the missing folder every 30 s); a
    private temporary folder when DATA_DIR cannot be written. The file only remembers when each
    scan last ran, and a scan repeated is harmless (CONTRACT.md section 8)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".writable"
        probe.touch()
        probe.unlink()
        return data_dir.resolve()
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / f"invoice-worker-{os.getuid()}"
        fallback.mkdir(mode=0o700, exist_ok=True)
        log.warning("DATA_DIR %s is not writable (%s); beat keeps its schedule in %s", data_dir, exc, fallback)
        return fallback


def _supervise(procs: list[Child], env: dict[str, str], stop: threading.Event) -> None:
    """Restart a child that died on its own, with a growing pause if it keeps dying."""
    while not stop.wait(0.5):
        for child in procs:
            if child.alive():
                continue
            code = child.process.returncode if child.process else None
            quick = time.monotonic() - child.started_at < 10
            child.restarts = child.restarts + 1 if quick else 0
            pause = min(2 ** child.restarts, 30)
            log.warning("%s exited with %s; restarting in %ds", child.name, code, pause)
            if stop.wait(pause):
                return
            child.start(env)


def _stop_children(procs: list[Child]) -> None:
    live = [c for c in procs if c.alive()]
    for child in live:
        child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    deadline = time.monotonic() + settings().worker_stop_seconds
    for child in live:
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it (its unacknowledged messages are redelivered)", child.name)
            os.killpg(child.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
            child.process.wait()  # type: ignore[union-attr]
        else:
            try:  # pool processes of the worker, should any outlive their parent
                os.killpg(child.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.split('@')[-1]}" if "@" in rest else url
