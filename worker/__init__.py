"""The invoice worker. `celery -A worker worker` and `celery -A worker beat` find the app here
(loaded on first use, so that the CLI can report a wrong setting before anything else reads it).

The packages, by concern (each `__init__` says what it owns and which packages it may import;
tests/unit/test_layout.py holds the rules): `delivery` (a message becomes one outcome),
`storage` (the transaction, inbox, outbox, history, schema), `brokers` (queues, the Redis
transport, the event relay), `operations` (metrics, health, logs), `cli` (`invoice-worker`),
`local` (the embedded servers of `run`). Wiring at the top: `config` (settings), `endpoints`
(where the database and broker are) and `celery_app` (the app, which imports brokers and
operations only). Beside `worker/`: `tasks` (entry points), `messages` (schemas), `models`.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.celery_app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
