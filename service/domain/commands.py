"""Commands: what an upstream event or an operator asks the service to do.

Translators in ``entrypoints`` turn wire messages into these; handlers apply
them. Every command carries the :class:`Trigger` that caused it, whose
``source`` + ``id`` is the idempotency key of its effect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


@dataclass(frozen=True)
class Trigger:
    """The upstream CloudEvent (or command) that caused an effect."""

    source: str
    id: str
    type: str


class Settlement(StrEnum):
    """Where the post-payment part of a credit note goes."""

    REFUND = "refund"
    CUSTOMER_BALANCE = "customer_balance"
    OUT_OF_BAND = "out_of_band"


class OnExcess(StrEnum):
    """What to do when a request asks for more than is left to credit."""

    REJECT = "reject"  # explicit credit_note.issue: refused whole
    CAP = "cap"  # upstream triggers: credit what is left


@dataclass(frozen=True)
class SettlementSplit:
    """An explicit split of the post-payment part (any part not given is zero)."""

    refund_amount: int = 0
    credit_amount: int = 0
    out_of_band_amount: int = 0


@dataclass(frozen=True)
class InvoiceLineByQuantity:
    invoice_line_id: str
    quantity: int


@dataclass(frozen=True)
class InvoiceLineByAmount:
    """``amount`` is net: after the line's discount share, before tax."""

    invoice_line_id: str
    amount: int


@dataclass(frozen=True)
class CustomLine:
    description: str
    quantity: int
    unit_amount: int
    tax_rate_bps: int = 0


@dataclass(frozen=True)
class UnusedTime:
    """The part of a line's service period not yet used at ``at`` (downgrades, cancellations)."""

    invoice_line_id: str
    at: datetime


LineRequest = InvoiceLineByQuantity | InvoiceLineByAmount | CustomLine | UnusedTime


@dataclass(frozen=True)
class IssueCreditNote:
    """Credit part of an invoice: by lines, or by a line-less gross amount.

    The line-less amount is either ``amount`` or ``amount_bps`` of the invoice
    total. ``max_credit_bps`` is a trigger policy's cap, as basis points of the
    invoice total.
    """

    trigger: Trigger
    invoice_id: str
    reason: str
    lines: tuple[LineRequest, ...] = ()
    amount: int | None = None
    amount_bps: int | None = None
    max_credit_bps: int | None = None
    settlement: SettlementSplit | Settlement = Settlement.CUSTOMER_BALANCE
    on_excess: OnExcess = OnExcess.REJECT
    currency: str | None = None
    memo: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Which policy allowed a trigger's credit (for audit); None for explicit commands.
    policy: str | None = None
    #: The settlements the trigger's topic may ask for (None: any, as for explicit commands).
    allowed_settlements: frozenset[Settlement] | None = None


@dataclass(frozen=True)
class VoidCreditNote:
    trigger: Trigger
    credit_note_id: str


@dataclass(frozen=True)
class ServicePeriod:
    start: datetime
    end: datetime


@dataclass(frozen=True)
class DraftLine:
    id: str
    description: str
    quantity: int
    unit_amount: int
    tax_rate_bps: int = 0
    period: ServicePeriod | None = None


@dataclass(frozen=True)
class Discount:
    """Either a percentage (basis points) or a fixed amount off the subtotal."""

    percent_off_bps: int | None = None
    amount_off: int | None = None


@dataclass(frozen=True)
class FinalizeInvoice:
    trigger: Trigger
    invoice_id: str
    number: str
    customer_id: str
    currency: str
    status: str
    lines: tuple[DraftLine, ...]
    discounts: tuple[Discount, ...] = ()
    customer_balance_applied: int = 0
    #: None when the event did not say: a ``paid`` invoice was then paid in full.
    amount_paid: int | None = None
    stated_total: int | None = None


@dataclass(frozen=True)
class RecordPayment:
    trigger: Trigger
    invoice_id: str
    amount: int
    currency: str


@dataclass(frozen=True)
class VoidInvoice:
    trigger: Trigger
    invoice_id: str


@dataclass(frozen=True)
class MarkInvoiceUncollectible:
    trigger: Trigger
    invoice_id: str


Command = (
    IssueCreditNote
    | VoidCreditNote
    | FinalizeInvoice
    | RecordPayment
    | VoidInvoice
    | MarkInvoiceUncollectible
)
