"""Payments as facts about cash: what of a payment is applied, and what is an overpayment.

A payment (``invoice.payment_succeeded``) is never refused for its invoice's
state (docs/rules.md, Payments). The part up to the invoice's amount remaining is
*applied*: ``amount_paid`` grows, and at zero remaining an ``open`` or
``uncollectible`` invoice becomes ``paid``. The rest is an *overpayment* (a
payment that raced a credit note, a payment on a ``paid`` or ``void``
invoice): it goes to the customer's credit balance. Only applied cash is
refundable.

Payments of an invoice are numbered in the order they were received: ``0``
is the amount paid given at finalization (no id, older than every later
payment), later ones ``1, 2, ...``. Refunds go back newest first
(:mod:`service.domain.refunds`), so that order is the one that matters.

Everything here is pure and works on ``int`` minor units; the invoice
aggregate calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from service.domain import errors

if TYPE_CHECKING:  # the invoice aggregate (and commands) import this module: no import back
    from service.domain.commands import Trigger
    from service.domain.invoice import InvoiceStatus

#: The sequence of the payment recorded at finalization (``amount_paid`` given then).
FINALIZATION_SEQUENCE = 0


@dataclass(frozen=True)
class Payment:
    """One payment of an invoice as recorded: what came in and what of it was applied."""

    #: 0: recorded at finalization; then 1, 2, ... in the order received (newest is highest)
    sequence: int
    #: the payment system's id (None: at finalization, or a payment event without one)
    payment_id: str | None
    amount: int
    applied: int
    #: the upstream event that recorded it (None: the finalization payment)
    trigger: Trigger | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.sequence < 0:
            raise ValueError("a payment's sequence is not negative")
        if self.amount <= 0:
            raise ValueError("a payment's amount is positive")
        if not 0 <= self.applied <= self.amount:
            raise ValueError("a payment's applied part lies within its amount")

    @property
    def overpayment(self) -> int:
        """What of the payment went to the customer's credit balance."""
        return self.amount - self.applied

    @property
    def at_finalization(self) -> bool:
        return self.sequence == FINALIZATION_SEQUENCE


@dataclass(frozen=True)
class PaymentApplication:
    """How a payment lands on its invoice as it stands."""

    amount: int
    applied: int
    #: the invoice has nothing left to pay after it and becomes ``paid``
    settles_invoice: bool

    @property
    def overpayment(self) -> int:
        return self.amount - self.applied


class Receipt(StrEnum):
    """What a payment event is to the payments already recorded on its invoice."""

    NEW = "new"
    #: the same ``payment_id`` and amount again: no effect
    DUPLICATE = "duplicate"
    #: the same ``payment_id`` with another amount: for a person to look at
    CONFLICT = "conflict"


def apply_payment(amount: int, amount_remaining: int, status: InvoiceStatus) -> PaymentApplication:
    """Split ``amount`` into the part applied to the invoice and the overpayment.

    A ``void`` invoice takes nothing (all of it is an overpayment); a ``paid``
    one has nothing remaining. An ``open`` or ``uncollectible`` invoice takes
    up to its amount remaining and is settled when that reaches zero.
    """
    if amount <= 0:
        raise errors.InvalidMessage("a payment amount must be positive")
    if amount_remaining < 0:
        raise ValueError("an invoice's amount remaining is never negative")
    # InvoiceStatus is a StrEnum: its members equal their values
    if status == "void":
        return PaymentApplication(amount=amount, applied=0, settles_invoice=False)
    applied = min(amount, amount_remaining)
    settles = status in ("open", "uncollectible") and applied == amount_remaining
    return PaymentApplication(amount=amount, applied=applied, settles_invoice=settles)


def finalization_payment(amount_paid: int) -> Payment | None:
    """The payment an invoice was finalized with (None when nothing was paid)."""
    if amount_paid < 0:
        raise ValueError("amount_paid is not negative")
    if amount_paid == 0:
        return None
    return Payment(sequence=FINALIZATION_SEQUENCE, payment_id=None, amount=amount_paid,
                   applied=amount_paid)


def classify(payments: Sequence[Payment], payment_id: str | None, amount: int) -> Receipt:
    """Whether a payment event is new, a duplicate or a conflict, by its ``payment_id``.

    A payment without an id is told apart by its upstream event (``source`` +
    ``id``, the processed-message ledger), not here: it is always new.
    """
    if payment_id is None:
        return Receipt.NEW
    for payment in payments:
        if payment.payment_id == payment_id:
            return Receipt.DUPLICATE if payment.amount == amount else Receipt.CONFLICT
    return Receipt.NEW


def receive(payments: Sequence[Payment], payment_id: str | None, amount: int,
            amount_remaining: int, status: InvoiceStatus,
            trigger: Trigger | None = None) -> tuple[Payment, PaymentApplication]:
    """A new payment recorded after ``payments``: the next sequence, applied as it lands.

    The caller checked it is new (:func:`classify`).
    """
    application = apply_payment(amount, amount_remaining, status)
    sequence = max((payment.sequence for payment in payments),
                   default=FINALIZATION_SEQUENCE) + 1
    payment = Payment(sequence=sequence, payment_id=payment_id, amount=amount,
                      applied=application.applied, trigger=trigger)
    return payment, application


def amount_paid(payments: Sequence[Payment]) -> int:
    """An invoice's ``amount_paid``: the applied parts of its payments."""
    return sum(payment.applied for payment in payments)
