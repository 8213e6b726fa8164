"""The invoice worker: Celery app, configuration, unit of work, relay, scheduler and CLI.

`celery -A worker worker` and `celery -A worker beat` find the app here (loaded on first use,
so that the CLI can report a wrong setting before anything else reads it).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.celery_app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
