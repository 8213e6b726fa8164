"""Thin task entry points: parse the body, apply one domain operation in a unit of work, return.

May import `delivery`, `storage`, `messages`, `models`, `celery_app` and `config`; only the
Celery app (by name, TASK_MODULES) and the CLI's tests load it.
"""
