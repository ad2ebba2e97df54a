"""Refunds against payments: where a credit note's refund part goes, and how it stands.

docs/rules.md (Refunds): the refund part of a credit note is spread over the
invoice's payments *newest first*, each up to what of it is not refunded yet
(pending or succeeded refunds; a failed one gave its cash back). One refund
per payment touched, with a stable id. Refunds already made in the payment
system and *linked* on ``credit_note.issue`` count against the same cash and
take it first; they are recorded as ``succeeded`` and never requested.

- :func:`plan_refunds`: the refunds of one credit note (linked, then new);
- :func:`allocate_newest_first`: the new part over the payments' remainders;
- :func:`place_linked`: each linked refund, whole, on one payment;
- :func:`refund_id_for`: the stable id of a new refund (credit note + payment);
- :func:`refund_status`: a credit note's ``refund_status`` from its refunds;
- :func:`transition`: what an outcome does to a refund (apply, duplicate, conflict).

Decisions where docs/rules.md is silent (docs/decisions.md):

- A refund in a payment system goes back to one payment, so a linked refund is
  placed whole on one payment: the newest whose remainder holds it, largest
  linked refunds first (first fit decreasing); when that leaves one out, a
  bounded search finds a placement that fits. If there is none, the command is
  rejected ``exceeds_refundable_amount``, even when the remainders together would.
- A new refund's id is derived from its credit note's id (itself derived from
  the upstream event) and its payment (``payment_id``, or the payment's
  sequence when it has none), so recomputing after a crash or a redelivery
  yields the same ids, and a credit note never has two refunds on one payment.

Pure: ints of minor units, no I/O.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from service.domain import errors
from service.domain.payments import Payment

if TYPE_CHECKING:  # commands imports this module: no import back at run time
    from service.domain.commands import Trigger


class RefundState(StrEnum):
    """One refund: ``pending`` until its first outcome, which is final."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class RefundStatus(StrEnum):
    """A credit note's ``refund_status``: over all its refunds."""

    NONE = "none"
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PARTIALLY_FAILED = "partially_failed"


class Transition(StrEnum):
    """What an outcome (``refund.succeeded`` / ``refund.failed``) does to a refund."""

    APPLY = "apply"  # pending: the outcome is recorded
    DUPLICATE = "duplicate"  # the same outcome again: no effect
    CONFLICT = "conflict"  # the opposite of a final outcome: dead-lettered refund_state_conflict


class FailureSettlement(StrEnum):
    """Where a failed refund's amount goes (``CREDITNOTES_REFUND_FAILURE_SETTLEMENT``)."""

    CUSTOMER_BALANCE = "customer_balance"
    NONE = "none"  # stays in refunds_payable for a person to settle


@dataclass(frozen=True)
class PaymentCash:
    """What of one payment's applied cash is refunded (pending or succeeded) and what is left."""

    sequence: int
    payment_id: str | None
    applied: int
    refunded: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.refunded <= self.applied:
            raise ValueError("a payment's refunds lie within its applied cash")

    @property
    def refundable(self) -> int:
        return self.applied - self.refunded

    def take(self, amount: int) -> PaymentCash:
        """This payment with ``amount`` more refunded."""
        return replace(self, refunded=self.refunded + amount)


@dataclass(frozen=True)
class LinkedRefund:
    """A refund already made in the payment system, listed on ``credit_note.issue``."""

    refund_id: str
    amount: int


@dataclass(frozen=True)
class Refund:
    """One refund of a credit note, on one payment.

    Once settled: ``settled_by`` is the outcome event (None for a linked
    refund, made before it was recorded), ``settled_at`` the date of its
    journal (a linked refund's: its credit note's ``effective_at``), and a
    failed one says where its amount went again (``resettled_to``).
    """

    refund_id: str
    credit_note_id: str
    payment_sequence: int
    payment_id: str | None
    amount: int
    linked: bool = False
    state: RefundState = RefundState.PENDING
    failure_reason: str | None = None
    resettled_to: FailureSettlement | None = None
    settled_by: Trigger | None = None
    settled_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.amount <= 0:
            raise ValueError("a refund's amount is positive")
        if self.linked and self.state is not RefundState.SUCCEEDED:
            raise ValueError("a linked refund was made already: it is succeeded")
        if (self.state is RefundState.FAILED) != (self.resettled_to is not None):
            raise ValueError("a failed refund, and only a failed one, is settled again")
        if self.failure_reason is not None and self.state is not RefundState.FAILED:
            raise ValueError("only a failed refund has a failure reason")

    @property
    def holds_cash(self) -> bool:
        """Pending or succeeded: it counts against its payment's refundable cash."""
        return self.state is not RefundState.FAILED

    @property
    def to_customer_balance(self) -> int:
        """What of it went to the customer's credit balance (a failure settled there)."""
        return self.amount if self.resettled_to is FailureSettlement.CUSTOMER_BALANCE else 0

    @property
    def open_payable(self) -> int:
        """What of it is still in ``refunds_payable``: pending, or failed and settled as none."""
        if self.state is RefundState.PENDING or self.resettled_to is FailureSettlement.NONE:
            return self.amount
        return 0

    def settled(self, outcome: RefundState, *, failure_reason: str | None = None,
                resettled_to: FailureSettlement | None = None, by: Trigger | None = None,
                at: datetime | None = None) -> Refund:
        """This refund with ``outcome`` recorded (check :func:`transition` first).

        A failure is settled again as ``resettled_to`` says (default: the
        customer balance); a success has no failure reason.
        """
        if transition(self.state, outcome) is not Transition.APPLY:
            raise ValueError(f"a {self.state} refund cannot become {outcome}")
        if outcome is RefundState.FAILED:
            return replace(self, state=outcome, failure_reason=failure_reason,
                           resettled_to=resettled_to or FailureSettlement.CUSTOMER_BALANCE,
                           settled_by=by, settled_at=at)
        return replace(self, state=outcome, settled_by=by, settled_at=at)


def uuid5_hex(namespace: bytes, name: str) -> str:
    """``uuid.uuid5(UUID(bytes=namespace), name).hex`` without building a ``UUID`` (a third of the
    time): SHA-1 of the namespace and the UTF-8 name, its first 16 bytes, with the version
    (the 13th hex digit, ``5``) and the variant (the 17th, ``10xx``) set as RFC 9562 says.
    Byte-identical to ``uuid5`` (``tests/unit/test_fast_ids.py``), so no stored id changes;
    a name ``uuid5`` cannot encode (a lone surrogate) raises the same ``UnicodeEncodeError``.
    """
    digest = hashlib.sha1(namespace + name.encode("utf-8"), usedforsecurity=False).hexdigest()
    return (f"{digest[:12]}5{digest[13:16]}{_VARIANT[int(digest[16], 16) & 3]}"
            f"{digest[17:32]}")


_VARIANT = "89ab"
_NAMESPACE = uuid.UUID("0b9e3c5e-7f44-4a53-9a53-5be4d1f0c2a7").bytes


def refund_id_for(credit_note_id: str, payment: PaymentCash) -> str:
    """The id of the new refund of ``credit_note_id`` on ``payment``: the same every time.

    A payment without an id is named by its sequence (``#<n>``, which no
    payment id can be confused with: the two forms differ in their first
    character, ``+`` or ``#``).
    """
    name = (f"+{payment.payment_id}" if payment.payment_id is not None
            else f"#{payment.sequence}")
    digest = uuid5_hex(_NAMESPACE, f"{credit_note_id}\n{name}")
    return f"rf_{digest[:24]}"


def cash_of(payments: Sequence[Payment], refunds: Iterable[Refund]) -> tuple[PaymentCash, ...]:
    """Each payment's applied cash with what its pending and succeeded refunds took of it."""
    refunded: dict[int, int] = {}
    for refund in refunds:
        if refund.holds_cash:
            refunded[refund.payment_sequence] = (refunded.get(refund.payment_sequence, 0)
                                                 + refund.amount)
    known = {payment.sequence for payment in payments}
    if not refunded.keys() <= known:
        raise ValueError("a refund points at a payment the invoice does not have")
    return tuple(PaymentCash(payment.sequence, payment.payment_id, payment.applied,
                             refunded.get(payment.sequence, 0))
                 for payment in sorted(payments, key=lambda payment: payment.sequence))


def refundable(payments: Iterable[PaymentCash]) -> int:
    """Cash collected on the invoice and not refunded (pending or succeeded)."""
    return sum(payment.refundable for payment in payments)


def allocate_newest_first(amount: int, payments: Sequence[PaymentCash]
                          ) -> tuple[tuple[PaymentCash, int], ...]:
    """``amount`` over ``payments``, newest (highest sequence) first, each up to its remainder.

    Returns the payments touched with their parts (each positive), newest
    first; the parts add up to ``amount``. More than the payments hold is
    rejected ``exceeds_refundable_amount``.
    """
    if amount < 0:
        raise ValueError("a refund amount is not negative")
    _check_payments(payments)
    available = refundable(payments)
    if amount > available:
        raise errors.ExceedsRefundableAmount(
            f"at most {available} of collected cash can be refunded")
    parts: list[tuple[PaymentCash, int]] = []
    left = amount
    for payment in sorted(payments, key=lambda payment: payment.sequence, reverse=True):
        if left == 0:
            break
        part = min(left, payment.refundable)
        if part > 0:
            parts.append((payment, part))
            left -= part
    return tuple(parts)


#: At most this many placements are tried in :func:`place_linked`'s search.
PLACEMENT_STEPS = 100_000


def place_linked(linked: Sequence[LinkedRefund], payments: Sequence[PaymentCash]
                 ) -> tuple[dict[str, PaymentCash], tuple[PaymentCash, ...]]:
    """Each linked refund whole on one payment; returns where, and the payments after.

    Largest first (ties in the order given), each on the newest payment whose
    remainder holds it; when that first fit leaves one without a payment, a
    search (backtracking, newest payments first, at most ``PLACEMENT_STEPS``
    placements tried) finds a placement that fits if one exists: the first
    found in that order, so the first fit when it fits. None found:
    ``exceeds_refundable_amount``.
    """
    _check_payments(payments)
    order = sorted(range(len(linked)), key=lambda index: (-linked[index].amount, index))
    amounts = [linked[index].amount for index in order]
    newest_first = sorted((payment.sequence for payment in payments), reverse=True)
    left = {payment.sequence: payment.refundable for payment in payments}
    homes: list[int] = []
    steps = 0

    def search(position: int) -> bool:
        nonlocal steps
        if position == len(amounts):
            return True
        amount = amounts[position]
        tried: set[int] = set()  # remainders tried here: an equal one ends the same way
        for sequence in newest_first:
            remainder = left[sequence]
            if remainder < amount or remainder in tried:
                continue
            steps += 1
            if steps > PLACEMENT_STEPS:
                return False
            tried.add(remainder)
            left[sequence] = remainder - amount
            homes.append(sequence)
            if search(position + 1):
                return True
            homes.pop()
            left[sequence] = remainder
        return False

    if not search(0):
        raise errors.ExceedsRefundableAmount(
            "the payments' refundable cash cannot hold each linked refund whole on one"
            " payment (a refund goes back to one payment)")
    standing = {payment.sequence: payment for payment in payments}
    placed: dict[str, PaymentCash] = {}
    for index, home in zip(order, homes, strict=True):
        refund = linked[index]
        placed[refund.refund_id] = standing[home]
        standing[home] = standing[home].take(refund.amount)
    return placed, tuple(standing[sequence] for sequence in sorted(standing))


def plan_refunds(credit_note_id: str, refund_amount: int, payments: Sequence[PaymentCash],
                 linked: Sequence[LinkedRefund] = (), effective_at: datetime | None = None,
                 ) -> tuple[Refund, ...]:
    """The refunds of a credit note: its linked refunds (in the order given), then new ones.

    The linked refunds take their cash first (:func:`place_linked`), the rest
    of ``refund_amount`` is requested newest first (:func:`allocate_newest_first`),
    one new refund per payment touched. The refunds add up to ``refund_amount``
    exactly and no payment gives more than its remainder. Linked refunds are
    settled (their journal dated ``effective_at``, the credit note's).
    """
    _check_linked(linked)
    linked_total = sum(refund.amount for refund in linked)
    if refund_amount < linked_total:
        raise errors.SettlementMismatch(
            f"the refund amount must be at least the {linked_total} of the linked refunds")
    if linked_total > refundable(payments):
        raise errors.ExceedsRefundableAmount(
            f"at most {refundable(payments)} of collected cash can be refunded")
    placed, after = place_linked(linked, payments)
    refunds = [Refund(refund_id=refund.refund_id, credit_note_id=credit_note_id,
                      payment_sequence=placed[refund.refund_id].sequence,
                      payment_id=placed[refund.refund_id].payment_id, amount=refund.amount,
                      linked=True, state=RefundState.SUCCEEDED, settled_at=effective_at)
               for refund in linked]
    for payment, part in allocate_newest_first(refund_amount - linked_total, after):
        refunds.append(Refund(refund_id=refund_id_for(credit_note_id, payment),
                              credit_note_id=credit_note_id, payment_sequence=payment.sequence,
                              payment_id=payment.payment_id, amount=part))
    return tuple(refunds)


def refund_status(states: Iterable[RefundState]) -> RefundStatus:
    """``none`` (no refunds), ``pending`` (any pending), else succeeded, failed or partially."""
    seen = set(states)
    if not seen:
        return RefundStatus.NONE
    if RefundState.PENDING in seen:
        return RefundStatus.PENDING
    if seen == {RefundState.SUCCEEDED}:
        return RefundStatus.SUCCEEDED
    if seen == {RefundState.FAILED}:
        return RefundStatus.FAILED
    return RefundStatus.PARTIALLY_FAILED


def transition(current: RefundState, outcome: RefundState) -> Transition:
    """A pending refund takes its first outcome; a final one keeps it (docs/rules.md, Refunds)."""
    if outcome is RefundState.PENDING:
        raise ValueError("an outcome is succeeded or failed")
    if current is RefundState.PENDING:
        return Transition.APPLY
    return Transition.DUPLICATE if current is outcome else Transition.CONFLICT


def _check_payments(payments: Sequence[PaymentCash]) -> None:
    if len({payment.sequence for payment in payments}) != len(payments):
        raise ValueError("each payment of an invoice has its own sequence")


def _check_linked(linked: Sequence[LinkedRefund]) -> None:
    """Shapes the wire model refuses too; checked here as well, as money is at stake."""
    if any(refund.amount <= 0 for refund in linked):
        raise errors.InvalidMessage("a linked refund's amount must be positive")
    if len({refund.refund_id for refund in linked}) != len(linked):
        raise errors.InvalidMessage("a refund id may be linked only once in a credit note")
