"""``creditnotes preview`` and ``creditnotes invoice show`` as an operator runs them."""

from __future__ import annotations

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
    assert len(await fetch(settings, "SELECT 1 FROM outbox")) == 1


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
