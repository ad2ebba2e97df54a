"""Reads and roles on real servers: no user, no data; a viewer reads and previews but
cannot write (refused, audited, nothing published); the invoice and credit-note views say
what the service stored; the served OpenAPI document is the checked-in one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from tests.console.api_helpers import end_offsets, new_key, seed_invoice
from tests.console.conftest import VIEWER, RunningConsole
from tests.support import Kafka, fetch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DLQ = "credit-note-commands.dlq"
#: Every route of the API, with a request a user would send.
ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/api/v1/invoices/in_1001", {}),
    ("POST", "/api/v1/invoices/in_1001/preview", {"json": {"amount": 100}}),
    ("GET", "/api/v1/credit-notes", {}),
    ("GET", "/api/v1/credit-notes/cn_x", {}),
    ("POST", "/api/v1/credit-notes", {"json": {"invoice_id": "in_1001", "amount": 100}}),
    ("POST", "/api/v1/credit-notes/cn_x/void", {}),
    ("POST", "/api/v1/credit-notes/cn_x/update", {"json": {"memo": "m"}}),
    ("GET", "/api/v1/commands/k1", {}),
    ("GET", "/api/v1/dead-letters", {}),
    ("GET", f"/api/v1/dead-letters/{DLQ}", {}),
    ("GET", f"/api/v1/dead-letters/{DLQ}/0/0", {}),
    ("POST", f"/api/v1/dead-letters/{DLQ}/replay", {"json": {"all_matching": True}}),
    ("GET", "/api/v1/replays", {}),
    ("GET", "/api/v1/health/flow", {}),
    ("GET", "/api/v1/openapi.json", {}),
]
WRITES = [(method, path, options) for method, path, options in ROUTES
          if method == "POST" and "preview" not in path]


def test_every_route_of_the_openapi_document_is_exercised_here() -> None:
    document = json.loads((ROOT / "schemas" / "console-openapi.json").read_text())
    routes = {(method.upper(), path) for path, item in document["paths"].items()
              for method in item}
    templates = {("GET", "/api/v1/me")}
    for method, path, _ in ROUTES:
        parts = path.split("/")
        for route_method, route in routes:
            pattern = route.split("/")
            if route_method == method and len(pattern) == len(parts) and all(
                    a == b or a.startswith("{") for a, b in zip(pattern, parts, strict=True)):
                templates.add((route_method, route))
    assert routes <= templates, sorted(routes - templates)


async def test_no_route_answers_without_a_user(bare_console: RunningConsole) -> None:
    anonymous = bare_console.client()
    wrong = bare_console.client("cn_not-a-token")
    for method, path, options in ROUTES:
        for client in (anonymous, wrong):
            answer = await client.request(method, path.replace(DLQ, f"x{DLQ}"), **options)
            assert answer.status_code == 401, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "unauthenticated"


async def test_a_viewer_reads_and_previews_but_cannot_write(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_1001", paid=50_000)
    viewer = console.viewer()
    before = await end_offsets(settings, settings.topics.credit_note_commands)
    dlq = f"{settings.topics.credit_note_commands}.dlq"
    for method, path, options in WRITES:
        answer = await viewer.request(method, path.replace(DLQ, dlq),
                                      headers={"Idempotency-Key": new_key()}, **options)
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json()["error"]["code"] == "forbidden"
    dry = await viewer.post(f"/api/v1/dead-letters/{dlq}/replay",
                            json={"all_matching": True, "dry_run": True})
    assert dry.status_code == 403
    assert await end_offsets(settings, settings.topics.credit_note_commands) == before
    refusals = await fetch(settings, "SELECT outcome FROM console_audit WHERE actor = $1",
                           VIEWER)
    assert [row["outcome"] for row in refusals] == ["refused:forbidden"] * (len(WRITES) + 1)

    assert (await viewer.get("/api/v1/invoices/in_1001")).status_code == 200
    preview = await viewer.post("/api/v1/invoices/in_1001/preview", json={"amount": 10_000})
    assert preview.status_code == 200, preview.text
    assert preview.json()["credit_note"]["total"] == 10_000
    assert await fetch(settings, "SELECT 1 FROM credit_notes") == []
    assert (await viewer.get("/api/v1/health/flow")).status_code == 200


async def test_the_invoice_and_its_credit_notes_read_as_stored(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    lines = [{"id": "il_1", "description": "Widget", "quantity": 4, "unit_amount": 2_500},
             {"id": "il_2", "description": "Gadget", "quantity": 1, "unit_amount": 5_000}]
    await seed_invoice(settings, kafka, "in_5001", paid=15_000, lines=lines)
    await seed_invoice(settings, kafka, "in_5002", lines=lines)
    operator = console.operator()
    first = await operator.post("/api/v1/credit-notes", headers={"Idempotency-Key": new_key()},
                                json={"invoice_id": "in_5001", "reason": "order_change",
                                      "lines": [{"type": "invoice_line_item",
                                                 "invoice_line_id": "il_1", "quantity": 1}],
                                      "refund_amount": 2_500})
    assert first.status_code == 200 and first.json()["status"] == "applied", first.text
    second = await operator.post("/api/v1/credit-notes",
                                 headers={"Idempotency-Key": new_key()},
                                 json={"invoice_id": "in_5002", "amount": 1_000})
    assert second.json()["status"] == "applied", second.text
    await kafka.expect(settings.topics.refund_requests, "refund.requested")

    invoice = (await operator.get("/api/v1/invoices/in_5001")).json()
    one = next(line for line in invoice["lines"] if line["id"] == "il_1")
    assert (one["credited_quantity"], one["remaining_quantity"], one["credited_net"],
            one["remaining_net"]) == (1, 3, 2_500, 7_500)
    assert [p["applied"] for p in invoice["payments"]] == [15_000]
    assert invoice["received_at"] <= invoice["payments"][0]["received_at"]
    assert invoice["payments"][0]["trigger_source"] == "/tests"
    assert invoice["payments"][0]["trigger_id"].startswith("ev-")
    assert invoice["payments"][0]["refunded"] == 2_500
    [note] = invoice["credit_notes"]
    assert (note["refund_amount"], note["refund_status"]) == (2_500, "pending")
    assert note["can_void"]["allowed"] is False  # post-payment: refunded
    [refund] = invoice["refunds"]
    assert (refund["amount"], refund["status"], refund["credit_note_number"]) == (
        2_500, "pending", note["number"])
    types = [event["type"] for event in invoice["events"]]
    assert types[:2] == ["credit_note.issued", "refund.requested"]
    assert {event["state"] for event in invoice["events"]} <= {"published", "pending"}
    assert invoice["dead_letters"] == [] and invoice["dead_letters_read"] is True

    # the rules forbid its void: the command says so, and nothing changes
    refused_void = await operator.post(f"/api/v1/credit-notes/{note['id']}/void",
                                       headers={"Idempotency-Key": new_key()})
    assert refused_void.status_code == 200, refused_void.text
    assert (refused_void.json()["status"], refused_void.json()["reason"]) == (
        "rejected", "not_voidable")
    assert "cannot be voided: its invoice is paid" in refused_void.json()["message"]
    assert "its invoice is paid" in note["can_void"]["reason"]

    by_number = (await operator.get(f"/api/v1/credit-notes/{note['number']}")).json()
    by_id = (await operator.get(f"/api/v1/credit-notes/{note['id']}")).json()
    assert by_number == by_id and by_id["journal"][0]["account"] == "contra_revenue"

    everything = (await operator.get("/api/v1/credit-notes")).json()
    assert [item["invoice_id"] for item in everything["items"]] == ["in_5002", "in_5001"]
    only = (await operator.get("/api/v1/credit-notes",
                               params={"reason": "order_change"})).json()
    assert [item["id"] for item in only["items"]] == [note["id"]]
    assert (await operator.get("/api/v1/credit-notes", params={"status": "void"})
            ).json()["items"] == []
    assert (await operator.get("/api/v1/credit-notes", params={"customer_id": "cus_42"})
            ).json()["items"][0]["customer_id"] == "cus_42"
    page = (await operator.get("/api/v1/credit-notes", params={"limit": 1})).json()
    assert [item["invoice_id"] for item in page["items"]] == ["in_5002"]
    rest = (await operator.get("/api/v1/credit-notes",
                               params={"limit": 1, "page": page["next"]})).json()
    assert [item["invoice_id"] for item in rest["items"]] == ["in_5001"]
    assert rest["next"] is None


async def test_the_served_openapi_document_is_the_checked_in_one(
        bare_console: RunningConsole) -> None:
    served = await bare_console.viewer().get("/api/v1/openapi.json")
    assert served.status_code == 200
    checked_in = json.loads((ROOT / "schemas" / "console-openapi.json").read_text())
    assert served.json() == checked_in, "run `make schemas` and commit the result"


def test_docs_name_every_route_and_reason_code() -> None:
    from service.entrypoints.console.errors import CODES

    text = (ROOT / "docs" / "api.md").read_text()
    document = json.loads((ROOT / "schemas" / "console-openapi.json").read_text())
    for path, item in document["paths"].items():
        for method in item:
            assert f"{method.upper()} {path}" in text, f"{method.upper()} {path}"
    for code in CODES:
        assert f"`{code}`" in text, code


async def test_a_session_posts_with_its_csrf_token_and_not_without(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    """What the pages' script does: a signed-in browser previews and issues through the API
    with the session's CSRF token; without it, nothing is published."""
    await seed_invoice(settings, kafka, "in_8001", paid=10_000)
    browser = await console.session()
    token = console.csrf_token(browser)
    assert (await browser.get("/api/v1/me")).json()["csrf_token"] == token
    before = await end_offsets(settings, settings.topics.credit_note_commands)
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        answer = await browser.post("/api/v1/credit-notes", json={
            "invoice_id": "in_8001", "amount": 100},
            headers={"Idempotency-Key": new_key(), **headers})
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "csrf_failed"
    assert await end_offsets(settings, settings.topics.credit_note_commands) == before
    preview = await browser.post("/api/v1/invoices/in_8001/preview", json={"amount": 100},
                                 headers={"X-CSRF-Token": token})
    assert preview.status_code == 200 and preview.json()["credit_note"]["total"] == 100
    issued = await browser.post("/api/v1/credit-notes", json={"invoice_id": "in_8001",
                                                              "amount": 100},
                                headers={"Idempotency-Key": new_key(), "X-CSRF-Token": token})
    assert issued.status_code == 200 and issued.json()["status"] == "applied", issued.text
