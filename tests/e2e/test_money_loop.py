"""Worked examples 15 to 18 of docs/rules.md through the wire, on real servers.

The service runs on a real PostgreSQL and a real Kafka-protocol broker. The
examples go in as upstream would send them: ``creditnotes demo``'s examples 15
to 18 publish the invoices, payments and commands as CloudEvents, and, for
example 16, the refund outcomes on ``refund-results`` with the refund ids they
read from ``refund-requests``, as a payment system would. Then this test reads
every output topic from the beginning, as a downstream consumer does, and
checks what is there to the minor unit, on its own: the demo's verdict is not
taken on trust.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from service.devtools.demo import run_demo
from service.settings import Settings
from tests.support import Kafka, Record, RunningService, creditnotes, fetchrow

pytestmark = pytest.mark.e2e

EXAMPLES = frozenset({"Example 15", "Example 16", "Example 17", "Example 18"})


def of_invoice(records: list[Record], key: str) -> list[dict[str, Any]]:
    """The ``data`` of the events about the demo's invoice ``in_<key>_<run>``, in order."""
    return [record.event["data"] for record in records
            if str(record.event["data"].get("invoice_id", "")).startswith(f"in_{key}_")]


def journal(*lines: tuple[str, int, int]) -> list[dict[str, Any]]:
    return [{"account": account, "debit": debit, "credit": credit}
            for account, debit, credit in lines]


async def test_examples_15_to_18_as_a_downstream_consumer_sees_them(
        settings: Settings, service: RunningService, kafka: Kafka) -> None:
    output = io.StringIO()
    matched = await run_demo(settings, Console(file=output, width=250), timeout_s=60,
                             only=EXAMPLES)
    assert matched, output.getvalue()
    assert "every example matched docs/rules.md" in output.getvalue()

    topics = settings.topics
    await kafka.settle(3)  # everything published by now, and nothing more coming
    issued = kafka.on(topics.credit_note_events, "credit_note.issued")
    requested = kafka.on(topics.refund_requests, "refund.requested")
    balance = kafka.on(topics.customer_balance_events, "customer_balance.credited")

    # 15: 70.00 refunded newest payment first: 40.00 on pay_2, 30.00 on pay_1, both pending
    first, later = of_invoice(issued, "15")
    assert (first["total"], first["refund_amount"], first["refund_status"]) == (7_000, 7_000,
                                                                                "pending")
    refunds_15 = [data for data in of_invoice(requested, "15")
                  if data["credit_note_id"] == first["id"]]
    assert [(r["payment_id"], r["amount"], r["currency"]) for r in refunds_15] == [
        ("pay_2", 4_000, "usd"), ("pay_1", 3_000, "usd")]
    assert len({r["id"] for r in refunds_15}) == 2
    assert all(r["id"].startswith("rf_") for r in refunds_15)
    assert [(r["refund_id"], r["payment_id"], r["amount"], r["status"], r["linked"])
            for r in first["refunds"]] == [(r["id"], r["payment_id"], r["amount"], "pending", False)
                                           for r in refunds_15]
    on_pay_2, on_pay_1 = (r["id"] for r in refunds_15)

    # 16: pay_2's refund failed, to the customer balance; pay_1's succeeded
    failed = [record.event["data"] for record in
              kafka.on(topics.credit_note_events, "credit_note.refund_failed")]
    succeeded = [record.event["data"] for record in
                 kafka.on(topics.credit_note_events, "credit_note.refund_succeeded")]
    assert [(f["refund_id"], f["payment_id"], f["amount"], f["resettled_to"], f["refund_status"])
            for f in failed] == [(on_pay_2, "pay_2", 4_000, "customer_balance", "pending")]
    assert failed[0]["journal"] == journal(("refunds_payable", 4_000, 0),
                                           ("customer_credit_balance", 0, 4_000))
    assert [(s["refund_id"], s["payment_id"], s["amount"], s["refund_status"])
            for s in succeeded] == [(on_pay_1, "pay_1", 3_000, "partially_failed")]
    assert succeeded[0]["journal"] == journal(("refunds_payable", 3_000, 0), ("cash", 0, 3_000))
    credits_15 = [record for record in balance
                  if record.event["data"]["invoice_id"].startswith("in_15_")]
    assert [(r.event["data"]["reason"], r.event["data"]["amount"], r.event["data"].get("refund_id"))
            for r in credits_15] == [("refund_failed", 4_000, on_pay_2)]
    assert credits_15[0].key == b"cus_15"  # keyed by customer, not invoice
    # ... and the failed 40.00 is refundable again: the later 30.00 goes back to pay_2
    assert (later["refund_amount"], later["refund_status"]) == (3_000, "pending")
    assert [(r["payment_id"], r["amount"]) for r in of_invoice(requested, "15")
            if r["credit_note_id"] == later["id"]] == [("pay_2", 3_000)]

    # 17: a linked refund: succeeded at once, nothing requested; linking it again is rejected
    (linked,) = of_invoice(issued, "17")
    assert (linked["refund_amount"], linked["refund_status"]) == (2_000, "succeeded")
    assert [(r["payment_id"], r["amount"], r["status"], r["linked"])
            for r in linked["refunds"]] == [(None, 2_000, "succeeded", True)]
    assert linked["refunds"][0]["refund_id"].startswith("re_1_")
    assert of_invoice(requested, "17") == []
    rejected = of_invoice(kafka.on(topics.credit_note_events, "credit_note.rejected"), "17")
    assert [r["reason"] for r in rejected] == ["refund_already_linked"]

    # 18: a payment of 100.00 on 70.00 left: 70.00 applied, paid, 30.00 to the balance
    credits_18 = [record for record in balance
                  if record.event["data"]["invoice_id"].startswith("in_18_")]
    assert [(r.event["data"]["reason"], r.event["data"]["amount"], r.event["data"]["payment_id"],
             r.key) for r in credits_18] == [("overpayment", 3_000, "pay_1", b"cus_18")]
    invoice_18 = await fetchrow(settings, "SELECT amount_paid, status FROM invoices WHERE id = $1",
                                credits_18[0].event["data"]["invoice_id"])
    assert invoice_18 is not None
    assert (invoice_18["amount_paid"], invoice_18["status"]) == (7_000, "paid")
    assert of_invoice(kafka.on(topics.invoice_events), "18") == []  # a payment publishes no paid

    # nothing dead-lettered, every event once, and every invariant holds
    for topic in topics.inputs():
        assert kafka.on(f"{topic}.dlq") == [], topic
    ids = [record.event["id"] for record in kafka.records if not record.topic.endswith(".dlq")]
    assert len(ids) == len(set(ids))
    verified = await creditnotes(settings, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
