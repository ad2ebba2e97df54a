"""The running service on the real broker and PostgreSQL: events in, credit notes out."""

from __future__ import annotations

import asyncio
import time

import pytest
import structlog

from service.settings import Settings
from tests.support import Kafka, RunningService, cloudevent, fetch, fetchrow, invoice_data

pytestmark = pytest.mark.integration


async def finalize(kafka: Kafka, settings: Settings, invoice_id: str = "in_1001",
                   **invoice: object) -> None:
    await kafka.publish(settings.topics.invoices,
                        cloudevent("invoice.finalized", invoice_data(invoice_id, **invoice)))


async def issue(kafka: Kafka, settings: Settings, event_id: str | None = None,
                **data: object) -> dict[str, object]:
    event = cloudevent("credit_note.issue", {"invoice_id": "in_1001", **data}, id_=event_id)
    await kafka.publish(settings.topics.credit_note_commands, event)
    return event


async def test_overcharge_credit_reduces_amount_due_and_publishes_the_whole_credit_note(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings)
    command = await issue(kafka, settings, amount=20_000, reason="order_change", memo="overcharge")

    [record] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    event = record.event
    note = event["data"]
    assert record.key == b"in_1001"
    assert event["source"] == "/credit-notes"
    assert note["number"] == "ACME-1001-CN-01"
    assert (note["subtotal"], note["tax"], note["total"]) == (20_000, 0, 20_000)
    assert note["type"] == "pre_payment"
    assert note["pre_payment_amount"] == 20_000 and note["post_payment_amount"] == 0
    assert note["invoice"] == {"amount_remaining": 80_000, "status": "open"}
    assert note["trigger"] == {"source": command["source"], "id": command["id"],
                               "type": "credit_note.issue"}
    assert note["journal"] == [
        {"account": "contra_revenue", "debit": 20_000, "credit": 0},
        {"account": "accounts_receivable", "debit": 0, "credit": 20_000},
    ]
    row = await fetchrow(settings, "SELECT * FROM invoices WHERE id = 'in_1001'")
    assert row is not None
    assert row["total"] - row["amount_paid"] - row["pre_payment_credited"] == 80_000


async def test_credit_for_all_that_remains_marks_invoice_paid_and_publishes_invoice_paid(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings)
    await issue(kafka, settings, amount=100_000)

    [paid] = await kafka.expect(settings.topics.invoice_events, "invoice.paid")
    [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    assert paid.event["data"] == {"invoice_id": "in_1001", "paid_by": "credit_note",
                                  "credit_note_id": issued.event["data"]["id"],
                                  "amount_remaining": 0}
    row = await fetchrow(settings, "SELECT status FROM invoices WHERE id = 'in_1001'")
    assert row is not None and row["status"] == "paid"


async def test_paid_invoice_credit_split_requests_one_refund_of_the_refund_part(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[{"id": "il_1", "quantity": 1, "unit_amount": 500}],
                   status="paid", amount_paid=500)
    await issue(kafka, settings, amount=500, refund_amount=200, credit_amount=100,
                out_of_band_amount=200)

    [refund] = await kafka.expect(settings.topics.refund_requests, "refund.requested")
    [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    assert refund.event["data"]["amount"] == 200
    assert refund.event["data"]["currency"] == "usd"
    assert refund.event["data"]["credit_note_id"] == issued.event["data"]["id"]
    note = issued.event["data"]
    assert (note["refund_amount"], note["credit_amount"], note["out_of_band_amount"]) == (
        200, 100, 200)
    await kafka.settle()
    assert len(kafka.on(settings.topics.refund_requests)) == 1


async def test_credit_that_crosses_the_total_is_rejected_and_changes_nothing(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[{"id": "il_1", "quantity": 1, "unit_amount": 10_000}])
    await issue(kafka, settings, amount=6_000)
    await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    rejected_command = await issue(kafka, settings, amount=5_000)

    [rejected] = await kafka.expect(settings.topics.credit_note_events, "credit_note.rejected")
    assert rejected.event["data"]["reason"] == "exceeds_creditable_amount"
    assert rejected.event["data"]["trigger"]["id"] == rejected_command["id"]
    assert rejected.event["data"]["invoice_id"] == "in_1001"
    row = await fetchrow(settings, "SELECT pre_payment_credited, credit_note_count "
                                   "FROM invoices WHERE id = 'in_1001'")
    assert row is not None and (row["pre_payment_credited"], row["credit_note_count"]) == (6_000, 1)
    assert len(await fetch(settings, "SELECT 1 FROM credit_notes")) == 1


async def test_void_restores_amount_due_and_a_second_void_is_rejected(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[{"id": "il_1", "quantity": 1, "unit_amount": 10_000}])
    await issue(kafka, settings, amount=3_000)
    [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    note_id = issued.event["data"]["id"]
    for _ in range(2):
        await kafka.publish(settings.topics.credit_note_commands,
                            cloudevent("credit_note.void", {"credit_note_id": note_id}),
                            key="in_1001")

    [voided] = await kafka.expect(settings.topics.credit_note_events, "credit_note.voided")
    [rejected] = await kafka.expect(settings.topics.credit_note_events, "credit_note.rejected")
    assert voided.event["data"]["invoice"] == {"amount_remaining": 10_000, "status": "open"}
    assert voided.event["data"]["number"] == "ACME-1001-CN-01"
    assert voided.event["data"]["journal"] == [
        {"account": "contra_revenue", "debit": 0, "credit": 3_000},
        {"account": "accounts_receivable", "debit": 3_000, "credit": 0},
    ]
    assert rejected.event["data"]["reason"] == "already_void"
    row = await fetchrow(settings, "SELECT status FROM credit_notes WHERE id = $1", note_id)
    assert row is not None and row["status"] == "void"


async def test_void_on_a_paid_invoice_is_rejected(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[{"id": "il_1", "quantity": 1, "unit_amount": 10_000}],
                   status="paid", amount_paid=10_000)
    await issue(kafka, settings, amount=1_000)
    [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    await kafka.publish(settings.topics.credit_note_commands,
                        cloudevent("credit_note.void", {"credit_note_id": issued.event["data"]["id"]}),
                        key="in_1001")

    [rejected] = await kafka.expect(settings.topics.credit_note_events, "credit_note.rejected")
    assert rejected.event["data"]["reason"] == "not_voidable"


async def test_three_unit_credits_sum_to_the_line_exactly_and_arrive_in_order(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[
        {"id": "il_1", "quantity": 3, "unit_amount": 3_333, "tax_rate_bps": 2_000}], total=11_999)
    for _ in range(3):
        await issue(kafka, settings, lines=[
            {"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 1}])

    issued = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued", count=3)
    assert len({record.partition for record in issued}) == 1
    issued.sort(key=lambda record: record.offset)
    figures = [(r.event["data"]["number"], r.event["data"]["subtotal"], r.event["data"]["tax"])
               for r in issued]
    assert figures == [("ACME-1001-CN-01", 3_333, 667), ("ACME-1001-CN-02", 3_333, 667),
                       ("ACME-1001-CN-03", 3_333, 666)]
    assert issued[-1].event["data"]["invoice"] == {"amount_remaining": 0, "status": "paid"}


async def test_the_same_event_delivered_again_has_exactly_one_effect(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings)
    for _ in range(3):
        await issue(kafka, settings, event_id="cmd-twice", amount=1_000)
    await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    await kafka.settle(2.0)

    assert len(kafka.on(settings.topics.credit_note_events)) == 1
    assert len(await fetch(settings, "SELECT 1 FROM credit_notes")) == 1
    row = await fetchrow(settings, "SELECT pre_payment_credited FROM invoices")
    assert row is not None and row["pre_payment_credited"] == 1_000
    [ledger] = await fetch(settings, "SELECT * FROM processed_messages WHERE id = 'cmd-twice'")
    assert ledger["outcome"] == "applied"


async def test_payment_makes_cash_refundable_and_a_later_credit_refunds_it(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[{"id": "il_1", "quantity": 1, "unit_amount": 10_000}])
    await kafka.publish(settings.topics.invoices, cloudevent(
        "invoice.payment_succeeded", {"invoice_id": "in_1001", "amount": 10_000, "currency": "usd"}))
    # the payment and the command travel on different topics (read by different consumers):
    # the command goes out only once the payment is applied, or it could meet an unpaid invoice
    deadline = time.monotonic() + 30
    while await fetchrow(settings, "SELECT 1 FROM invoices WHERE amount_paid = 10000") is None:
        assert time.monotonic() < deadline, "the payment was never applied"
        await asyncio.sleep(0.05)
    await issue(kafka, settings, amount=4_000, refund_amount=4_000)

    [refund] = await kafka.expect(settings.topics.refund_requests, "refund.requested")
    assert refund.event["data"]["amount"] == 4_000
    row = await fetchrow(settings, "SELECT status, amount_paid, refunded FROM invoices")
    assert row is not None
    assert (row["status"], row["amount_paid"], row["refunded"]) == ("paid", 10_000, 4_000)


async def test_a_command_that_arrives_before_its_invoice_is_applied_once_the_invoice_arrives(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await issue(kafka, settings, amount=2_000)
    await finalize(kafka, settings)

    [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    assert issued.event["data"]["invoice"]["amount_remaining"] == 98_000
    assert kafka.on(f"{settings.topics.credit_note_commands}.dlq") == []


async def test_binary_mode_cloudevents_are_accepted(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings)
    await kafka.publish(
        settings.topics.credit_note_commands, b'{"invoice_id": "in_1001", "amount": 1500}',
        key="in_1001",
        headers=[("ce_specversion", b"1.0"), ("ce_id", b"bin-1"), ("ce_source", b"/tests"),
                 ("ce_type", b"credit_note.issue"), ("content-type", b"application/json")])

    [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    assert issued.event["data"]["total"] == 1_500
    assert issued.event["data"]["trigger"]["id"] == "bin-1"


async def test_every_outbox_row_is_marked_published_after_the_broker_took_it(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings)
    await issue(kafka, settings, amount=100_000)
    await kafka.expect(settings.topics.invoice_events, "invoice.paid")
    await kafka.settle(1.0)

    rows = await fetch(settings, "SELECT type, published_at FROM outbox ORDER BY seq")
    assert [row["type"] for row in rows] == ["credit_note.issued", "invoice.paid"]
    assert all(row["published_at"] is not None for row in rows)
    published_ids = {r.event["id"] for r in kafka.records}
    assert published_ids == {row["event_id"] for row in
                             await fetch(settings, "SELECT event_id FROM outbox")}


async def test_metrics_count_outcomes_per_topic_and_reason(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[{"id": "il_1", "quantity": 1, "unit_amount": 10_000}])
    await issue(kafka, settings, amount=6_000)
    await issue(kafka, settings, amount=5_000)
    await kafka.publish(settings.topics.credit_note_commands, b"not json", key="in_1001")
    await kafka.expect(settings.topics.credit_note_events, "credit_note.rejected")
    await kafka.expect(f"{settings.topics.credit_note_commands}.dlq")

    reader, writer = await asyncio.open_connection("127.0.0.1", service.service.http_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    commands = settings.topics.credit_note_commands
    assert (f'creditnotes_messages_processed_total{{outcome="applied",reason="",topic="{commands}"}} '
            "1.0") in text
    assert ('creditnotes_messages_processed_total{outcome="rejected",'
            f'reason="exceeds_creditable_amount",topic="{commands}"}} 1.0') in text
    assert ('creditnotes_messages_processed_total{outcome="dead_lettered",'
            f'reason="invalid_message",topic="{commands}"}} 1.0') in text
    assert f'creditnotes_processing_seconds_count{{topic="{commands}"}}' in text
    assert "creditnotes_outbox_backlog" in text
    assert "creditnotes_consumer_lag{" in text


async def test_logs_name_the_event_invoice_and_credit_note_but_never_the_payload(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    with structlog.testing.capture_logs() as logs:
        await finalize(kafka, settings)
        await issue(kafka, settings, event_id="cmd-logged", amount=1_000,
                    memo="customer Jane Doe, card ending 4242")
        [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")

    [line] = [entry for entry in logs if entry.get("event_id") == "cmd-logged"]
    assert line["event"] == "message processed"
    assert (line["invoice_id"], line["credit_note_id"], line["outcome"]) == (
        "in_1001", issued.event["data"]["id"], "applied")
    assert "Jane Doe" not in repr(logs)
