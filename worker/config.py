"""Configuration from the environment (CONTRACT.md section 9).

A wrong value stops start-up with one line naming the variable: see `load_settings`.
"""

from __future__ import annotations

import functools
import os
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_HARD_DECLINE_CODES = ("lost_card", "stolen_card", "pickup_card", "invalid_account", "fraudulent")



def several_hosts(url: str) -> str:
    """libpq's multi-host spelling (`postgresql://u:p@h1:5432,h2:5432/db?target_session_attrs=read-write`,
    a primary with its standbys) in SQLAlchemy's (`…@/db?host=h1:5432&host=h2:5432&…`), which
    psycopg gets back as libpq's; any other URL unchanged."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not sep or "," not in hosts:
        return url
    path, question, query = tail.partition("?")
    listed = "&".join(f"host={host}" for host in hosts.split(","))
    return f"{scheme}://{userinfo}{at}/{path}?{listed}" + (f"&{query}" if query else "")

class ConfigurationError(Exception):
    """A setting has a value the worker cannot use; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    database_url: str | None = None
    broker_url: str | None = None
    callback_signing_secret: str | None = None
    payment_retry_days: Annotated[tuple[Decimal, ...], NoDecode] = (
        Decimal(1), Decimal(3), Decimal(5), Decimal(7),
    )
    payment_hard_decline_codes: Annotated[tuple[str, ...], NoDecode] = DEFAULT_HARD_DECLINE_CODES
    # How often Celery beat sends invoices.retry_failed_payments.
    payment_retry_scan_seconds: float = Field(default=300.0, gt=0)
    # Published outbox rows are deleted after this many hours.
    outbox_retention_hours: float = Field(default=168.0, ge=0)
    # How long a messageId is remembered (inbox rows); natural keys keep protecting after that, and
    # the tasks that have none keep their rows for good (worker/storage/records.py INBOX_KEPT_TASKS).
    inbox_retention_days: float = Field(default=30.0, ge=0)
    # Discarded and replayed dead letters are deleted this long after they were last seen; open ones never.
    dead_letter_retention_days: float = Field(default=90.0, ge=0)
    # Where the embedded servers keep their data when no URLs are set.
    data_dir: Path = Path(".data")
    # Pool processes: one per core plus one, so that a core does not sit idle while a process waits on
    # PostgreSQL. Measured on 2 cores, end to end with the relay, two rounds each (make bench parts):
    # 2 processes 198 / 171 msg/s, 3 processes 234 / 204, 4 processes 172 / 189; at 200 msg/s the
    # p50 latency was 222 ms with 2 and 20 ms with 3. Each process holds a whole import batch while
    # it works: peak PSS during a bulk import 199 MB with 2, 249 MB with 3, 296 MB with 4.
    worker_concurrency: int = Field(default_factory=lambda: (os.cpu_count() or 1) + 1, ge=1)
    # After SIGTERM (Celery's warm shutdown: running tasks finish, nothing new starts), how long `run`
    # waits for the worker before it kills it; a killed task's message is handed back and runs again.
    worker_stop_seconds: float = Field(default=30.0, ge=0)
    # Micro-batching of the payments, orders and commands queues (worker/delivery/batching.py): a pool process
    # applies up to this many messages in one transaction, gathered for at most APPLY_BATCH_WAIT_MS
    # (longer while every pool process is busy). 1 turns batching off: one message per task.
    apply_batch_size: int = Field(default=100, ge=1, le=1000)
    apply_batch_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    # Messages each pool process reserves ahead. 1 suits long tasks (bulk imports) and fair spreading.
    worker_prefetch_multiplier: int = Field(default=1, ge=1)
    # Redis only: how long an unacknowledged message stays invisible before the broker hands it
    # to another worker. Must exceed the longest task and the longest retry countdown.
    broker_visibility_timeout: int = Field(default=3600, ge=1)
    # RabbitMQ only: the broker's consumer_timeout (RabbitMQ's default, 30 minutes). A message held
    # unacknowledged longer, as one waiting for its eta is, makes RabbitMQ close the channel and hand
    # back every message in flight on it; an eta further ahead than this less a minute is
    # dead-lettered `eta-too-far` instead.
    broker_consumer_timeout: int = Field(default=1800, ge=120)
    # RabbitMQ only: the AMQP heartbeat the worker asks of the broker, in seconds (0: none). A silent
    # connection (a partition, a node gone without a FIN) is dropped after about twice this, and the
    # broker hands back what the consumer held; Celery's default of 120 s kept a partitioned
    # consumer's messages for minutes. 10 s or less for a cluster (docs/brokers.md).
    broker_heartbeat: int = Field(default=10, ge=0)
    # RabbitMQ only: the contract's queues as classic queues (what a bare Celery client declares) or
    # as quorum queues behind topic exchanges (replicated: a cluster's). Quorum needs Celery >= 5.6.
    rabbitmq_queue_type: Literal["classic", "quorum"] = "classic"
    # The longest back-off between two retries of a passing fault, and how many retries.
    task_retry_backoff_max: int = Field(default=600, ge=1)
    task_max_retries: int = Field(default=8, ge=0)
    # Out of order across queues (CONTRACT.md section 4): a message naming an invoice that does not
    # exist yet is retried for this long after it was first seen, then rejected invoice-not-found.
    invoice_wait_seconds: float = Field(default=120.0, ge=0)
    # Poison messages (section 4): a message that has started this many times without reaching an
    # outcome (its process died each time) is dead-lettered worker-lost before it runs again.
    max_deliveries: int = Field(default=5, ge=1)
    # Bounds on one message's work: a statement, a wait for a row lock, a task. A lock wait that runs
    # out is a conflict, retried (an import holding 10,000 invoices does not stall every pool process);
    # a task past its soft limit is dead-lettered; past the hard limit its process is replaced and
    # the message counts a delivery (poison messages). Sized from `make bench`: a 10,000-entry import
    # takes 2-5 s on 2 cores, a payment milliseconds.
    statement_timeout_ms: int = Field(default=60_000, ge=0)
    lock_timeout_ms: int = Field(default=10_000, ge=0)
    task_soft_time_limit: float = Field(default=300.0, gt=0)
    task_time_limit: float = Field(default=330.0, gt=0)
    # A message body larger than this is dead-lettered `too-large` before it is decoded.
    # The largest allowed bulk_import (10,000 invoices × 3 lines) is about 4.2 MB of JSON.
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # How many outbox rows the relay publishes per transaction.
    relay_batch_size: int = Field(default=500, ge=1, le=10_000)
    import_batch_size: int = Field(default=1000, ge=1, le=10_000)
    # The operator's HTTP endpoint (/metrics, /healthz, /readyz); 0 turns it off (section 10).
    metrics_port: int = Field(default=9808, ge=0, le=65535)
    # The address it listens on: loopback unless a scraper on another host must reach it (the
    # Dockerfile and docker-compose.yml set 0.0.0.0 for Prometheus).
    metrics_address: str = Field(default="127.0.0.1", min_length=1)
    # `json`: every log line one JSON object; `text`: lines for people.
    log_format: Literal["text", "json"] = "text"
    # Celery task events, for Flower (`celery -A worker flower`); off by default, they cost a publish per task.
    worker_send_task_events: bool = False
    # /readyz fails when messages wait on the worker's queues, a pool slot is free, and none was received
    # for this long: alive but not consuming (Celery #8030, #8384, #10205, after a broker reconnect).
    consumer_stall_seconds: float = Field(default=30.0, gt=0)

    # The operator's console (`invoice-worker console`, also served by `run`): where it listens, and
    # its named tokens `name:secret,name2:secret2` (several while one is rotated). Without a token it
    # is read-only and listens on loopback only; beyond loopback it refuses to start without one.
    console_address: str = Field(default="127.0.0.1", min_length=1)
    console_port: int = Field(default=8808, ge=0, le=65535)
    console_token: str | None = None

    @field_validator("console_token")
    @classmethod
    def _check_console_token(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        names = set()
        for part in value.split(","):
            name, sep, secret = part.strip().partition(":")
            if not sep or not name.strip() or len(secret.strip()) < 8:
                raise ValueError("expected comma-separated name:secret pairs, each secret at least 8 characters")
            if name.strip() in names:
                raise ValueError(f"the name {name.strip()!r} is given twice")
            names.add(name.strip())
        return value

    @property
    def console_tokens(self) -> dict[str, str]:
        """secret -> name."""
        if not self.console_token:
            return {}
        pairs = (part.strip().partition(":") for part in self.console_token.split(","))
        return {secret.strip(): name.strip() for name, _, secret in pairs}

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        try:
            url = make_url(several_hosts(value))
        except ArgumentError as exc:
            raise ValueError(f"not a SQLAlchemy URL ({exc})") from None
        if not url.drivername.startswith("postgresql"):
            raise ValueError("must be a PostgreSQL URL, e.g. postgresql+psycopg://user:pass@host/db")
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        return url.render_as_string(hide_password=False)

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        # A cluster's nodes as a `;`-separated list (kombu's failover: the next one when a connection
        # fails), all of one kind.
        schemes = set()
        for url in value.split(";"):
            scheme, sep, rest = url.strip().partition("://")
            if not sep or scheme not in {"redis", "rediss", "amqp", "amqps", "pyamqp"}:
                raise ValueError("must be a redis://, rediss:// or amqp:// URL, or `;`-separated amqp:// URLs "
                                 "of a cluster's nodes")
            schemes.add("amqp" if scheme in {"amqp", "amqps", "pyamqp"} else "redis")
        if len(value.split(";")) > 1 and schemes != {"amqp"}:
            raise ValueError("a `;`-separated list of nodes is for RabbitMQ (amqp://) only")
        return value

    @field_validator("rabbitmq_queue_type")
    @classmethod
    def _check_queue_type(cls, value: str) -> str:
        if value == "quorum":
            import celery

            if tuple(int(part) for part in celery.__version__.split(".")[:2]) < (5, 6):
                raise ValueError(f"quorum queues need Celery 5.6 or newer (native delayed delivery of retries "
                                 f"through topic exchanges, and its fix for retries stuck on the dead-letter "
                                 f"cycle check); Celery {celery.__version__} is installed")
        return value

    @field_validator("payment_retry_days", mode="before")
    @classmethod
    def _parse_retry_days(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                days = tuple(Decimal(p) for p in parts)
            except InvalidOperation:
                raise ValueError(f"expected comma-separated numbers of days, got {value!r}") from None
            if any(not d.is_finite() or d < 0 for d in days):
                raise ValueError(f"days must be finite and not negative, got {value!r}")
            if list(days) != sorted(days):
                raise ValueError(f"days must be in ascending order, got {value!r}")
            return days
        return value

    @field_validator("payment_hard_decline_codes", mode="before")
    @classmethod
    def _parse_codes(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @property
    def uses_embedded_servers(self) -> bool:
        return self.database_url is None and self.broker_url is None


def load_settings() -> Settings:
    """Read the environment; raise ConfigurationError naming the first bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        variable = str(first["loc"][0]).upper() if first["loc"] else "configuration"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigurationError(f"{variable}: {message}") from None


@functools.cache
def settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
