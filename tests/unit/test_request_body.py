"""worker/delivery/revocation.py Request: the pool process gets the body Celery's main process
already decoded, not the encoded body to decode again. For anything hypothesis can put in a
protocol-2 message, what reaches the task (what crosses the pipe to the pool process: pickled) is
exactly what Celery's own request gives it after its decode there; and a body Celery's request
refuses (not JSON, not three values) is refused by ours with the same error, in the main process,
where the consumer dead-letters it."""

import pickle
import uuid
from typing import Any

import pytest
from celery.worker.request import Request as CeleryRequest
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.message import Message
from kombu.serialization import dumps, loads

from worker.celery_app import app
from worker.delivery.revocation import Request

TASK = "invoices.bulk_import"
app.loader.import_default_modules()  # the task modules, as the worker imports them

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
embeds = st.none() | st.fixed_dictionaries({}, optional={
    "callbacks": st.none(), "errbacks": st.none(), "chain": st.none(), "chord": st.none()})


def message(body: bytes, content_type: str = "application/json") -> Message:
    headers = {"lang": "py", "task": TASK, "id": str(uuid.uuid4()), "retries": 0, "root_id": None,
               "parent_id": None, "argsrepr": "", "kwargsrepr": ""}
    return Message(body=body, content_type=content_type, content_encoding="utf-8", headers=headers,
                   delivery_info={"exchange": "", "routing_key": "invoices.imports"}, properties={},
                   accept={"application/json"})


def in_the_pool(request: Any) -> tuple[Any, Any, Any]:
    """What the pool process's trace decodes from what the request sends it (Celery's
    trace_task_ret: decoded when a content type came with the body, else taken as it is)."""
    sent = pickle.loads(pickle.dumps((request.body, request.content_type, request.content_encoding)))
    body, content_type, encoding = sent
    if content_type:
        return tuple(loads(body, content_type, encoding, accept={"application/json"}))
    return tuple(body)


@settings(max_examples=300)
@given(st.lists(json_values, max_size=4), st.dictionaries(st.text(max_size=10), json_values, max_size=3), embeds)
def test_the_task_gets_what_celerys_request_would_give_it(args: list, kwargs: dict, embed: dict | None) -> None:
    _, _, body = dumps([args, kwargs, embed], "json")
    task = app.tasks[TASK]
    ours = Request(message(body), app=app, task=task)
    celerys = CeleryRequest(message(body), app=app, task=task)
    assert in_the_pool(ours) == in_the_pool(celerys)
    assert ours.content_type is None  # nothing left to decode in the pool process
    assert (ours.args, ours.kwargs) == (celerys.args, celerys.kwargs)  # what `inspect` shows


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"{\"args\": 1}", b"7", b"[[], {}, {}, 4]"])
def test_a_body_celery_refuses_is_refused_the_same_way(body: bytes) -> None:
    task = app.tasks[TASK]
    with pytest.raises(Exception) as celerys:
        CeleryRequest(message(body), app=app, task=task)
    with pytest.raises(Exception) as ours:
        Request(message(body), app=app, task=task)
    assert type(ours.value) is type(celerys.value)
