"""Payments as facts: the part up to the amount remaining is applied, the rest is an overpayment.

Worked example 18 of docs/rules.md at the level of the pure rules, and properties: a payment
is never refused for its invoice's state, its applied part and its overpayment add up to
it, and the applied part never takes an invoice below nothing left to pay.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.domain import errors
from service.domain.invoice import InvoiceStatus
from service.domain.payments import (
    Payment,
    Receipt,
    amount_paid,
    apply_payment,
    classify,
    finalization_payment,
    receive,
)
from service.domain.refunds import cash_of, refundable

OPEN, PAID, UNCOLLECTIBLE, VOID = (InvoiceStatus.OPEN, InvoiceStatus.PAID,
                                   InvoiceStatus.UNCOLLECTIBLE, InvoiceStatus.VOID)


# Worked example 18: an open 100.00 invoice, 30.00 credited (70.00 left), then 100.00 paid.

def test_payment_racing_a_credit_note_applies_what_is_left_and_overpays_the_rest() -> None:
    landed = apply_payment(10_000, amount_remaining=7_000, status=OPEN)

    assert (landed.applied, landed.overpayment, landed.settles_invoice) == (7_000, 3_000, True)


def test_overpayment_is_not_refundable_cash() -> None:
    payment, _ = receive([], "pay_1", 10_000, amount_remaining=7_000, status=OPEN)

    assert refundable(cash_of([payment], [])) == 7_000
    assert amount_paid([payment]) == 7_000


def test_partial_payment_applies_whole_and_leaves_the_invoice_open() -> None:
    landed = apply_payment(4_000, amount_remaining=10_000, status=OPEN)

    assert (landed.applied, landed.overpayment, landed.settles_invoice) == (4_000, 0, False)


def test_payment_settling_an_uncollectible_invoice_makes_it_paid() -> None:
    landed = apply_payment(2_500, amount_remaining=2_500, status=UNCOLLECTIBLE)

    assert (landed.applied, landed.overpayment, landed.settles_invoice) == (2_500, 0, True)


def test_payment_on_a_void_invoice_is_all_overpayment() -> None:
    landed = apply_payment(5_000, amount_remaining=5_000, status=VOID)

    assert (landed.applied, landed.overpayment, landed.settles_invoice) == (0, 5_000, False)


def test_payment_on_a_paid_invoice_is_all_overpayment() -> None:
    landed = apply_payment(5_000, amount_remaining=0, status=PAID)

    assert (landed.applied, landed.overpayment, landed.settles_invoice) == (0, 5_000, False)


def test_a_payment_of_nothing_is_invalid() -> None:
    with pytest.raises(errors.InvalidMessage):
        apply_payment(0, amount_remaining=5_000, status=OPEN)


def test_amount_paid_at_finalization_is_the_oldest_payment_with_no_id() -> None:
    first = finalization_payment(6_000)
    assert first == Payment(sequence=0, payment_id=None, amount=6_000, applied=6_000)

    later, _ = receive([first], "pay_2", 1_000, amount_remaining=4_000, status=OPEN)

    assert (later.sequence, later.payment_id) == (1, "pay_2")
    assert first.at_finalization and not later.at_finalization
    assert finalization_payment(0) is None


def test_payments_are_numbered_in_the_order_received() -> None:
    first, _ = receive([], "pay_1", 1_000, amount_remaining=10_000, status=OPEN)
    second, _ = receive([first], None, 1_000, amount_remaining=9_000, status=OPEN)

    assert (first.sequence, second.sequence) == (1, 2)


def test_the_same_payment_id_again_is_a_duplicate_and_another_amount_a_conflict() -> None:
    recorded = [Payment(sequence=1, payment_id="pay_1", amount=6_000, applied=6_000)]

    assert classify(recorded, "pay_1", 6_000) is Receipt.DUPLICATE
    assert classify(recorded, "pay_1", 5_000) is Receipt.CONFLICT
    assert classify(recorded, "pay_2", 6_000) is Receipt.NEW
    assert classify(recorded, None, 6_000) is Receipt.NEW  # told apart by its event


def test_a_recorded_payment_cannot_apply_more_than_it_brought() -> None:
    with pytest.raises(ValueError, match="within"):
        Payment(sequence=1, payment_id="pay_1", amount=100, applied=101)


@given(amount=st.integers(1, 10**12), remaining=st.integers(0, 10**12),
       status=st.sampled_from(list(InvoiceStatus)))
def test_a_payment_is_split_exactly_and_never_overpays_the_invoice(
        amount: int, remaining: int, status: InvoiceStatus) -> None:
    landed = apply_payment(amount, remaining, status)

    assert landed.applied + landed.overpayment == amount
    assert 0 <= landed.applied <= remaining
    assert landed.overpayment >= 0
    if status is VOID:
        assert landed.applied == 0
    if status in (OPEN, UNCOLLECTIBLE):
        assert landed.applied == min(amount, remaining)
        assert landed.settles_invoice == (amount >= remaining)
    else:
        assert not landed.settles_invoice


@given(due=st.integers(1, 10**9), amounts=st.lists(st.integers(1, 10**9), max_size=10))
def test_payments_never_take_an_invoice_below_nothing_left(due: int, amounts: list[int]) -> None:
    payments: list[Payment] = []
    status = OPEN
    for amount in amounts:
        payment, landed = receive(payments, None, amount, due - amount_paid(payments), status)
        payments.append(payment)
        if landed.settles_invoice:
            status = PAID

    assert amount_paid(payments) <= due
    assert (status is PAID) == (amount_paid(payments) == due)
    assert amount_paid(payments) + sum(p.overpayment for p in payments) == sum(amounts)
