"""The money rules on the real broker and PostgreSQL (issue 9 finding 4, issue 15 finding 4).

Time-based credits over what is left and over uncovered time (examples 13 and
14, and a void that uncovers time), status and amounts that agree
(``invoice_inconsistent``), credit-note numbers unique per invoice (two
invoices numbered DUP-1), policy caps cumulative per invoice and trigger type,
and settlements restricted per trigger topic (``settlement_not_allowed``).
``creditnotes verify`` is clean after each.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from service.adapters.invariants import check_invariants
from service.settings import Settings
from tests.support import Kafka, RunningService, cloudevent, fetch, invoice_data

pytestmark = pytest.mark.integration
OCTOBER = {"start": "2026-10-01T00:00:00Z", "end": "2026-11-01T00:00:00Z"}
PLAN = [{"id": "il_1", "quantity": 10, "unit_amount": 1_000, "period": OCTOBER}]


async def finalize(kafka: Kafka, settings: Settings, invoice_id: str, **invoice: Any) -> None:
    await kafka.publish(settings.topics.invoices,
                        cloudevent("invoice.finalized", invoice_data(invoice_id, **invoice)))


def time_credit(kind: str, invoice_id: str, day: int) -> dict[str, Any]:
    field = "effective_at" if kind == "subscription.downgraded" else "canceled_at"
    return cloudevent(kind, {"invoice_id": invoice_id, "invoice_line_id": "il_1",
                             field: f"2026-10-{day:02d}T00:00:00Z"})


async def quiet_and_verified(kafka: Kafka, settings: Settings) -> None:
    """Every event published (the relay caught up), and every invariant holds."""
    deadline = time.monotonic() + 30
    while await fetch(settings, "SELECT 1 FROM outbox WHERE published_at IS NULL"):
        assert time.monotonic() < deadline, "the relay did not publish every event"
        await kafka.settle(0.2)
    assert await check_invariants(settings.database_url) == []


async def test_examples_13_and_14_and_a_void_that_uncovers_time(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    notes = settings.topics.credit_note_events
    # example 13: 5 of 10 units returned, then cancelled at 16 Oct: 5000 * 16/31
    await finalize(kafka, settings, "in_0013", lines=PLAN)
    await kafka.publish(settings.topics.returns, cloudevent("return.received", {
        "invoice_id": "in_0013", "return_id": "ret-1",
        "lines": [{"invoice_line_id": "il_1", "quantity": 5}]}))
    await kafka.expect(notes, "credit_note.issued", 1)
    await kafka.publish(settings.topics.cancellations,
                        time_credit("subscription.canceled", "in_0013", 16))
    issued = await kafka.expect(notes, "credit_note.issued", 2)
    assert issued[1].event["data"]["total"] == 2_581

    # example 14: a downgrade at 16 Oct, then a cancellation at 21 Oct (nothing), at 11 Oct
    await finalize(kafka, settings, "in_0014", lines=PLAN)
    await kafka.publish(settings.topics.downgrades,
                        time_credit("subscription.downgraded", "in_0014", 16))
    issued = await kafka.expect(notes, "credit_note.issued", 3)
    assert issued[2].event["data"]["total"] == 5_161
    await kafka.publish(settings.topics.cancellations,
                        time_credit("subscription.canceled", "in_0014", 21))
    [rejected] = await kafka.expect(notes, "credit_note.rejected")
    assert rejected.event["data"]["reason"] == "nothing_left_to_credit"
    await kafka.publish(settings.topics.cancellations,
                        time_credit("subscription.canceled", "in_0014", 11))
    issued = await kafka.expect(notes, "credit_note.issued", 4)
    cancelled = issued[3].event["data"]
    assert cancelled["total"] == 1_613
    [line] = await fetch(settings, "SELECT time_credits FROM invoice_lines"
                                   " WHERE invoice_id = 'in_0014'")
    assert [t.day for t in sorted(line["time_credits"])] == [11, 16]

    # voiding the 11 Oct cancellation (pre-payment, open invoice) uncovers [11, 16) again
    await kafka.publish(settings.topics.credit_note_commands, cloudevent(
        "credit_note.void", {"credit_note_id": cancelled["id"]}))
    await kafka.expect(notes, "credit_note.voided")
    await kafka.publish(settings.topics.cancellations,
                        time_credit("subscription.canceled", "in_0014", 11))
    issued = await kafka.expect(notes, "credit_note.issued", 5)
    assert issued[4].event["data"]["total"] == 1_613
    await quiet_and_verified(kafka, settings)


async def test_two_invoices_numbered_dup_1_can_each_be_credited(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    for invoice_id in ("in_2001", "in_2002"):
        await finalize(kafka, settings, invoice_id, number="DUP-1")
        await kafka.publish(settings.topics.credit_note_commands, cloudevent(
            "credit_note.issue", {"invoice_id": invoice_id, "amount": 1_000}))

    issued = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued", 2)
    assert sorted((r.event["data"]["invoice_id"], r.event["data"]["number"]) for r in issued) == [
        ("in_2001", "DUP-1-CN-01"), ("in_2002", "DUP-1-CN-01")]
    await kafka.settle(1.0)
    assert kafka.on(f"{settings.topics.credit_note_commands}.dlq") == []
    assert len(await fetch(settings, "SELECT 1 FROM credit_notes WHERE number = 'DUP-1-CN-01'")) == 2
    await quiet_and_verified(kafka, settings)


async def test_invoice_status_and_amounts_agree(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    lines = [{"id": "il_1", "quantity": 1, "unit_amount": 10_000}]
    await finalize(kafka, settings, "in_3001", lines=lines, status="paid")  # paid in full
    await finalize(kafka, settings, "in_3002", lines=lines, status="paid", amount_paid=4_000)
    await finalize(kafka, settings, "in_3003", lines=lines, status="open", amount_paid=10_000)

    [dead] = await kafka.expect(f"{settings.topics.invoices}.dlq")
    assert dead.headers["dlq.error.reason"] == b"invoice_inconsistent"
    rows = await fetch(settings, "SELECT id, status, amount_paid FROM invoices ORDER BY id")
    assert [tuple(row) for row in rows] == [("in_3001", "paid", 10_000),
                                            ("in_3003", "paid", 10_000)]

    # an SLA credit on the invoice paid in full reduces no receivable: it goes to the balance
    await kafka.publish(settings.topics.sla_breaches, cloudevent(
        "sla.breached", {"invoice_id": "in_3001", "sla_id": "sla-1", "credit_bps": 1_000}))
    [note] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    data = note.event["data"]
    assert (data["pre_payment_amount"], data["credit_amount"], data["type"]) == (
        0, 1_000, "post_payment")
    await quiet_and_verified(kafka, settings)


async def test_policy_caps_are_cumulative_and_settlements_can_be_restricted(
        settings: Settings, kafka: Kafka) -> None:
    strict = settings.model_copy(update={
        "policy_sla_max_credit_bps": 5_000,
        "allowed_settlements_returns": ["customer_balance"]})
    notes = strict.topics.credit_note_events
    async with RunningService(strict):
        await finalize(kafka, strict, "in_4001", status="paid", amount_paid=100_000)
        for sla_id in ("sla-1", "sla-2"):  # each asks for 100% in cash; the cap is 50% in all
            await kafka.publish(strict.topics.sla_breaches, cloudevent("sla.breached", {
                "invoice_id": "in_4001", "sla_id": sla_id, "credit_bps": 10_000,
                "settlement": "refund"}))
        [issued] = await kafka.expect(notes, "credit_note.issued")
        [rejected] = await kafka.expect(notes, "credit_note.rejected")
        assert (issued.event["data"]["total"], issued.event["data"]["refund_amount"]) == (
            50_000, 50_000)
        assert rejected.event["data"]["reason"] == "nothing_left_to_credit"

        # returns may only go to the customer balance: a refund request is rejected
        for settlement in ("refund", None):
            await kafka.publish(strict.topics.returns, cloudevent("return.received", {
                "invoice_id": "in_4001", "return_id": f"ret-{settlement}",
                "lines": [{"invoice_line_id": "il_1", "quantity": 1}],
                **({"settlement": settlement} if settlement else {})}))
        rejections = await kafka.expect(notes, "credit_note.rejected", 2)
        assert rejections[1].event["data"]["reason"] == "settlement_not_allowed"
        issued_notes = await kafka.expect(notes, "credit_note.issued", 2)
        returned = issued_notes[1].event["data"]
        assert (returned["refund_amount"], returned["credit_amount"]) == (0, 50_000)

        refunds = await kafka.expect(strict.topics.refund_requests, "refund.requested")
        await kafka.settle(1.0)
        assert sum(r.event["data"]["amount"] for r in refunds) == 50_000
        assert kafka.on(f"{strict.topics.sla_breaches}.dlq") == []
        await quiet_and_verified(kafka, strict)


async def test_a_later_sla_breach_is_scaled_down_to_what_the_cumulative_cap_still_allows(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    # the cap's running figure is read back from PostgreSQL for the second breach (a sum
    # there is numeric): it must be capped, not dead-lettered processing_failed
    notes = settings.topics.credit_note_events
    assert settings.policy_sla_max_credit_bps == 5_000
    await finalize(kafka, settings, "in_5001", status="paid", amount_paid=100_000)
    await kafka.publish(settings.topics.sla_breaches, cloudevent("sla.breached", {
        "invoice_id": "in_5001", "sla_id": "sla-1", "credit_bps": 1_000,
        "settlement": "refund"}))
    [first] = await kafka.expect(notes, "credit_note.issued")
    assert first.event["data"]["total"] == 10_000
    await quiet_and_verified(kafka, settings)  # committed: the next breach is a later batch

    await kafka.publish(settings.topics.sla_breaches, cloudevent("sla.breached", {
        "invoice_id": "in_5001", "sla_id": "sla-2", "credit_bps": 10_000,
        "settlement": "refund"}))
    issued = await kafka.expect(notes, "credit_note.issued", 2)
    assert (issued[1].event["data"]["total"], issued[1].event["data"]["refund_amount"]) == (
        40_000, 40_000)  # 50% of 1,000.00 less the 100.00 credited before
    refunds = await kafka.expect(settings.topics.refund_requests, "refund.requested", 2)
    assert sum(r.event["data"]["amount"] for r in refunds) == 50_000
    await kafka.settle(1.0)
    assert kafka.on(f"{settings.topics.sla_breaches}.dlq") == []
    await quiet_and_verified(kafka, settings)
