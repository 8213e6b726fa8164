"""The operator's console: server-rendered pages (Starlette, Jinja2 with autoescape) over what the
CLI reads and does. Every action calls the same shared function as its CLI command
(worker.delivery.dead_letters, worker.brokers.relay) and is written to `console_audit`.

May import what the CLI may (models, worker.storage, worker.delivery, worker.brokers,
worker.operations, worker.celery_app, worker.config, worker.endpoints); the CLI imports it to attach
`invoice-worker console`, so it imports nothing of worker.cli.
"""
