"""``creditnotes preview`` and ``creditnotes invoice show`` as an operator runs them."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.settings import Settings
from tests.support import Kafka, RunningService, cloudevent, creditnotes, fetch, invoice_data

pytestmark = pytest.mark.e2e


async def test_preview_shows_the_credit_note_a_command_would_make_and_saves_nothing(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await kafka.publish(settings.topics.invoices, cloudevent("invoice.finalized", invoice_data(
        "in_1001", lines=[{"id": "il_1", "quantity": 3, "unit_amount": 3_333,
                           "tax_rate_bps": 2_000}], status="paid", amount_paid=11_999)))
    await kafka.publish(settings.topics.credit_note_commands, cloudevent(
        "credit_note.issue", {"invoice_id": "in_1001", "amount": 100}))
    await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    outbox = await fetch(settings, "SELECT event_id FROM outbox ORDER BY seq")  # issued, and the balance's

    lines = json.dumps({"lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1",
                                   "quantity": 1}], "refund_amount": 4_000})
    shown = await creditnotes(settings, "preview", "in_1001", "--data", lines)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "ACME-1001-CN-02" in shown.stdout
    assert "40.00 USD" in shown.stdout  # the refund, in major units with its currency
    assert "refunds_payable" in shown.stdout
    assert "refund.requested" in shown.stdout  # events named as consumers see them

    too_much = await creditnotes(settings, "preview", "in_1001", "--amount", "999999")
    assert too_much.returncode == 1
    assert "exceeds_creditable_amount" in too_much.stdout

    assert len(await fetch(settings, "SELECT 1 FROM credit_notes")) == 1
    assert await fetch(settings, "SELECT event_id FROM outbox ORDER BY seq") == outbox


async def test_invoice_show_lists_the_invoice_its_credit_notes_and_events(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await kafka.publish(settings.topics.invoices, cloudevent("invoice.finalized", invoice_data(
        "in_1001", lines=[{"id": "il_1", "quantity": 1, "unit_amount": 10_000}])))
    await kafka.publish(settings.topics.credit_note_commands, cloudevent(
        "credit_note.issue", {"invoice_id": "in_1001", "amount": 10_000}))
    await kafka.expect(settings.topics.invoice_events, "invoice.paid")
    await kafka.settle(0.5)

    shown = await creditnotes(settings, "invoice", "show", "in_1001")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    for expected in ("Invoice in_1001", "ACME-1001-CN-01", "pre_payment", "credit_note.issued",
                     "invoice.paid", "paid", "100.00 USD"):
        assert expected in shown.stdout
    missing = await creditnotes(settings, "invoice", "show", "in_nope")
    assert missing.returncode == 1


def _row(output: str, first: str, *cells: str) -> str:
    """The one table row of ``output`` whose first cell is ``first`` and that holds ``cells``."""
    [line] = [line for line in output.splitlines()
              if line.strip().startswith(f"│ {first} ") and all(cell in line for cell in cells)]
    return line


async def test_invoice_show_lists_payments_refunds_and_each_credit_notes_refund_status(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    topics = settings.topics
    await kafka.publish(topics.invoices, cloudevent("invoice.finalized", invoice_data(
        "in_1001", lines=[{"id": "il_1", "quantity": 1, "unit_amount": 10_000}])))
    for payment_id, amount in (("pay_1", 6_000), ("pay_2", 4_000)):  # docs/rules.md example 15
        await kafka.publish(topics.invoices, cloudevent("invoice.payment_succeeded", {
            "invoice_id": "in_1001", "amount": amount, "currency": "usd",
            "payment_id": payment_id}))
    await _until(settings, "SELECT 1 FROM invoices WHERE id = 'in_1001' AND status = 'paid'")
    await kafka.publish(topics.credit_note_commands, cloudevent(
        "credit_note.issue", {"invoice_id": "in_1001", "amount": 7_000, "refund_amount": 7_000}))
    requested = {r.event["data"]["payment_id"]: r.event["data"]["id"] for r in await kafka.expect(
        topics.refund_requests, "refund.requested", count=2)}
    for type_, payment_id in (("refund.failed", "pay_2"), ("refund.succeeded", "pay_1")):
        await kafka.publish(topics.refund_results, cloudevent(type_, {
            "refund_id": requested[payment_id], "invoice_id": "in_1001"}))
    await kafka.expect(topics.credit_note_events, "credit_note.refund_succeeded")
    await kafka.settle(0.5)

    shown = await creditnotes(settings, "invoice", "show", "in_1001")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = shown.stdout
    # payments: id, amount, applied, what of it is refunded (a failed refund gave its cash back)
    assert _row(out, "pay_1", "60.00 USD", "30.00 USD")
    assert _row(out, "pay_2", "40.00 USD", "0.00 USD")
    # refunds: id, credit note, payment, amount, status, linked
    for payment_id, amount, status in (("pay_2", "40.00 USD", "failed"),
                                       ("pay_1", "30.00 USD", "succeeded")):
        row = _row(out, requested[payment_id])
        assert all(cell in row for cell in ("ACME-1001-CN-01", payment_id, amount, status, "no"))
    assert "settled to customer_balance" in _row(out, requested["pay_2"])
    assert "partially_failed" in _row(out, "ACME-1001-CN-01", "70.00 USD")  # refund status
    assert _row(out, "customer_balance.credited", "40.00 USD", "refund_failed")  # by customer
    for type_ in ("credit_note.refund_failed", "credit_note.refund_succeeded"):
        assert type_ in out


async def test_preview_shows_the_refund_allocation_per_payment_newest_first(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    topics = settings.topics
    await kafka.publish(topics.invoices, cloudevent("invoice.finalized", invoice_data(
        "in_1001", lines=[{"id": "il_1", "quantity": 1, "unit_amount": 10_000}],
        amount_paid=4_000)))  # open, 40.00 paid at finalization
    await kafka.publish(topics.invoices, cloudevent("invoice.payment_succeeded", {
        "invoice_id": "in_1001", "amount": 6_000, "currency": "usd", "payment_id": "pay_9"}))
    await _until(settings, "SELECT 1 FROM invoices WHERE id = 'in_1001' AND status = 'paid'")

    shown = await creditnotes(settings, "preview", "in_1001", "--amount", "8000", "--refund",
                              "8000")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = shown.stdout
    assert "refund allocation (80.00 USD)" in out
    # newest first: all of pay_9, then 20.00 of what was paid at finalization
    assert _row(out, "pay_9", "60.00 USD", "0.00 USD", "no", "pending")
    assert _row(out, "at finalization", "40.00 USD", "20.00 USD", "pending")
    linked = await creditnotes(settings, "preview", "in_1001", "--data", json.dumps(
        {"amount": 1_000, "refunds": [{"refund_id": "re_1", "amount": 1_000}]}))
    assert linked.returncode == 0, linked.stdout + linked.stderr
    assert _row(linked.stdout, "pay_9", "re_1", "10.00 USD", "yes", "succeeded")
    assert len(await fetch(settings, "SELECT 1 FROM refunds")) == 0  # nothing saved


async def _until(settings: Settings, query: str, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await fetch(settings, query):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {query}"
        await asyncio.sleep(0.1)
