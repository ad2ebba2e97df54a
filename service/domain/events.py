"""Domain events: what happened, recorded by the aggregate, written to the outbox.

Each event knows the upstream :class:`Trigger` that caused it; its wire ``id``
is derived from that trigger and the event type, so publishing it again after
a crash carries the same id.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from service.domain.commands import Trigger
from service.domain.refunds import FailureSettlement, RefundStatus

if TYPE_CHECKING:
    from service.domain.credit_note import CreditNote, JournalLine


@dataclass(frozen=True)
class InvoiceState:
    """The invoice as it stands after an event."""

    amount_remaining: int
    status: str


@dataclass(frozen=True)
class CreditNoteIssued:
    credit_note: CreditNote
    invoice: InvoiceState

    @property
    def trigger(self) -> Trigger:
        return self.credit_note.trigger

    @property
    def invoice_id(self) -> str:
        return self.credit_note.invoice_id


@dataclass(frozen=True)
class CreditNoteVoided:
    credit_note: CreditNote
    invoice: InvoiceState
    trigger: Trigger
    #: the date of the void journal: the void event's time (None: when it is processed)
    effective_at: datetime | None = None

    @property
    def invoice_id(self) -> str:
        return self.credit_note.invoice_id


@dataclass(frozen=True)
class CreditNoteRejected:
    trigger: Trigger
    invoice_id: str | None
    reason: str
    message: str


@dataclass(frozen=True)
class InvoicePaid:
    invoice_id: str
    credit_note_id: str
    trigger: Trigger


@dataclass(frozen=True)
class RefundRequested:
    """One new refund of a credit note, on one payment (``id`` is the refund id)."""

    id: str
    invoice_id: str
    customer_id: str
    credit_note_id: str
    amount: int
    currency: str
    trigger: Trigger
    #: the payment it goes back to (None: a payment without id, normally the finalization one)
    payment_id: str | None = None


class BalanceReason(StrEnum):
    """Why an amount went to the customer's credit balance."""

    CREDIT_NOTE = "credit_note"  # a credit note's credit_amount
    REFUND_FAILED = "refund_failed"  # a failed refund settled to the balance
    OVERPAYMENT = "overpayment"  # the part of a payment beyond the amount remaining


@dataclass(frozen=True)
class CustomerBalanceCredited:
    """An amount sent to the customer's credit balance (once per amount; keyed by customer).

    ``credit_note_id``, ``refund_id`` and ``payment_id`` are set where they
    apply to ``reason``. Its trigger causes exactly one of these.
    """

    customer_id: str
    invoice_id: str
    currency: str
    amount: int
    reason: BalanceReason
    trigger: Trigger
    credit_note_id: str | None = None
    refund_id: str | None = None
    payment_id: str | None = None
    effective_at: datetime | None = None


@dataclass(frozen=True)
class CreditNoteRefundSucceeded:
    """A refund's ``refund.succeeded`` applied; ``refund_status`` is its credit note's after it."""

    credit_note_id: str
    invoice_id: str
    refund_id: str
    payment_id: str | None
    amount: int
    refund_status: RefundStatus
    journal: tuple[JournalLine, ...]
    effective_at: datetime
    trigger: Trigger


@dataclass(frozen=True)
class CreditNoteRefundFailed:
    """A refund's ``refund.failed`` applied: its amount settled again as ``resettled_to``."""

    credit_note_id: str
    invoice_id: str
    refund_id: str
    payment_id: str | None
    amount: int
    refund_status: RefundStatus
    journal: tuple[JournalLine, ...]
    effective_at: datetime
    trigger: Trigger
    failure_reason: str | None
    resettled_to: FailureSettlement


@dataclass(frozen=True)
class CreditNoteUpdated:
    """``credit_note.update`` applied: the credit note with its new memo and metadata."""

    credit_note: CreditNote
    trigger: Trigger

    @property
    def invoice_id(self) -> str:
        return self.credit_note.invoice_id


Event = (CreditNoteIssued | CreditNoteVoided | CreditNoteRejected | InvoicePaid | RefundRequested
         | CustomerBalanceCredited | CreditNoteRefundSucceeded | CreditNoteRefundFailed
         | CreditNoteUpdated)
