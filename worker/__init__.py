"""The invoice worker: Celery app, configuration, unit of work, relay, scheduler and CLI.

`celery -A worker worker` and `celery -A worker beat` find the app here.
"""

from worker.celery_app import app

celery = app

__all__ = ["app", "celery"]
