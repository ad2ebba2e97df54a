"""Commands: what an upstream event or an operator asks the service to do.

Translators in ``entrypoints`` turn wire messages into these; handlers apply
them. Every command carries the :class:`Trigger` that caused it, whose
``source`` + ``id`` is the idempotency key of its effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from service.domain.refunds import FailureSettlement, LinkedRefund, RefundState


@dataclass(frozen=True)
class Trigger:
    """The upstream CloudEvent (or command) that caused an effect.

    ``time`` is the CloudEvent's ``time`` when it had one: the default
    accounting date (``effective_at``) of what it causes. It is not part of
    the idempotency key, and is not stored with the trigger.
    """

    source: str
    id: str
    type: str
    time: datetime | None = field(default=None, compare=False)


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
    """An explicit split of the post-payment part (any part not given is zero; a
    ``refund_amount`` not given (None) with linked refunds is their sum)."""

    refund_amount: int | None = None
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
    #: Refunds already made in the payment system for this invoice (``refunds`` on the wire).
    linked_refunds: tuple[LinkedRefund, ...] = ()
    #: The explicit accounting date; None: the trigger's ``time``, else when it is processed.
    effective_at: datetime | None = None


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
    """A payment (``invoice.payment_succeeded``): a fact, recorded once per ``payment_id``."""

    trigger: Trigger
    invoice_id: str
    amount: int
    currency: str
    #: the payment system's id; None: told apart by its upstream event (source + id) only
    payment_id: str | None = None


@dataclass(frozen=True)
class RecordRefundOutcome:
    """``refund.succeeded`` / ``refund.failed`` for one refund of ``invoice_id``.

    ``failure_settlement`` is ``CREDITNOTES_REFUND_FAILURE_SETTLEMENT`` as it
    stands when the outcome is applied (the translator stamps it). The
    outcome's journal is dated ``trigger.time`` (else when it is processed).
    """

    trigger: Trigger
    invoice_id: str
    refund_id: str
    outcome: RefundState
    failure_reason: str | None = None
    failure_settlement: FailureSettlement = FailureSettlement.CUSTOMER_BALANCE


@dataclass(frozen=True)
class UpdateCreditNote:
    """``credit_note.update``: the memo and/or metadata, the only things that change after issue.

    ``memo_set`` tells a ``memo`` of None that clears it (True) from an absent
    one (False). ``metadata_patch`` is merged key by key; a None value removes
    its key.
    """

    trigger: Trigger
    credit_note_id: str
    memo: str | None = None
    memo_set: bool = False
    metadata_patch: Mapping[str, str | None] = field(default_factory=dict)


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
    | RecordRefundOutcome
    | UpdateCreditNote
)
