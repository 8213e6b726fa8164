"""Log lines (CONTRACT.md section 10): text for people by default, or with LOG_FORMAT=json one
JSON object per line (python-json-logger), for the CLI's processes and for Celery's worker and
beat alike. Whatever the format, no secret reaches a line: the signing secrets and the passwords
of DATABASE_URL and BROKER_URL are replaced by `***` in the formatted text."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import signals

from worker.config import settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = ("levelname", "name", "processName", "message")
JSON_RENAMED = {"levelname": "level", "name": "logger", "processName": "process"}
REDACTED = "***"
# The line each message ends with (JSON only: in text, Celery's own "Task … succeeded" line says it).
task_log = logging.getLogger("worker.task")


def secrets() -> list[str]:
    """What must never be written: signing secrets, console token secrets and URL passwords of this
    process's settings."""
    from sqlalchemy.engine import make_url

    config = settings()
    found = [s.strip() for s in (config.callback_signing_secret or "").split(",")]
    found += list(config.console_tokens)  # the console's token secrets (their names may show)
    urls = [config.database_url, *(config.broker_url or "").split(";")]  # a cluster's nodes: each one
    for url in urls:
        if url:
            try:
                found.append(make_url(url).password or "")
            except Exception:  # a broker URL SQLAlchemy cannot read: take what is between : and @
                found.append(url.partition("://")[2].rpartition("@")[0].partition(":")[2])
    # Longest first, so that a secret containing another is replaced whole; very short ones would
    # blank out ordinary words and protect nothing.
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


class Redacting(logging.Formatter):
    """Wraps a formatter: its output with every secret replaced."""

    def __init__(self, inner: logging.Formatter, hidden: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.hidden = hidden

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        for secret in self.hidden:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(list(JSON_FIELDS), rename_fields=JSON_RENAMED, timestamp="time")  # ISO 8601, UTC


def wants_json() -> bool:
    return settings().log_format == "json"


def _dress(handler: logging.Handler) -> None:
    if isinstance(handler.formatter, Redacting):
        return
    inner = json_formatter() if wants_json() else (handler.formatter or logging.Formatter(TEXT_FORMAT))
    handler.setFormatter(Redacting(inner, secrets()))


def configure(level: str | int = "INFO") -> None:
    """The CLI's logging: one handler on stderr, in LOG_FORMAT, redacting secrets."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    _dress(handler)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _dress_celery_handlers(logger: logging.Logger, **_: Any) -> None:
    """Celery's worker and beat made their handlers: give them our format and redaction."""
    for handler in logger.handlers:
        _dress(handler)


@signals.celeryd_init.connect
def _json_from_the_start(instance: Any = None, options: dict | None = None, **_: Any) -> None:
    """In JSON, the worker's first lines are JSON too: its logging is set up before Celery checks
    its privileges (a warning), and the start-up banner, printed rather than logged, is left out.
    Celery keeps a handler it finds on the root logger (worker_hijack_root_logger is off)."""
    if not wants_json():
        return
    configure((options or {}).get("loglevel") or "INFO")
    logging.captureWarnings(True)
    if instance is not None:
        instance.quiet = True


def announce(message: str) -> None:
    """What `invoice-worker run` tells the person who started it: printed, or a JSON line."""
    if wants_json():
        logging.getLogger("worker.local.supervisor").info(message)
    else:
        print(message, flush=True)


def task_line(task: str, body: Any, result: Any, outcome: str, seconds: float, reason: str | None = None) -> None:
    """The line a message ends with: task, messageId, tenantId, invoiceNumber, outcome (section 4's
    words, or `retried`), reason, durationMs."""
    if not wants_json() or not task_log.isEnabledFor(logging.INFO):
        return
    body = body if isinstance(body, dict) else {}
    result = result if isinstance(result, dict) else {}
    fields = {
        "task": task, "messageId": result.get("messageId") or body.get("messageId"), "tenantId": body.get("tenantId"),
        "invoiceNumber": result.get("invoiceNumber") or body.get("invoiceNumber"),
        "outcome": outcome.replace("_", "-"), "reason": reason, "durationMs": round(seconds * 1000, 3),
    }
    task_log.info("%s %s: %s%s", task, fields["messageId"], fields["outcome"],
                  f" ({reason})" if reason else "", extra=fields)
