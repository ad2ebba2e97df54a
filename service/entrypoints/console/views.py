"""What the console shows, as pydantic models: the API returns them (OpenAPI documents
them) and the pages render them. Money is integer minor units everywhere; pages
format it with :func:`service.entrypoints.display.money`.

Built from domain objects and query rows by the ``*_view`` functions; no I/O here.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from service.adapters.console_queries import Arrival, NoteRow, OutboxEvent, ReplayRow
from service.domain.credit_note import CreditNote, JournalLine
from service.domain.invoice import Invoice, InvoiceLine, InvoiceStatus
from service.domain.payments import FINALIZATION_SEQUENCE
from service.domain.refunds import Refund, RefundState, refund_status
from service.entrypoints.dlq import DeadLetter, shown, shown_bytes

Item = TypeVar("Item")


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class Page(View, Generic[Item]):
    """One page of a list; ``next`` is the cursor of the following page (None: the last)."""

    items: list[Item]
    next: str | None = None


class Permission(View):
    """Whether an action is allowed now and, when not, why (in words a person can act on)."""

    allowed: bool
    reason: str | None = None


class TriggerView(View):
    source: str
    id: str
    type: str


class LineView(View):
    """An invoice line: what it charged, what credit notes took of it, what is left."""

    id: str
    description: str
    quantity: int
    unit_amount: int
    tax_rate_bps: int
    discount: int
    net: int
    tax: int
    credited_net: int
    credited_tax: int
    credited_quantity: int
    credit_method: str | None
    remaining_net: int
    remaining_tax: int
    remaining_gross: int
    remaining_quantity: int
    period_start: datetime | None = None
    period_end: datetime | None = None


class PaymentView(View):
    sequence: int
    payment_id: str | None
    label: str
    amount: int
    applied: int
    overpayment: int
    refunded: int
    refundable: int
    received_at: datetime | None = None
    #: the upstream event that told it (none for the payment recorded at finalization)
    trigger_source: str | None = None
    trigger_id: str | None = None


class RefundView(View):
    refund_id: str
    credit_note_id: str
    credit_note_number: str | None = None
    payment_sequence: int
    payment_id: str | None
    amount: int
    linked: bool
    status: str
    failure_reason: str | None = None
    resettled_to: str | None = None
    settled_at: datetime | None = None


class CreditNoteLineView(View):
    invoice_line_id: str | None
    description: str
    quantity: int | None
    unit_amount: int | None
    tax_rate_bps: int
    net: int
    tax: int
    total: int


class JournalLineView(View):
    entry: Literal["issue", "void"]
    account: str
    debit: int
    credit: int


class CreditNoteView(View):
    id: str
    number: str
    invoice_id: str
    customer_id: str
    currency: str
    status: str
    type: str
    reason: str
    subtotal: int
    tax: int
    total: int
    pre_payment_amount: int
    refund_amount: int
    credit_amount: int
    out_of_band_amount: int
    refund_status: str
    trigger: TriggerView
    policy: str | None
    memo: str | None
    metadata: dict[str, Any]
    effective_at: datetime | None
    voided_by: TriggerView | None = None
    lines: list[CreditNoteLineView]
    journal: list[JournalLineView]
    refunds: list[RefundView]
    can_void: Permission
    can_edit: Permission


class CreditNoteSummary(View):
    id: str
    number: str
    invoice_id: str
    customer_id: str
    currency: str
    status: str
    reason: str
    total: int
    pre_payment_amount: int
    refund_amount: int
    credit_amount: int
    out_of_band_amount: int
    refund_status: str
    trigger_type: str
    policy: str | None
    issued_at: datetime


class OutboxEventView(View):
    """An event out: ``state`` is published, pending, parked (refused by the broker for
    good) or held (waits behind a parked event of the same invoice)."""

    seq: int
    event_id: str
    type: str
    topic: str
    state: Literal["published", "pending", "parked", "held"]
    created_at: datetime
    published_at: datetime | None
    park_error: str | None = None
    data: dict[str, Any]


class HeaderView(View):
    name: str
    value: str


class DeadLetterView(View):
    """One dead letter. Every text that came from the record is escaped (no control or
    invisible characters); ``failing_field`` is the field ``dlq.error.message`` names."""

    topic: str
    partition: int
    offset: int
    position: str
    timestamp: int
    key: str
    reason: str
    message: str
    failed_at: datetime | None
    origin: str
    attempts: str
    digest: str
    failing_field: str | None = None
    headers: list[HeaderView] = Field(default_factory=list)
    payload: str | None = None
    payload_json: Any = None


class InvoiceView(View):
    id: str
    number: str
    customer_id: str
    currency: str
    status: str
    #: when the service stored it (its invoice.finalized)
    received_at: datetime | None = None
    subtotal: int
    discount: int
    tax: int
    total: int
    customer_balance_applied: int
    amount_due: int
    amount_paid: int
    amount_remaining: int
    pre_payment_credited: int
    post_payment_credited: int
    refunded: int
    refunds_failed: int
    creditable: int
    refundable: int
    lines: list[LineView]
    payments: list[PaymentView]
    credit_notes: list[CreditNoteView]
    refunds: list[RefundView]
    events: list[OutboxEventView]
    dead_letters: list[DeadLetterView] = Field(default_factory=list)
    #: False when the broker could not be read: ``dead_letters`` is then unknown, not empty.
    dead_letters_read: bool = False


class Rejection(View):
    code: str
    message: str


class PreviewResult(View):
    """What issuing would do now, saving nothing: the credit note, or the rejection."""

    invoice_id: str
    currency: str
    credit_note: CreditNoteView | None = None
    rejection: Rejection | None = None
    #: the most that can be credited, and refunded in cash, on the invoice as it stands
    max_creditable: int
    max_refundable: int
    amount_remaining_before: int
    amount_remaining_after: int
    invoice_status_after: str
    events: list[str] = Field(default_factory=list)


class CommandResult(View):
    """A command's outcome as the service's ledger has it (``pending``: not yet;
    ``unknown``: its publish failed and no outcome came: it may have been sent, retry
    with the same key)."""

    key: str
    source: str
    status: Literal["applied", "rejected", "dead_lettered", "duplicate", "pending", "unknown"]
    reason: str | None = None
    message: str | None = None
    credit_note: CreditNoteView | None = None
    location: str


class ReasonGroup(View):
    topic: str
    reason: str
    count: int
    oldest_failed_at: datetime | None
    oldest_age_seconds: float | None


class ReplayVerdict(View):
    position: str
    verdict: str


class ReplayResult(View):
    topic: str
    dry_run: bool
    operator: str
    republished: int
    would_replay: int
    already_replayed: int
    filtered_out: int
    refused: int
    held: int
    summary: str
    verdicts: list[ReplayVerdict]
    #: the lines ``creditnotes dlq replay`` prints, word for word
    lines: list[str]


class ReplayRowView(View):
    replay_run: str
    replayed_by: str
    replayed_at: datetime
    sent_at: datetime | None
    state: str
    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    original_topic: str
    original_partition: int | None
    original_offset: int | None
    reason: str | None
    record_key: str | None


class LagView(View):
    topic: str
    partition: int
    committed: int | None
    end: int
    lag: int


class ReasonCountView(View):
    topic: str
    reason: str
    count: int
    last_at: datetime


class PolicyView(View):
    trigger_type: str
    policy: str
    credit_notes: int
    total: int
    invoices_at_cap: int


class VerifyRunView(View):
    started_at: datetime
    finished_at: datetime
    violations: int
    invariants: list[str]
    ran_by: str


class FlowHealth(View):
    consumer_group: str
    lag: list[LagView]
    lag_total: int | None
    lag_error: str | None = None
    outbox_backlog: int
    outbox_oldest_seconds: float
    outbox_parked: int
    #: the ledger's business rejections, by input topic and reason
    rejections: list[ReasonCountView]
    #: what the dead-letter topics hold, by topic and reason (None: the broker was unreadable)
    dead_letters: list[ReasonGroup] | None
    #: the ledger's dead-letter decisions by input topic and reason (a record refused before
    #: its key was claimed, e.g. invalid_message, has none: see dead_letters)
    dead_lettered: list[ReasonCountView]
    policies: list[PolicyView]
    refunds_pending: int
    refund_oldest_pending_seconds: float
    last_verify: VerifyRunView | None = None


# --------------------------------------------------------------------------- builders


def line_view(line: InvoiceLine) -> LineView:
    return LineView(
        id=line.id, description=line.description, quantity=line.quantity,
        unit_amount=line.unit_amount, tax_rate_bps=line.tax_rate_bps, discount=line.discount,
        net=line.net, tax=line.tax, credited_net=line.credited_net,
        credited_tax=line.credited_tax, credited_quantity=line.credited_quantity,
        credit_method=line.credit_method.value if line.credit_method else None,
        remaining_net=line.remaining_net, remaining_tax=line.remaining_tax,
        remaining_gross=line.remaining_gross,
        remaining_quantity=line.quantity - line.credited_quantity,
        period_start=line.period.start if line.period else None,
        period_end=line.period.end if line.period else None)


def payment_label(sequence: int, payment_id: str | None) -> str:
    if payment_id is not None:
        return payment_id
    return "at finalization" if sequence == FINALIZATION_SEQUENCE else f"#{sequence} (no id)"


def payment_views(invoice: Invoice, arrivals: Mapping[int, Arrival] | None = None
                  ) -> list[PaymentView]:
    arrivals = arrivals or {}
    refunded: dict[int, int] = {}
    for refund in invoice.refunds:
        if refund.holds_cash:
            refunded[refund.payment_sequence] = (refunded.get(refund.payment_sequence, 0)
                                                 + refund.amount)
    return [PaymentView(sequence=p.sequence, payment_id=p.payment_id,
                        label=payment_label(p.sequence, p.payment_id), amount=p.amount,
                        applied=p.applied, overpayment=p.overpayment,
                        refunded=refunded.get(p.sequence, 0),
                        refundable=p.applied - refunded.get(p.sequence, 0),
                        **(arrivals[p.sequence].__dict__ if p.sequence in arrivals else {}))
            for p in invoice.payments]


def refund_view(refund: Refund, number: str | None = None) -> RefundView:
    return RefundView(
        refund_id=refund.refund_id, credit_note_id=refund.credit_note_id,
        credit_note_number=number, payment_sequence=refund.payment_sequence,
        payment_id=refund.payment_id, amount=refund.amount, linked=refund.linked,
        status=refund.state.value, failure_reason=refund.failure_reason,
        resettled_to=refund.resettled_to.value if refund.resettled_to else None,
        settled_at=refund.settled_at)


def _journal(entry: Literal["issue", "void"], lines: tuple[JournalLine, ...]
             ) -> list[JournalLineView]:
    return [JournalLineView(entry=entry, account=line.account.value, debit=line.debit,
                            credit=line.credit) for line in lines]


def can_void(note: CreditNote, invoice_status: InvoiceStatus | None) -> Permission:
    """The rules of ``Invoice.void_credit_note``, said before anyone tries."""
    if note.status.value == "void":
        return Permission(allowed=False, reason=f"credit note {note.number} is already void")
    if invoice_status is not None and invoice_status is not InvoiceStatus.OPEN:
        return Permission(allowed=False, reason=f"its invoice is {invoice_status.value}: only "
                                                "a credit note of an open invoice can be voided")
    if note.post_payment_amount > 0:
        return Permission(allowed=False, reason="part of it was post-payment (refunded or "
                                                "credited to the balance): it cannot be voided")
    return Permission(allowed=True)


def credit_note_view(note: CreditNote, invoice_status: InvoiceStatus | None) -> CreditNoteView:
    journal = _journal("issue", note.journal)
    if note.status.value == "void":
        journal += _journal("void", note.void_journal)
    return CreditNoteView(
        id=note.id, number=note.number, invoice_id=note.invoice_id,
        customer_id=note.customer_id, currency=note.currency, status=note.status.value,
        type=note.type.value, reason=note.reason.value, subtotal=note.subtotal, tax=note.tax,
        total=note.total, pre_payment_amount=note.pre_payment_amount,
        refund_amount=note.refund_amount, credit_amount=note.credit_amount,
        out_of_band_amount=note.out_of_band_amount, refund_status=note.refund_status.value,
        trigger=TriggerView(source=note.trigger.source, id=note.trigger.id,
                            type=note.trigger.type),
        policy=note.policy, memo=note.memo, metadata=dict(note.metadata),
        effective_at=note.effective_at,
        voided_by=TriggerView(source=note.voided_by.source, id=note.voided_by.id,
                              type=note.voided_by.type) if note.voided_by else None,
        lines=[CreditNoteLineView(invoice_line_id=line.invoice_line_id,
                                  description=line.description, quantity=line.quantity,
                                  unit_amount=line.unit_amount, tax_rate_bps=line.tax_rate_bps,
                                  net=line.net, tax=line.tax, total=line.total)
               for line in note.lines],
        journal=journal,
        refunds=[refund_view(refund, note.number) for refund in note.refunds],
        can_void=can_void(note, invoice_status),
        can_edit=Permission(allowed=True))  # memo and metadata: any status, void included


def summary_view(row: NoteRow) -> CreditNoteSummary:
    return CreditNoteSummary(
        id=row.id, number=row.number, invoice_id=row.invoice_id, customer_id=row.customer_id,
        currency=row.currency, status=row.status, reason=row.reason, total=row.total,
        pre_payment_amount=row.pre_payment_amount, refund_amount=row.refund_amount,
        credit_amount=row.credit_amount, out_of_band_amount=row.out_of_band_amount,
        refund_status=refund_status(RefundState(state) for state in row.refund_states).value,
        trigger_type=row.trigger_type, policy=row.policy, issued_at=row.issued_at)


def event_view(event: OutboxEvent) -> OutboxEventView:
    return OutboxEventView(seq=event.seq, event_id=event.event_id, type=event.type,
                           topic=event.topic, state=event.state,
                           created_at=event.created_at, published_at=event.published_at,
                           park_error=event.park_error, data=event.data)


def invoice_view(invoice: Invoice, notes: list[CreditNote], events: list[OutboxEvent],
                 received_at: datetime | None = None,
                 arrivals: Mapping[int, Arrival] | None = None) -> InvoiceView:
    numbers = {note.id: note.number for note in notes}
    return InvoiceView(
        id=invoice.id, number=invoice.number, customer_id=invoice.customer_id,
        currency=invoice.currency, status=invoice.status.value, received_at=received_at,
        subtotal=invoice.subtotal,
        discount=invoice.discount, tax=invoice.tax, total=invoice.total,
        customer_balance_applied=invoice.customer_balance_applied,
        amount_due=invoice.amount_due, amount_paid=invoice.amount_paid,
        amount_remaining=invoice.amount_remaining,
        pre_payment_credited=invoice.pre_payment_credited,
        post_payment_credited=invoice.post_payment_credited, refunded=invoice.refunded,
        refunds_failed=invoice.refunds_failed, creditable=invoice.creditable,
        refundable=invoice.refundable,
        lines=[line_view(line) for line in invoice.lines],
        payments=payment_views(invoice, arrivals),
        credit_notes=[credit_note_view(note, invoice.status) for note in notes],
        refunds=[refund_view(refund, numbers.get(refund.credit_note_id))
                 for refund in invoice.refunds],
        events=[event_view(event) for event in events])


#: ``dlq.error.message`` as the service words it: ``invalid <what>: <path>: <problem>; ...``.
_FIELD = re.compile(r"^invalid [^:]+: ([A-Za-z0-9_.<> \[\]-]+?): ")


def failing_field(message: str) -> str | None:
    """The first field a dead letter's error message names (``lines.0.quantity``), if any."""
    found = _FIELD.match(message)
    if found is None or found.group(1) == "message":
        return None
    return found.group(1)


def dead_letter_view(record: DeadLetter, full: bool = False) -> DeadLetterView:
    """A dead letter; ``full``: with its headers and payload (escaped, never interpreted)."""
    message = record.header("dlq.error.message") or ""
    payload: str | None = None
    payload_json: Any = None
    if full and record.value is not None:
        text = record.value.decode("utf-8", "replace")
        with contextlib.suppress(ValueError, RecursionError):
            payload_json = json.loads(text)
        payload = shown(text)
    return DeadLetterView(
        topic=record.topic, partition=record.partition, offset=record.offset,
        position=f"{record.partition}:{record.offset}", timestamp=record.timestamp,
        key=shown(record.key_text), reason=shown(record.reason), message=shown(message),
        failed_at=record.failed_at, origin=shown(record.origin),
        attempts=shown(record.header("dlq.attempts") or ""), digest=record.digest,
        failing_field=failing_field(message),
        headers=[HeaderView(name=shown(name), value=shown_bytes(value))
                 for name, value in record.headers[:1000]] if full else [],
        payload=payload, payload_json=payload_json)


def replay_row_view(row: ReplayRow) -> ReplayRowView:
    return ReplayRowView(**row.__dict__)
