"""The console's routes. Pages are GET; every action is a POST with the session's CSRF token, goes
through the shared function its CLI command calls, and is written to the audit table."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from worker.console import access, reads
from worker.operations.heartbeats import age_text

TEMPLATES = Path(__file__).parent / "templates"
PAGE_SIZE = 50
STATUSES = ("open", "replayed", "discarded", "all")
# The list counts its matches up to this many (an exact count of 100,000 rows costs more than the
# page); a bulk action's confirmation counts exactly.
COUNT_CAP = 10_000


class Console:
    def __init__(self, tokens: dict[str, str], database_url: str, broker_url: str) -> None:
        from worker.config import settings

        self.tokens = tokens
        self.database_url = database_url
        self.broker_url = broker_url
        self.wait_seconds = settings().invoice_wait_seconds
        # Autoescape on for every template: whatever a message carried is text, never markup.
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                 undefined=jinja2.StrictUndefined)
        env.filters["when"] = lambda v: "" if v is None else (v if isinstance(v, str) else v.isoformat(timespec="seconds"))
        env.filters["age"] = age_text
        self.templates = Jinja2Templates(env=env)

    # -- access -------------------------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        return not self.tokens

    def who(self, request: Request) -> str | None:
        return access.who(request.session, self.tokens)

    def render(self, request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        context.update(request=request, read_only=self.read_only, who=self.who(request),
                       csrf=access.csrf_token(request.session), path=request.url.path)
        response = self.templates.TemplateResponse(request, name, context, status_code=status_code)
        response.headers["Content-Security-Policy"] = ("default-src 'none'; style-src 'self' 'unsafe-inline'; "
                                                       "img-src 'self'; form-action 'self'; frame-ancestors 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        return response

    def refused(self, request: Request) -> Response | None:
        """With tokens configured, every page needs a logged-in session."""
        if self.tokens and self.who(request) is None:
            return self.render(request, "login.html", 401, problem=None, next=request.url.path)
        return None

    async def action_guard(self, request: Request) -> tuple[FormData, str] | Response:
        """A POST action: logged in, the console not read-only, and the form's CSRF token right."""
        form = await request.form()
        if self.read_only:
            return self.render(request, "message.html", 403, title="read-only",
                               message="This console is read-only: no CONSOLE_TOKEN is configured.")
        who = self.who(request)
        if who is None:
            return self.render(request, "login.html", 401, problem=None, next="/")
        if not access.csrf_ok(request.session, form.get("csrf")):
            return self.render(request, "message.html", 403, title="refused",
                               message="The form's CSRF token is missing or wrong; reload the page and try again.")
        return form, who

    # -- pages --------------------------------------------------------------------------------
    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html", problem=None, next=request.query_params.get("next", "/"))

    async def login(self, request: Request) -> Response:
        form = await request.form()
        if not access.csrf_ok(request.session, form.get("csrf")):
            return self.render(request, "login.html", 403, problem="The form expired; try again.", next="/")
        found = access.login(self.tokens, str(form.get("token") or ""))
        if found is None:
            await asyncio.sleep(0.2)  # a guess costs something (without holding up other requests)
            return self.render(request, "login.html", 401, problem="That token is not valid.", next="/")
        request.session.clear()
        request.session.update(who=found[0], tid=found[1])
        access.csrf_token(request.session)
        target = str(form.get("next") or "/")
        return RedirectResponse(target if target.startswith("/") and not target.startswith("//") else "/", 303)

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if access.csrf_ok(request.session, form.get("csrf")):
            request.session.clear()
        return RedirectResponse("/login", 303)

    async def overview(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        from worker.celery_app import app

        data = await run_in_threadpool(reads.overview, self.database_url, self.broker_url, app.conf.task_queues,
                                       self.wait_seconds)
        return self.render(request, "overview.html", data=data)

    def _filter(self, params: Any) -> Any:
        from worker.delivery.dead_letters import Filter

        def number(key: str) -> int | None:  # whole minutes, as the CLI's --older-than / --newer-than
            value = str(params.get(key) or "").strip()
            return int(value) if value.isdigit() else None

        status = params.get("status") or "open"
        up_to = params.get("up_to_id")
        return Filter(status=None if status == "all" else status if status in STATUSES else "open",
                      reason=params.get("reason") or None, task=params.get("task") or None,
                      tenant=params.get("tenant") or None, older_than_minutes=number("older_than"),
                      newer_than_minutes=number("newer_than"),
                      up_to_id=int(up_to) if up_to and str(up_to).isdigit() else None)

    @staticmethod
    def _filter_query(selection: Any) -> dict[str, str]:
        shown = {"status": selection.status or "all", "reason": selection.reason, "task": selection.task,
                 "tenant": selection.tenant, "older_than": selection.older_than_minutes,
                 "newer_than": selection.newer_than_minutes}
        return {k: (f"{v:g}" if isinstance(v, float) else str(v)) for k, v in shown.items() if v not in (None, "")}

    async def dead_letters(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        from worker.delivery import dead_letters

        selection = self._filter(request.query_params)
        before = request.query_params.get("before")
        before_id = int(before) if before and before.isdigit() else None

        def read() -> tuple[list[Any], int, list[str]]:
            rows = dead_letters.page(selection, before_id, PAGE_SIZE + 1)
            return rows, dead_letters.count_up_to(selection, COUNT_CAP + 1), dead_letters.reasons()

        rows, matching, reasons = await run_in_threadpool(read)
        query = self._filter_query(selection)
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        next_url = f"/dead-letters?{urlencode({**query, 'before': rows[-1].id})}" if more else None
        shown = f"{COUNT_CAP:,}+" if matching > COUNT_CAP else str(matching)
        return self.render(request, "dead_letters.html", rows=rows, matching=shown, reasons=reasons,
                           query=query, next_url=next_url, first_url=f"/dead-letters?{urlencode(query)}",
                           paged=before_id is not None, statuses=STATUSES)

    async def dead_letter(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        from worker.delivery import dead_letters

        row = await run_in_threadpool(dead_letters.get, request.path_params["id"])
        if row is None:
            return self.render(request, "message.html", 404, title="not found",
                               message=f"No dead letter {request.path_params['id']}.")
        body, how = reads.readable_body(row.body)
        headers = json.dumps(row.headers, indent=2, ensure_ascii=False, default=str)
        return self.render(request, "dead_letter.html", row=row, body=body, how=how, headers=headers,
                           done=request.query_params.get("done"))

    async def dead_letter_action(self, request: Request) -> Response:
        guarded = await self.action_guard(request)
        if isinstance(guarded, Response):
            return guarded
        form, who = guarded
        from worker.delivery import dead_letters

        dead_letter_id, action = request.path_params["id"], request.path_params["action"]
        if action not in ("replay", "discard"):
            return self.render(request, "message.html", 404, title="no such action", message="replay or discard")

        def act() -> str:
            if action == "replay":
                from worker.celery_app import publishing_app

                result = dead_letters.replay(dead_letter_id, publishing_app())
                reads.record(who, "dead-letter.replay", {"deadLetters": [dead_letter_id]},
                             f"replayed as {result['task']} ({result['replayedAs']})")
                return f"replayed as {result['task']} ({result['replayedAs']})"
            dead_letters.discard(dead_letter_id)
            reads.record(who, "dead-letter.discard", {"deadLetters": [dead_letter_id]})
            return "discarded"

        try:
            done = await run_in_threadpool(act)
        except dead_letters.NotReplayable as exc:
            return self.render(request, "message.html", 409, title="not done", message=str(exc))
        return RedirectResponse(f"/dead-letters/{dead_letter_id}?{urlencode({'done': done})}", 303)

    async def bulk_confirm(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        from worker.delivery import dead_letters

        action = request.query_params.get("action")
        if action not in ("replay", "discard"):
            return self.render(request, "message.html", 400, title="no such action", message="replay or discard")
        selection = self._filter(request.query_params)
        if selection.status != "open":
            return self.render(request, "message.html", 400, title="open dead letters only",
                               message="A bulk action works on open dead letters; set the status filter to open.")
        number, highest = await run_in_threadpool(dead_letters.count, selection)
        return self.render(request, "bulk.html", action=action, number=number, highest=highest,
                           query=self._filter_query(selection))

    async def bulk(self, request: Request) -> Response:
        guarded = await self.action_guard(request)
        if isinstance(guarded, Response):
            return guarded
        form, who = guarded
        from worker.delivery import dead_letters

        action = form.get("action")
        selection = self._filter(form)
        if action not in ("replay", "discard") or selection.status != "open" or selection.up_to_id is None:
            return self.render(request, "message.html", 400, title="not done", message="an incomplete bulk action")

        def act() -> Any:
            app = None
            if action == "replay":
                from worker.celery_app import publishing_app

                app = publishing_app()
            result = dead_letters.bulk(selection, str(action), app)
            reads.record(who, f"dead-letters.bulk-{action}", {"filter": selection.to_json(), "deadLetters": result.done,
                                                             "failed": {str(k): v for k, v in result.failed.items()}},
                         f"confirmed {form.get('confirmed')}, done {len(result.done)}")
            return result

        result = await run_in_threadpool(act)
        return self.render(request, "message.html", title=f"bulk {action}",
                           message=f"{action}ed {len(result.done)} dead letters"
                                   + (f"; {len(result.failed)} could not be: "
                                      + "; ".join(f"{k}: {v}" for k, v in result.failed.items())
                                      if result.failed else "."))

    async def invoices(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        p = request.query_params
        found = await run_in_threadpool(reads.find_invoice, p.get("tenant"), p.get("number"), p.get("order"),
                                        p.get("payment"))
        if "invoiceId" in found:
            return RedirectResponse(f"/invoices/{found['invoiceId']}", 303)
        return self.render(request, "invoices.html", found=found, params=dict(p))

    async def invoice(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        page = await run_in_threadpool(reads.invoice_page, str(request.path_params["id"]))
        if page is None:
            return self.render(request, "message.html", 404, title="not found", message="No such invoice.")
        invoice_json = json.dumps(page["invoice"], indent=2, ensure_ascii=False) if page["invoice"] else ""
        return self.render(request, "invoice.html", invoice_json=invoice_json, **page)

    async def waiting(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        from worker.brokers.relay import parked

        def read() -> dict[str, Any]:
            return {"waiting": reads.waiting(self.wait_seconds), "retries": reads.scheduled_retries(),
                    "parked": parked(self.database_url)}

        data = await run_in_threadpool(read)
        return self.render(request, "waiting.html", done=request.query_params.get("done"), **data)

    async def publish_again(self, request: Request) -> Response:
        guarded = await self.action_guard(request)
        if isinstance(guarded, Response):
            return guarded
        form, who = guarded
        from worker.brokers.relay import publish_again

        outbox_id = request.path_params["id"]

        def act() -> bool:
            handed = publish_again(self.database_url, outbox_id)
            if handed:
                reads.record(who, "outbox.publish-again", {"outbox": [outbox_id]})
            return handed

        if not await run_in_threadpool(act):
            return self.render(request, "message.html", 409, title="not done", message=f"No parked event {outbox_id}.")
        return RedirectResponse(f"/waiting?{urlencode({'done': f'event {outbox_id} handed back to the relay'})}", 303)

    async def audit(self, request: Request) -> Response:
        if (refused := self.refused(request)) is not None:
            return refused
        rows = await run_in_threadpool(reads.audit)
        return self.render(request, "audit.html", rows=rows, dumps=lambda v: json.dumps(v, ensure_ascii=False))


def create_app(tokens: dict[str, str], database_url: str, broker_url: str) -> Starlette:
    console = Console(tokens, database_url, broker_url)
    routes = [
        Route("/", console.overview),
        Route("/login", console.login_page, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/dead-letters", console.dead_letters),
        Route("/dead-letters/bulk", console.bulk_confirm, methods=["GET"]),
        Route("/dead-letters/bulk", console.bulk, methods=["POST"]),
        Route("/dead-letters/{id:int}", console.dead_letter),
        Route("/dead-letters/{id:int}/{action:str}", console.dead_letter_action, methods=["POST"]),
        Route("/invoices", console.invoices),
        Route("/invoices/{id:uuid}", console.invoice),
        Route("/waiting", console.waiting),
        Route("/outbox/{id:int}/publish-again", console.publish_again, methods=["POST"]),
        Route("/audit", console.audit),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
    ]
    middleware = [Middleware(SessionMiddleware, secret_key=access.session_key(tokens), session_cookie="console_session",
                             max_age=12 * 3600, same_site="strict", https_only=False)]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.console = console
    return app
