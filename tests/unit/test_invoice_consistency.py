"""An invoice's status and amounts agree (docs/rules.md, Invoices; issue 9 finding 4b).

``paid`` without ``amount_paid`` was paid in full; ``paid`` with another amount,
or any amount above the amount due, is ``invoice_inconsistent`` (dead-lettered);
``open`` with nothing left to pay is recorded as ``paid``.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain import errors
from service.domain.commands import FinalizeInvoice
from service.domain.invoice import Invoice, InvoiceStatus, finalize_invoice
from service.entrypoints import translators, wire
from service.settings import Settings

from .builders import invoice, issue, line

LINES = [{"id": "L1", "quantity": 1, "unit_amount": 10_000, "tax_rate_bps": 2_000}]  # 120.00


def finalized(**fields: Any) -> Invoice:
    """The invoice the service records from an ``invoice.finalized`` with these fields."""
    event = wire.CloudEvent.model_validate({
        "specversion": "1.0", "id": "ev-1", "source": "/billing", "type": "invoice.finalized",
        "data": {"invoice": {"id": "in_1", "number": "ACME-1", "customer_id": "cus_1",
                             "currency": "usd", "lines": LINES, **fields}}})
    command = translators.translate(event, "invoices",
                                    translators.routes(Settings(_env_file=None)))  # type: ignore[call-arg]
    assert isinstance(command, FinalizeInvoice)
    return finalize_invoice(command)


def test_a_paid_invoice_without_amount_paid_was_paid_in_full() -> None:
    inv = finalized(status="paid")
    assert (inv.status, inv.amount_paid, inv.amount_remaining) == (InvoiceStatus.PAID, 12_000, 0)
    assert inv.refundable == 12_000


def test_a_paid_invoice_with_balance_applied_was_paid_the_amount_due() -> None:
    inv = finalized(status="paid", customer_balance_applied=2_000)
    assert (inv.amount_paid, inv.amount_remaining) == (10_000, 0)


def test_an_sla_credit_on_a_paid_invoice_without_amount_paid_does_not_reduce_a_receivable() -> None:
    inv = finalized(status="paid")
    note = issue(inv, amount=1_200)
    assert note.pre_payment_amount == 0
    assert note.credit_amount == 1_200


@pytest.mark.parametrize("fields", [
    pytest.param({"status": "paid", "amount_paid": 0}, id="paid-nothing"),
    pytest.param({"status": "paid", "amount_paid": 11_999}, id="paid-less"),
    pytest.param({"status": "paid", "amount_paid": 12_001}, id="paid-more"),
    pytest.param({"status": "open", "amount_paid": 12_001}, id="open-paid-more"),
    pytest.param({"status": "uncollectible", "amount_paid": 12_001}, id="uncollectible-paid-more"),
    pytest.param({"status": "paid", "customer_balance_applied": 2_000, "amount_paid": 12_000},
                 id="paid-more-than-due-after-balance"),
])
def test_status_and_amounts_that_disagree_are_refused_as_invoice_inconsistent(
        fields: dict[str, Any]) -> None:
    with pytest.raises(errors.InvoiceInconsistent) as refused:
        finalized(**fields)
    assert refused.value.code == "invoice_inconsistent"
    assert isinstance(refused.value, errors.Undeliverable)  # dead-lettered, not retried
    assert not refused.value.retryable
    assert "12" not in refused.value.message  # no amounts in dead-letter headers


def test_an_open_invoice_with_nothing_left_to_pay_is_recorded_as_paid() -> None:
    assert finalized(status="open", amount_paid=12_000).status is InvoiceStatus.PAID
    assert finalized(status="open", customer_balance_applied=12_000).status is InvoiceStatus.PAID


def test_an_open_invoice_without_amount_paid_owes_everything() -> None:
    inv = finalized(status="open")
    assert (inv.status, inv.amount_paid, inv.amount_remaining) == (InvoiceStatus.OPEN, 0, 12_000)


def test_an_uncollectible_invoice_without_amount_paid_paid_nothing() -> None:
    inv = finalized(status="uncollectible", amount_paid=None)
    assert (inv.status, inv.amount_paid) == (InvoiceStatus.UNCOLLECTIBLE, 0)


@settings(max_examples=200, deadline=None, database=None)
@given(status=st.sampled_from(["open", "paid", "uncollectible"]),
       unit=st.integers(0, 10**6), balance_share=st.integers(0, 100),
       paid=st.none() | st.integers(0, 2 * 10**6))
def test_every_accepted_invoice_has_status_and_amounts_that_agree(
        status: str, unit: int, balance_share: int, paid: int | None) -> None:
    total = unit
    balance = total * balance_share // 100
    try:
        inv = invoice(lines=[line("L1", unit_amount=unit)], status=status,
                      customer_balance_applied=balance,
                      amount_paid=paid)  # type: ignore[arg-type]
    except errors.InvoiceInconsistent:
        assert paid is not None
        assert paid > total - balance or (status == "paid" and paid != total - balance)
        return
    assert 0 <= inv.amount_paid <= inv.amount_due
    assert inv.amount_remaining >= 0
    if inv.status is InvoiceStatus.PAID:
        assert inv.amount_remaining == 0
    if inv.status is InvoiceStatus.OPEN:
        assert inv.amount_remaining > 0
