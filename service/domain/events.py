"""Domain events: what happened, recorded by the aggregate, written to the outbox.

Each event knows the upstream :class:`Trigger` that caused it; its wire ``id``
is derived from that trigger and the event type, so publishing it again after
a crash carries the same id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.domain.commands import Trigger

if TYPE_CHECKING:
    from service.domain.credit_note import CreditNote


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
    id: str
    invoice_id: str
    customer_id: str
    credit_note_id: str
    amount: int
    currency: str
    trigger: Trigger


Event = CreditNoteIssued | CreditNoteVoided | CreditNoteRejected | InvoicePaid | RefundRequested
