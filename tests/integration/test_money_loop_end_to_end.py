"""The money loop on the real broker and PostgreSQL (issue 12): payments, refunds and their
outcomes, linked refunds, the customer balance, edits and dates, through the wire.

Worked examples 15 to 18 of docs/rules.md, and the races and repeats the wire allows: an
outcome before its credit note's transaction is visible, the same outcome twice, the
opposite outcome, an unknown refund, a payment racing a credit note that pays the invoice.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.domain.commands import Trigger
from service.domain.credit_note import derived_id
from service.domain.refunds import PaymentCash, refund_id_for
from service.settings import Settings
from tests.integration.test_health_and_shutdown import http_get
from tests.support import (
    SOURCE,
    Kafka,
    Record,
    RunningService,
    cloudevent,
    fetch,
    fetchrow,
    invoice_data,
)

pytestmark = pytest.mark.integration

ONE_LINE = [{"id": "il_1", "description": "Plan", "quantity": 1, "unit_amount": 10_000}]


async def finalize(kafka: Kafka, settings: Settings, invoice_id: str = "in_1001", *,
                   total: int = 10_000, **invoice: Any) -> None:
    lines = [{**ONE_LINE[0], "unit_amount": total}]
    await kafka.publish(settings.topics.invoices, cloudevent(
        "invoice.finalized", invoice_data(invoice_id, lines=lines, **invoice),
        id_=f"fin-{invoice_id}"))


async def pay(kafka: Kafka, settings: Settings, amount: int, payment_id: str | None,
              invoice_id: str = "in_1001", event_id: str | None = None) -> None:
    data: dict[str, Any] = {"invoice_id": invoice_id, "amount": amount, "currency": "usd"}
    if payment_id is not None:
        data["payment_id"] = payment_id
    await kafka.publish(settings.topics.invoices,
                        cloudevent("invoice.payment_succeeded", data, id_=event_id))


async def issue(kafka: Kafka, settings: Settings, event_id: str, invoice_id: str = "in_1001",
                **data: Any) -> None:
    await kafka.publish(settings.topics.credit_note_commands, cloudevent(
        "credit_note.issue", {"invoice_id": invoice_id, **data}, id_=event_id))


async def outcome(kafka: Kafka, settings: Settings, refund_id: str, *, succeeded: bool,
                  event_id: str | None = None, invoice_id: str = "in_1001",
                  **data: Any) -> None:
    type_ = "refund.succeeded" if succeeded else "refund.failed"
    await kafka.publish(settings.topics.refund_results, cloudevent(
        type_, {"refund_id": refund_id, "invoice_id": invoice_id, **data},
        source="/payments/refunds", id_=event_id))


async def amount_paid_reaches(settings: Settings, kafka: Kafka, amount: int,
                              invoice_id: str = "in_1001") -> None:
    async def reached() -> bool:
        row = await fetchrow(settings, "SELECT amount_paid FROM invoices WHERE id = $1",
                             invoice_id)
        return row is not None and row["amount_paid"] == amount
    for _ in range(300):
        if await reached():
            return
        await kafka.settle(0.1)
    raise AssertionError(f"amount_paid of {invoice_id} never reached {amount}")


def data(records: list[Record]) -> list[dict[str, Any]]:
    return [record.event["data"] for record in records]


def dead_letters(kafka: Kafka, settings: Settings) -> list[tuple[str, str]]:
    return [(topic, record.headers["dlq.error.reason"].decode())
            for topic in settings.topics.inputs() for record in kafka.on(f"{topic}.dlq")]


async def samples(service: RunningService, wanted: set[str]) -> dict[str, float]:
    """The ``/metrics`` samples named in ``wanted`` (``name{labels}``), once the scrape cache
    has expired."""
    await asyncio.sleep(service.settings.readiness_cache_seconds + 0.1)
    assert service.service.http_port is not None
    status, text = await http_get(service.service.http_port, "/metrics")
    assert status == 200
    found = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    return {name: float(found.get(name, "0")) for name in wanted}


def refund_at_finalization(command_id: str) -> str:
    """The id of the refund a credit note of ``command_id`` requests on the payment recorded at
    finalization (the service derives it the same way, so a test can know it in advance)."""
    note = derived_id("cn", Trigger(SOURCE, command_id, "credit_note.issue"))
    return refund_id_for(note, PaymentCash(0, None, 1))


async def test_examples_15_and_16_refunds_newest_payment_first_and_their_outcomes(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    topics = settings.topics
    await finalize(kafka, settings)
    await pay(kafka, settings, 6_000, "pay_1")
    await pay(kafka, settings, 4_000, "pay_2")
    await amount_paid_reaches(settings, kafka, 10_000)
    await issue(kafka, settings, "c-70", amount=7_000, refund_amount=7_000)

    requested = data(await kafka.expect(topics.refund_requests, "refund.requested", count=2))
    assert [(r["payment_id"], r["amount"]) for r in requested] == [("pay_2", 4_000),
                                                                  ("pay_1", 3_000)]
    [issued] = data(await kafka.expect(topics.credit_note_events, "credit_note.issued"))
    assert issued["refund_status"] == "pending"
    assert [(r["refund_id"], r["status"], r["linked"]) for r in issued["refunds"]] == [
        (r["id"], "pending", False) for r in requested]
    on_pay_2, on_pay_1 = (r["id"] for r in requested)
    assert await samples(service, {"creditnotes_refunds_pending",
                                   "creditnotes_refunds_requested_total"}) == {
        "creditnotes_refunds_pending": 2, "creditnotes_refunds_requested_total": 2}

    # example 16: pay_2's refund fails, pay_1's succeeds
    await outcome(kafka, settings, on_pay_2, succeeded=False, failure_reason="card expired",
                  event_id="rr-1")
    [failed] = data(await kafka.expect(topics.credit_note_events, "credit_note.refund_failed"))
    [balance] = await kafka.expect(topics.customer_balance_events, "customer_balance.credited")
    assert (failed["refund_id"], failed["amount"], failed["resettled_to"]) == (
        on_pay_2, 4_000, "customer_balance")
    assert failed["journal"] == [
        {"account": "refunds_payable", "debit": 4_000, "credit": 0},
        {"account": "customer_credit_balance", "debit": 0, "credit": 4_000}]
    assert balance.key == b"cus_42"
    assert {key: balance.event["data"][key] for key in ("amount", "reason", "refund_id")} == {
        "amount": 4_000, "reason": "refund_failed", "refund_id": on_pay_2}
    await outcome(kafka, settings, on_pay_1, succeeded=True, event_id="rr-2")
    [succeeded] = data(await kafka.expect(topics.credit_note_events,
                                          "credit_note.refund_succeeded"))
    assert succeeded["refund_status"] == "partially_failed"
    assert succeeded["journal"] == [{"account": "refunds_payable", "debit": 3_000, "credit": 0},
                                    {"account": "cash", "debit": 0, "credit": 3_000}]

    # the same outcome again (a new event, and the same event again): no effect;
    # the opposite of a final outcome: dead-lettered for a person, nothing changes
    await outcome(kafka, settings, on_pay_1, succeeded=True, event_id="rr-3")
    await outcome(kafka, settings, on_pay_1, succeeded=True, event_id="rr-2")
    await outcome(kafka, settings, on_pay_1, succeeded=False, event_id="rr-4")
    await outcome(kafka, settings, "rf_nobody_knows", succeeded=True, event_id="rr-5")
    [conflict, unknown] = await kafka.expect(f"{topics.refund_results}.dlq", count=2,
                                             timeout_s=60)
    assert conflict.headers["dlq.error.reason"] == b"refund_state_conflict"
    assert unknown.headers["dlq.error.reason"] == b"refund_not_found"
    await kafka.settle(1.0)
    assert len(kafka.on(topics.credit_note_events, "credit_note.refund_succeeded")) == 1
    assert len(kafka.on(topics.credit_note_events, "credit_note.refund_failed")) == 1
    counted = {f'creditnotes_refund_outcomes_total{{outcome="{name}"}}': count for name, count
               in {"succeeded": 1, "failed": 1, "duplicate": 2, "conflict": 1,
                   "not_found": 1}.items()}
    counted['creditnotes_customer_balance_credited_total{reason="refund_failed"}'] = 1
    counted["creditnotes_refunds_pending"] = 0
    assert await samples(service, set(counted)) == counted
    ledger = {row["id"]: row["outcome"] for row in await fetch(
        settings, "SELECT id, outcome FROM processed_messages WHERE id LIKE 'rr-%'")}
    assert ledger == {"rr-1": "applied", "rr-2": "applied", "rr-3": "duplicate:refund_succeeded",
                      "rr-4": "dead_lettered:refund_state_conflict",
                      "rr-5": "dead_lettered:refund_not_found"}

    # then a credit of 30.00 by refund: 40.00 of pay_2 is refundable again
    await issue(kafka, settings, "c-30", amount=3_000, refund_amount=3_000)
    [*_, again] = data(await kafka.expect(topics.refund_requests, "refund.requested", count=3))
    assert (again["payment_id"], again["amount"]) == ("pay_2", 3_000)
    assert dead_letters(kafka, settings) == [(topics.refund_results, "refund_state_conflict"),
                                             (topics.refund_results, "refund_not_found")]


async def test_examples_17_and_18_a_linked_refund_and_an_overpayment(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    topics = settings.topics
    # 17: a paid 50.00 invoice; 20.00 credited with a refund already made
    await finalize(kafka, settings, "in_17", total=5_000, status="paid", amount_paid=5_000)
    await finalize(kafka, settings, "in_17b", total=5_000, status="paid", amount_paid=5_000)
    linked = [{"refund_id": "re_1", "amount": 2_000}]
    await issue(kafka, settings, "c-17", invoice_id="in_17", amount=2_000, refunds=linked)
    [issued] = data(await kafka.expect(topics.credit_note_events, "credit_note.issued"))
    assert (issued["refund_amount"], issued["refund_status"]) == (2_000, "succeeded")
    assert issued["refunds"] == [{"refund_id": "re_1", "payment_id": None, "amount": 2_000,
                                  "status": "succeeded", "linked": True}]
    await issue(kafka, settings, "c-17b", invoice_id="in_17b", amount=2_000, refunds=linked)
    [rejected] = data(await kafka.expect(topics.credit_note_events, "credit_note.rejected"))
    assert rejected["reason"] == "refund_already_linked"

    # 18: an open 100.00 invoice, 30.00 credited, then a payment of 100.00
    await finalize(kafka, settings, "in_18")
    await issue(kafka, settings, "c-18", invoice_id="in_18", amount=3_000)
    await kafka.expect(topics.credit_note_events, "credit_note.issued", count=2)
    await pay(kafka, settings, 10_000, "pay_18", invoice_id="in_18")
    [balance] = data(await kafka.expect(topics.customer_balance_events,
                                        "customer_balance.credited"))
    assert (balance["amount"], balance["reason"], balance["payment_id"]) == (
        3_000, "overpayment", "pay_18")
    invoice = await fetchrow(settings, "SELECT amount_paid, status FROM invoices"
                                       " WHERE id = 'in_18'")
    assert invoice is not None and (invoice["amount_paid"], invoice["status"]) == (7_000, "paid")
    await kafka.settle(1.0)
    assert kafka.on(topics.refund_requests) == []
    assert dead_letters(kafka, settings) == []


async def test_a_payment_racing_a_credit_that_pays_the_invoice_off_sends_the_rest_to_the_balance(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    topics = settings.topics
    await finalize(kafka, settings)
    await amount_paid_reaches(settings, kafka, 0)
    await asyncio.gather(issue(kafka, settings, "c-all", amount=10_000),
                         pay(kafka, settings, 10_000, "pay_race"))

    [balance] = data(await kafka.expect(topics.customer_balance_events,
                                        "customer_balance.credited"))
    await kafka.settle(1.5)
    # whichever came second: the payment all overpaid, or the credit all post-payment
    assert balance["amount"] == 10_000
    assert balance["reason"] in {"overpayment", "credit_note"}
    assert len(kafka.on(topics.customer_balance_events)) == 1
    invoice = await fetchrow(settings, "SELECT status FROM invoices WHERE id = 'in_1001'")
    assert invoice is not None and invoice["status"] == "paid"
    assert dead_letters(kafka, settings) == []


async def test_an_outcome_before_its_credit_note_is_visible_waits_then_applies(
        settings: Settings, kafka: Kafka) -> None:
    patient = settings.model_copy(update={"not_found_retry_seconds": 30.0})
    topics = patient.topics
    async with RunningService(patient):
        await finalize(kafka, patient, status="paid", amount_paid=10_000)
        await amount_paid_reaches(patient, kafka, 10_000)
        refund_id = refund_at_finalization("c-fast")
        await outcome(kafka, patient, refund_id, succeeded=True, event_id="rr-early")
        await kafka.settle(2.0)  # the outcome is consumed, and waits for its refund
        assert kafka.on(topics.credit_note_events) == []
        await issue(kafka, patient, "c-fast", amount=2_500, refund_amount=2_500)

        [requested] = data(await kafka.expect(topics.refund_requests, "refund.requested"))
        [succeeded] = data(await kafka.expect(topics.credit_note_events,
                                              "credit_note.refund_succeeded", timeout_s=40))
    assert requested["id"] == succeeded["refund_id"] == refund_id
    assert succeeded["refund_status"] == "succeeded"
    assert dead_letters(kafka, patient) == []


async def test_an_update_merges_metadata_even_on_a_void_note_and_a_future_date_is_rejected(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    topics = settings.topics
    await finalize(kafka, settings)
    await issue(kafka, settings, "c-1", amount=1_000, memo="first",
                metadata={"ticket": "T-1", "keep": "yes"})
    [issued] = data(await kafka.expect(topics.credit_note_events, "credit_note.issued"))
    await kafka.publish(topics.credit_note_commands, cloudevent(
        "credit_note.void", {"credit_note_id": issued["id"]}), key="in_1001")
    await kafka.expect(topics.credit_note_events, "credit_note.voided")
    await kafka.publish(topics.credit_note_commands, cloudevent(
        "credit_note.update", {"credit_note_id": issued["id"], "memo": None,
                               "metadata": {"ticket": None, "resolution": "RMA-7"}}),
        key="in_1001")
    [updated] = data(await kafka.expect(topics.credit_note_events, "credit_note.updated"))
    assert (updated["id"], updated["memo"], updated["metadata"]) == (
        issued["id"], None, {"keep": "yes", "resolution": "RMA-7"})
    row = await fetchrow(settings, "SELECT memo, metadata, status, total FROM credit_notes"
                                   " WHERE id = $1", issued["id"])
    assert row is not None
    metadata = row["metadata"] if isinstance(row["metadata"], dict) else json.loads(
        row["metadata"])
    assert (row["memo"], metadata, row["status"], row["total"]) == (
        None, {"keep": "yes", "resolution": "RMA-7"}, "void", 1_000)

    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    await issue(kafka, settings, "c-later", amount=1_000, effective_at=later)
    [rejected] = data(await kafka.expect(topics.credit_note_events, "credit_note.rejected"))
    assert rejected["reason"] == "invalid_effective_at"
    await issue(kafka, settings, "c-back", amount=1_000, effective_at="2026-01-15T00:00:00Z")
    [_, backdated] = data(await kafka.expect(topics.credit_note_events, "credit_note.issued",
                                             count=2))
    assert datetime.fromisoformat(backdated["effective_at"]) == datetime(2026, 1, 15,
                                                                         tzinfo=UTC)
    assert dead_letters(kafka, settings) == []


async def test_one_refund_id_linked_on_two_invoices_at_once_is_linked_once(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    topics = settings.topics
    for invoice_id in ("in_a", "in_b"):
        await finalize(kafka, settings, invoice_id, status="paid", amount_paid=10_000)
    for invoice_id in ("in_a", "in_b"):
        await amount_paid_reaches(settings, kafka, 10_000, invoice_id)
    linked = [{"refund_id": "re_twice", "amount": 1_000}]
    await asyncio.gather(*(issue(kafka, settings, f"c-{invoice_id}", invoice_id=invoice_id,
                                 amount=1_000, refunds=linked) for invoice_id in ("in_a", "in_b")))

    [issued] = data(await kafka.expect(topics.credit_note_events, "credit_note.issued"))
    [rejected] = data(await kafka.expect(topics.credit_note_events, "credit_note.rejected"))
    assert rejected["reason"] == "refund_already_linked"
    assert {issued["invoice_id"], rejected["invoice_id"]} == {"in_a", "in_b"}
    rows = await fetch(settings, "SELECT invoice_id FROM refunds WHERE refund_id = 're_twice'")
    assert [row["invoice_id"] for row in rows] == [issued["invoice_id"]]
    await kafka.settle(1.0)
    assert dead_letters(kafka, settings) == []
