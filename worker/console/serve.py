"""Serving the console: uvicorn on CONSOLE_ADDRESS:CONSOLE_PORT, refusing a binding beyond
loopback without a token. `invoice-worker console` runs it in the foreground; `run` starts that
command as one of its supervised children."""

from __future__ import annotations

import logging

from worker.console import access

log = logging.getLogger(__name__)


def url(address: str, port: int) -> str:
    shown = "127.0.0.1" if address in ("0.0.0.0", "::") else address
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"


def serve(address: str, port: int, tokens: dict[str, str], database_url: str, broker_url: str) -> None:
    import uvicorn

    from worker.console.app import create_app

    access.check_binding(address, tokens)
    app = create_app(tokens, database_url, broker_url)
    log.info("console on %s (%s)", url(address, port), "read-only: no CONSOLE_TOKEN" if not tokens else
             f"{len(tokens)} token{'s' if len(tokens) != 1 else ''}")
    # uvicorn's own logging config would replace the worker's (LOG_FORMAT, redaction): keep ours.
    uvicorn.run(app, host=address, port=port, log_config=None, access_log=False, server_header=False,
                proxy_headers=False)
