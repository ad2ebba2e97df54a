"""Issue, void and update through the API go through credit-note-commands, have one effect
per Idempotency-Key, and the preview is what the issue then does (real service, broker,
PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from service.settings import Settings
from tests.console.api_helpers import end_offsets, new_key, seed_invoice
from tests.console.conftest import OPERATOR, RunningConsole
from tests.support import Kafka, RunningService, fetch

pytestmark = pytest.mark.integration

LINES = [{"id": "il_1", "description": "Widget", "quantity": 10, "unit_amount": 1_000,
          "tax_rate_bps": 1_000}]
ISSUE: dict[str, Any] = {
    "lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 6}],
    "refund_amount": 3_600, "reason": "product_unsatisfactory", "memo": "six arrived damaged",
    "metadata": {"ticket": "SUP-1"}}


def comparable(note: dict[str, Any]) -> dict[str, Any]:
    """What a preview and the issue after it must agree on (not times, not the status
    of the refunds' outcomes, which come later)."""
    keep = ("id", "number", "invoice_id", "type", "reason", "subtotal", "tax", "total",
            "pre_payment_amount", "refund_amount", "credit_amount", "out_of_band_amount",
            "trigger", "memo", "metadata", "lines", "journal")
    return {name: note[name] for name in keep} | {
        "refunds": [{k: r[k] for k in ("refund_id", "payment_id", "amount", "linked")}
                    for r in note["refunds"]]}


async def test_preview_equals_the_issue_that_follows_and_a_retry_has_one_effect(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_1001", paid=8_000, lines=LINES)
    operator = console.operator()
    key = new_key()

    preview = await operator.post("/api/v1/invoices/in_1001/preview", json=ISSUE,
                                  headers={"Idempotency-Key": key})
    assert preview.status_code == 200, preview.text
    previewed = preview.json()
    assert previewed["rejection"] is None
    assert (previewed["max_creditable"], previewed["max_refundable"]) == (11_000, 8_000)
    assert previewed["events"][0] == "credit_note.issued"
    # previewing saved and sent nothing
    assert await fetch(settings, "SELECT 1 FROM credit_notes") == []

    body = {"invoice_id": "in_1001", **ISSUE}
    issued = await operator.post("/api/v1/credit-notes", json=body,
                                 headers={"Idempotency-Key": key})
    assert issued.status_code == 200, issued.text
    result = issued.json()
    assert result["status"] == "applied"
    assert result["source"] == f"/console/{OPERATOR}"
    assert comparable(result["credit_note"]) == comparable(previewed["credit_note"])
    [command] = await kafka_commands(kafka, settings)
    assert command["id"] == key and command["source"] == f"/console/{OPERATOR}"

    before = await end_offsets(settings, settings.topics.credit_note_commands)
    again = await operator.post("/api/v1/credit-notes", json=body,
                                headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json()["status"] == "applied"
    assert again.json()["credit_note"]["id"] == result["credit_note"]["id"]
    assert len(await fetch(settings, "SELECT 1 FROM credit_notes")) == 1
    assert await end_offsets(settings, settings.topics.credit_note_commands) == before

    other = await operator.post("/api/v1/credit-notes", json={**body, "memo": "another"},
                                headers={"Idempotency-Key": key})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert await end_offsets(settings, settings.topics.credit_note_commands) == before
    assert len(await fetch(settings, "SELECT 1 FROM credit_notes")) == 1

    polled = await operator.get(f"/api/v1/commands/{key}")
    assert polled.status_code == 200 and polled.json()["status"] == "applied"
    audit = await fetch(settings, "SELECT action, outcome, idempotency_key FROM console_audit"
                                  " WHERE actor = $1 ORDER BY id", OPERATOR)
    assert [(row["action"], row["outcome"]) for row in audit] == [
        ("issue", "applied"), ("issue", "repeat:applied"),
        ("issue", "refused:idempotency_key_reused")]


async def kafka_commands(kafka: Kafka, settings: Settings) -> list[dict[str, Any]]:
    """The commands on credit-note-commands (read by a consumer of the test's own)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        topic = settings.topics.credit_note_commands
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        found = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                found += [json.loads(r.value) for r in records]
        return found
    finally:
        await consumer.stop()


async def test_a_rejection_is_answered_with_its_code_and_message(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_2001", lines=LINES)
    answer = await console.operator().post(
        "/api/v1/credit-notes", headers={"Idempotency-Key": new_key()},
        json={"invoice_id": "in_2001", "amount": 999_999})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (result["status"], result["reason"]) == ("rejected", "exceeds_creditable_amount")
    assert result["message"] and result["credit_note"] is None
    preview = await console.viewer().post("/api/v1/invoices/in_2001/preview",
                                          json={"amount": 999_999})
    assert preview.json()["rejection"]["code"] == "exceeds_creditable_amount"


async def test_void_and_update_go_through_the_command_topic_once(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_3001", lines=LINES)  # unpaid: pre-payment notes
    operator = console.operator()
    issued = await operator.post("/api/v1/credit-notes", headers={"Idempotency-Key": new_key()},
                                 json={"invoice_id": "in_3001", "amount": 1_100})
    note = issued.json()["credit_note"]
    assert note["can_void"] == {"allowed": True, "reason": None}

    key = new_key()
    updated = await operator.post(f"/api/v1/credit-notes/{note['id']}/update",
                                  headers={"Idempotency-Key": key},
                                  json={"memo": "goodwill", "metadata": {"case": "C-9"}})
    assert updated.status_code == 200, updated.text
    assert updated.json()["status"] == "applied"
    assert updated.json()["credit_note"]["memo"] == "goodwill"
    assert updated.json()["credit_note"]["metadata"] == {"case": "C-9"}

    void_key = new_key()
    for _ in range(2):  # a retried void: one effect
        voided = await operator.post(f"/api/v1/credit-notes/{note['id']}/void",
                                     headers={"Idempotency-Key": void_key})
        assert voided.status_code == 200, voided.text
        assert voided.json()["status"] == "applied"
    view = (await operator.get(f"/api/v1/credit-notes/{note['number']}")).json()
    assert view["status"] == "void"
    assert view["can_void"]["allowed"] is False and "already void" in view["can_void"]["reason"]
    assert [entry["entry"] for entry in view["journal"]].count("void") > 0
    events = await kafka.expect(settings.topics.credit_note_events, "credit_note.voided")
    await kafka.settle(1.0)
    assert len(kafka.on(settings.topics.credit_note_events, "credit_note.voided")) == 1
    assert events[0].key == b"in_3001"
    rows = await fetch(settings, "SELECT source, type FROM processed_messages"
                                 " WHERE topic = $1 ORDER BY processed_at",
                       settings.topics.credit_note_commands)
    assert [(row["source"], row["type"]) for row in rows] == [
        (f"/console/{OPERATOR}", "credit_note.issue"),
        (f"/console/{OPERATOR}", "credit_note.update"),
        (f"/console/{OPERATOR}", "credit_note.void")]


async def test_an_unknown_credit_note_is_refused_before_anything_is_published(
        bare_console: RunningConsole, settings: Settings) -> None:
    before = await end_offsets(settings, settings.topics.credit_note_commands)
    operator = bare_console.operator()
    for path in ("/api/v1/credit-notes/cn_nope/void", "/api/v1/credit-notes/cn_nope/update"):
        answer = await operator.post(path, headers={"Idempotency-Key": new_key()},
                                     json={"memo": "x"})
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["code"] == "credit_note_not_found"
    answer = await operator.post("/api/v1/credit-notes", headers={"Idempotency-Key": new_key()},
                                 json={"invoice_id": "in_nope", "amount": 100})
    assert answer.json()["error"]["code"] == "invoice_not_found"
    assert await end_offsets(settings, settings.topics.credit_note_commands) == before


async def test_without_a_consumer_the_answer_is_202_and_the_command_can_be_polled(
        console: RunningConsole, service: RunningService, settings: Settings,
        kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_4001", lines=LINES)
    await service.stop()  # nothing consumes the command now
    console.deps.settings = console.deps.settings.model_copy(
        update={"console_wait_seconds": 0.3})
    key = new_key()
    answer = await console.operator().post("/api/v1/credit-notes",
                                           headers={"Idempotency-Key": key},
                                           json={"invoice_id": "in_4001", "amount": 100})
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == f"/api/v1/commands/{key}"
    assert answer.json()["status"] == "pending"
    polled = await console.operator().get(answer.headers["location"])
    assert polled.status_code == 200 and polled.json()["status"] == "pending"
    # another user's command is not theirs to see
    other = await console.viewer().get(answer.headers["location"])
    assert other.status_code == 404 and other.json()["error"]["code"] == "command_not_found"


async def test_concurrent_requests_with_one_key_have_one_effect(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    """The same request sent five times at once: one credit note, every answer names it;
    five different bodies at once under one key: one is taken, the others 409."""
    await seed_invoice(settings, kafka, "in_6001", lines=LINES)
    operator = console.operator()
    key = new_key()
    body = {"invoice_id": "in_6001", "amount": 500}
    answers = await asyncio.gather(*(
        operator.post("/api/v1/credit-notes", json=body, headers={"Idempotency-Key": key})
        for _ in range(5)))
    assert {answer.status_code for answer in answers} == {200}, [a.text for a in answers]
    assert len({answer.json()["credit_note"]["id"] for answer in answers}) == 1
    assert len(await fetch(settings, "SELECT 1 FROM credit_notes")) == 1

    other = new_key()
    answers = await asyncio.gather(*(
        operator.post("/api/v1/credit-notes", json={**body, "amount": 100 + n},
                      headers={"Idempotency-Key": other}) for n in range(5)))
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200, 409, 409, 409, 409], [a.text for a in answers]
    taken = next(answer.json() for answer in answers if answer.status_code == 200)
    notes = await fetch(settings, "SELECT total FROM credit_notes WHERE trigger_id = $1", other)
    assert [row["total"] for row in notes] == [taken["credit_note"]["total"]]


@hypothesis.settings(max_examples=8, deadline=None, phases=[hypothesis.Phase.generate],
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                            hypothesis.HealthCheck.too_slow])
@hypothesis.given(variants=st.lists(st.integers(0, 2), min_size=2, max_size=6))
async def test_any_burst_under_one_key_has_one_effect_and_one_body(
        console: RunningConsole, settings: Settings, kafka: Kafka, variants: list[int]) -> None:
    """Requests sent at once under one key, each with one of three bodies: exactly one body
    is taken; every request with it is answered with the one credit note, every other 409."""
    console.deps.rate_limiter.per_minute = 100_000  # the bursts are the point here
    if not await fetch(settings, "SELECT 1 FROM invoices WHERE id = 'in_6101'"):
        await seed_invoice(settings, kafka, "in_6101", lines=LINES)
    key = new_key()
    operator = console.operator()
    answers = await asyncio.gather(*(
        operator.post("/api/v1/credit-notes", headers={"Idempotency-Key": key},
                      json={"invoice_id": "in_6101", "amount": 100 + variant})
        for variant in variants))
    taken = {variant for variant, answer in zip(variants, answers, strict=True)
             if answer.status_code == 200}
    assert len(taken) == 1, [answer.text for answer in answers]
    [winner] = taken
    for variant, answer in zip(variants, answers, strict=True):
        if variant == winner:
            assert answer.status_code == 200 and answer.json()["status"] == "applied"
        else:
            assert answer.status_code == 409, answer.text
            assert answer.json()["error"]["code"] == "idempotency_key_reused"
    notes = await fetch(settings, "SELECT total FROM credit_notes WHERE trigger_id = $1", key)
    assert [row["total"] for row in notes] == [100 + winner]
    assert len({answer.json()["credit_note"]["id"] for answer in answers
                if answer.status_code == 200}) == 1
