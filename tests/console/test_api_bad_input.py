"""Bad input on every route: a clear 4xx with a reason code, and nothing published on
credit-note-commands (its end offsets are read before and after)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from service.entrypoints.console.errors import CODES
from service.settings import Settings
from tests.console.api_helpers import end_offsets, new_key
from tests.console.conftest import OPERATOR, RunningConsole
from tests.support import fetch

pytestmark = pytest.mark.integration

GOOD_ISSUE: dict[str, Any] = {
    "invoice_id": "in_none", "reason": "other", "memo": "m", "metadata": {"a": "b"},
    "lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 1}],
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
#: Values no field of the contract takes where they are put.
wrong = st.one_of(st.just(-1), st.just(0), st.just(1.5), st.just("12"), st.just(10**16),
                  st.just([]), st.just({}), st.just(None), st.just(True), st.just("x" * 6000),
                  st.just("\x00"))


@st.composite
def bad_issue_bodies(draw: st.DrawFn) -> Any:
    """A body of ``POST /credit-notes``: any JSON, or the good one with one thing broken."""
    kind = draw(st.sampled_from(["any", "field", "drop", "extra", "line"]))
    if kind == "any":
        return draw(json_values)
    body = {**GOOD_ISSUE}
    if kind == "field":
        body[draw(st.sampled_from(["invoice_id", "reason", "memo", "metadata", "amount",
                                   "refund_amount", "currency", "lines", "refunds",
                                   "effective_at"]))] = draw(wrong)
    elif kind == "drop":
        del body[draw(st.sampled_from(["invoice_id", "lines"]))]
    elif kind == "extra":
        body[draw(st.text(min_size=1, max_size=10).filter(lambda n: n not in GOOD_ISSUE))] = 1
    else:
        line = {**body["lines"][0]}
        line[draw(st.sampled_from(["type", "invoice_line_id", "quantity", "amount"]))] = \
            draw(wrong)
        body["lines"] = [line]
    return body


@st.composite
def bad_update_bodies(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["any", "memo", "metadata", "empty"]))
    if kind == "any":
        return draw(json_values)
    if kind == "empty":
        return {}
    if kind == "memo":
        return {"memo": draw(wrong.filter(lambda value: value is not None))}
    return {"metadata": draw(st.one_of(wrong, st.dictionaries(
        st.text(min_size=41, max_size=45), st.text(max_size=3), min_size=1, max_size=2)))}


def refused(answer: httpx.Response) -> str:
    """The reason code of a refusal, checking it is one: a 4xx with a known code."""
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    code = answer.json()["error"]["code"]
    assert code in CODES, code
    assert CODES[code][0] == answer.status_code, (code, answer.status_code)
    assert answer.json()["error"]["message"]
    return str(code)


@pytest.fixture
async def console(console_factory: Any) -> Any:
    async with console_factory(console_write_rate_per_minute=100_000) as running:
        yield running


@settings(max_examples=60, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bad_issue_bodies(), update=bad_update_bodies())
async def test_bad_write_bodies_are_refused_with_a_code_and_publish_nothing(
        console: RunningConsole, settings: Settings, body: Any, update: Any) -> None:
    topic = settings.topics.credit_note_commands
    before = await end_offsets(settings, topic)
    operator = console.operator()
    issued = await operator.post("/api/v1/credit-notes", json=body,
                                 headers={"Idempotency-Key": new_key()})
    code = refused(issued)
    # the good body is refused only because its invoice is not there
    assert code in {"invalid_message", "invoice_not_found", "message_too_large"}, code
    error = issued.json()["error"]
    if code == "invalid_message" and "field" not in error:  # the whole body's fault
        assert ": message: " in error["message"] or "body" in error["message"], error
    updated = await operator.post("/api/v1/credit-notes/cn_none/update", json=update,
                                  headers={"Idempotency-Key": new_key()})
    assert refused(updated) in {"invalid_message", "credit_note_not_found"}
    previewed = await console.viewer().post("/api/v1/invoices/in_none/preview", json=body)
    assert refused(previewed) in {"invalid_message", "invoice_not_found", "message_too_large"}
    assert await end_offsets(settings, topic) == before


async def test_the_field_at_fault_is_named(console: RunningConsole) -> None:
    operator = console.operator()
    cases = {
        "lines.0.quantity": {**GOOD_ISSUE, "lines": [{**GOOD_ISSUE["lines"][0],
                                                     "quantity": "1"}]},
        "reason": {**GOOD_ISSUE, "reason": "because"},
        "amount": {"invoice_id": "in_none", "amount": -5},
    }
    for field, body in cases.items():
        answer = await operator.post("/api/v1/credit-notes", json=body,
                                     headers={"Idempotency-Key": new_key()})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"] == {**answer.json()["error"], "code": "invalid_message",
                                          "field": field}


async def test_every_route_refuses_bad_input_with_a_code_and_publishes_nothing(
        console: RunningConsole, settings: Settings) -> None:
    topic = settings.topics.credit_note_commands
    dlq = f"{topic}.dlq"
    before = await end_offsets(settings, topic)
    operator, viewer = console.operator(), console.viewer()
    key = {"Idempotency-Key": new_key()}
    cases: list[tuple[str, str, dict[str, Any], set[str]]] = [
        ("POST", f"/api/v1/dead-letters/{dlq}/replay", {"content": b"{{"},
         {"invalid_request"}),
        ("GET", "/api/v1/invoices/in_none", {}, {"invoice_not_found"}),
        ("GET", "/api/v1/invoices/" + "x" * 300, {}, {"invalid_request"}),
        ("POST", "/api/v1/invoices/in_none/preview", {"content": b"{"}, {"invalid_message"}),
        ("POST", "/api/v1/invoices/in_none/preview",
         {"json": {"invoice_id": "other", "amount": 1}}, {"invalid_message"}),
        ("GET", "/api/v1/credit-notes?limit=0", {}, {"invalid_request"}),
        ("GET", "/api/v1/credit-notes?status=lost", {}, {"invalid_request"}),
        ("GET", "/api/v1/credit-notes?reason=whim", {}, {"invalid_request"}),
        ("GET", "/api/v1/credit-notes?issued_from=yesterday", {}, {"invalid_request"}),
        ("GET", "/api/v1/credit-notes?page=notacursor", {}, {"invalid_request"}),
        ("GET", "/api/v1/credit-notes/cn_none", {}, {"credit_note_not_found"}),
        ("POST", "/api/v1/credit-notes", {"json": GOOD_ISSUE}, {"idempotency_key_required"}),
        ("POST", "/api/v1/credit-notes", {"json": GOOD_ISSUE,
                                          "headers": {"Idempotency-Key": "é".encode()}},
         {"idempotency_key_invalid"}),
        ("POST", "/api/v1/credit-notes", {"json": GOOD_ISSUE,
                                          "headers": {"Idempotency-Key": "k" * 201}},
         {"idempotency_key_invalid"}),
        ("POST", "/api/v1/credit-notes", {"content": b"not json", "headers": key},
         {"invalid_message"}),
        ("POST", "/api/v1/credit-notes/cn_none/void", {}, {"idempotency_key_required"}),
        ("POST", "/api/v1/credit-notes/cn_none/void", {"headers": {"Idempotency-Key": "v1"}},
         {"credit_note_not_found"}),
        ("POST", "/api/v1/credit-notes/cn_none/update",
         {"json": {"credit_note_id": "other", "memo": "x"}, "headers": key},
         {"invalid_message"}),
        ("GET", "/api/v1/commands/never-sent", {}, {"command_not_found"}),
        ("GET", "/api/v1/dead-letters/invoices", {}, {"not_dead_letter_topic"}),
        ("GET", "/api/v1/dead-letters/nothing.dlq", {}, {"topic_not_found"}),
        ("GET", f"/api/v1/dead-letters/{dlq}?after=zz", {}, {"invalid_request"}),
        ("GET", f"/api/v1/dead-letters/{dlq}?limit=9999", {}, {"invalid_request"}),
        ("GET", f"/api/v1/dead-letters/{dlq}?since=2026-01-01T00:00:00", {},
         {"invalid_request"}),
        ("GET", f"/api/v1/dead-letters/{dlq}/0/999", {}, {"dead_letter_not_found"}),
        ("GET", f"/api/v1/dead-letters/{dlq}/-1/0", {}, {"invalid_request"}),
        ("POST", f"/api/v1/dead-letters/{dlq}/replay", {"json": {}}, {"invalid_request"}),
        ("POST", f"/api/v1/dead-letters/{dlq}/replay", {"json": {"positions": ["a:b"]}},
         {"invalid_request"}),
        ("POST", f"/api/v1/dead-letters/{dlq}/replay", {"json": {"everything": True}},
         {"invalid_request"}),
        ("POST", "/api/v1/dead-letters/invoices/replay", {"json": {"all_matching": True}},
         {"not_dead_letter_topic"}),
        ("GET", "/api/v1/replays?limit=0", {}, {"invalid_request"}),
    ]
    for method, path, options, codes in cases:
        client = viewer if method == "GET" or "preview" in path else operator
        answer = await client.request(method, path, **options)
        assert refused(answer) in codes, (method, path, answer.text)
    assert await end_offsets(settings, topic) == before
    # every refused write is in the audit, with its reason code
    writes = [codes for method, path, _, codes in cases
              if method == "POST" and "preview" not in path]
    rows = await fetch(settings, "SELECT outcome FROM console_audit WHERE actor = $1"
                                 " ORDER BY id", OPERATOR)
    assert len(rows) == len(writes)
    for row, codes in zip(rows, writes, strict=True):
        assert row["outcome"].removeprefix("refused:") in codes, (row["outcome"], codes)


async def test_a_source_the_allow_list_refuses_is_refused_before_publishing(
        console_factory: Any, settings: Settings) -> None:
    """With an allow-list that does not admit the console, a write would only make a dead
    letter: it is refused 409 and nothing is sent; with ``/console/*`` it goes on."""
    topic = settings.topics.credit_note_commands
    before = await end_offsets(settings, topic)
    body = {"invoice_id": "in_none", "amount": 100}
    async with console_factory(allowed_sources_credit_note_commands=["/support/console"]
                               ) as closed:
        answer = await closed.operator().post("/api/v1/credit-notes", json=body,
                                              headers={"Idempotency-Key": new_key()})
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"]["code"] == "source_not_allowed"
        assert "/console/*" in answer.json()["error"]["message"]
    async with console_factory(allowed_sources_credit_note_commands=["/console/*"]) as opened:
        answer = await opened.operator().post("/api/v1/credit-notes", json=body,
                                              headers={"Idempotency-Key": new_key()})
        assert answer.json()["error"]["code"] == "invoice_not_found"  # past the allow-list
    assert await end_offsets(settings, topic) == before
