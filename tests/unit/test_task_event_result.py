"""The result a batched message's `task-succeeded` event shows (worker/delivery/task_events.py): the
outcome's repr in place of Celery's saferepr, bounded as Celery bounds it. Properties over any outcome
of JSON values (what `Outcome.to_dict()` holds); no I/O."""

from __future__ import annotations

import ast

from celery.utils.saferepr import saferepr
from hypothesis import given, settings, strategies as st

from worker.delivery.task_events import RESULT_REPR_MAX, _result_repr

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=5),
    max_leaves=40)
OUTCOMES = st.dictionaries(st.text(max_size=30), JSON, max_size=10)


@settings(max_examples=200, deadline=None)
@given(OUTCOMES)
def test_a_short_result_reads_back_as_the_outcome_and_a_long_one_is_celerys_bounded_saferepr(outcome):
    shown = _result_repr(outcome)
    if len(repr(outcome)) <= RESULT_REPR_MAX:
        assert ast.literal_eval(shown) == outcome
    else:
        assert shown == saferepr(outcome, RESULT_REPR_MAX)
        assert len(shown) < 2 * RESULT_REPR_MAX


def test_an_outcome_of_record_payment_is_shown_whole():
    outcome = {"outcome": "applied", "messageId": "pay-7731", "invoiceId": "c93804a0-f711-41d0-af53-e5b349b6698a",
               "invoiceNumber": "INV-00005", "paymentId": "1130a1d1-fbaf-5553-a16a-95021ff1e7fe"}
    assert _result_repr(outcome) == saferepr(outcome, RESULT_REPR_MAX) == repr(outcome)
