"""The invoice as this service knows it: priced lines plus what has been credited.

The invoice is the aggregate: every credit note is issued or voided, every
payment received, every refund outcome applied and every credit-note edit made
under its lock, by one of its methods, which records what happened as events.
It keeps the running figures the caps are checked against, its payments
(sequence 0: the amount paid at finalization) and the refunds of its credit
notes. Its original lines and totals never change after finalization; only the
credited amounts, the payments, the refunds' states and the status do.

Order of an invoice (docs/rules.md): line items, discounts, pre-tax total, taxes,
customer balance applied, credit notes, new amount due::

    total            = subtotal - discount + tax
    amount_due       = total - customer_balance_applied
    amount_remaining = amount_due - amount_paid - pre-payment credits
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

from service.domain import errors, money, payments, refunds
from service.domain.commands import Discount, DraftLine, FinalizeInvoice, ServicePeriod, Trigger
from service.domain.credit_note import (
    METADATA_MAX_KEY_LENGTH,
    METADATA_MAX_KEYS,
    METADATA_MAX_VALUE_LENGTH,
    CreditNote,
    CreditNoteStatus,
    merged_metadata,
    refund_journal,
)
from service.domain.events import (
    BalanceReason,
    CreditNoteIssued,
    CreditNoteRefundFailed,
    CreditNoteRefundSucceeded,
    CreditNoteUpdated,
    CreditNoteVoided,
    CustomerBalanceCredited,
    Event,
    InvoicePaid,
    InvoiceState,
    RefundRequested,
)
from service.domain.payments import Payment, Receipt, finalization_payment
from service.domain.refunds import (
    FailureSettlement,
    PaymentCash,
    Refund,
    RefundState,
    Transition,
)


class InvoiceStatus(StrEnum):
    OPEN = "open"
    PAID = "paid"
    UNCOLLECTIBLE = "uncollectible"
    VOID = "void"


class CreditMethod(StrEnum):
    """How a line has been credited; once chosen, a line keeps to it."""

    QUANTITY = "quantity"
    AMOUNT = "amount"


@dataclass
class InvoiceLine:
    id: str
    position: int
    description: str
    quantity: int
    unit_amount: int
    tax_rate_bps: int
    period: ServicePeriod | None
    discount: int
    tax: int
    credited_net: int = 0
    credited_tax: int = 0
    credited_quantity: int = 0
    credit_method: CreditMethod | None = None
    #: When each non-void time-based credit of this line starts (one entry per credit).
    time_credits: tuple[datetime, ...] = ()

    @property
    def covered_from(self) -> datetime | None:
        """Time-based credits covered ``[covered_from, period end)``; None: none yet.

        Each covers the line from its time to the period end, so together they
        cover from the earliest of them.
        """
        return min(self.time_credits, default=None)

    @property
    def amount(self) -> int:
        return self.quantity * self.unit_amount

    def give_back(self, net: int, tax: int, quantity: int, covers_from: datetime | None) -> None:
        """Undo a voided credit's take (called by :meth:`Invoice.void_credit_note`)."""
        self.credited_net -= net
        self.credited_tax -= tax
        if self.credit_method is CreditMethod.QUANTITY and quantity:
            self.credited_quantity -= quantity
        if (self.credited_quantity, self.credited_net, self.credited_tax) == (0, 0, 0):
            self.credit_method = None  # nothing credited any more: free to choose
        if covers_from is not None:
            # coverage is what the remaining time-based credits cover: from the earliest
            position = (self.time_credits.index(covers_from) if covers_from in self.time_credits
                        else len(self.time_credits))  # two credits may start at the same time
            self.time_credits = self.time_credits[:position] + self.time_credits[position + 1:]

    @property
    def net(self) -> int:
        """The line after its share of the invoice discounts, before tax."""
        return self.amount - self.discount

    @property
    def remaining_net(self) -> int:
        return self.net - self.credited_net

    @property
    def remaining_tax(self) -> int:
        return self.tax - self.credited_tax

    @property
    def remaining_gross(self) -> int:
        return self.remaining_net + self.remaining_tax


@dataclass(frozen=True)
class LineTake:
    """What one credit note line takes from its invoice line, beyond its net and tax."""

    #: whole units credited (0: an amount, a share, or time)
    quantity: int = 0
    #: the credit method the line keeps to from now on (None: fixes none)
    method: CreditMethod | None = None


@dataclass(frozen=True)
class PricedCredit:
    """A credit note priced against an invoice (``issuing``), not applied to it yet."""

    note: CreditNote
    #: one per line of ``note``, in order
    takes: tuple[LineTake, ...]


@dataclass
class Invoice:
    id: str
    number: str
    customer_id: str
    currency: str
    status: InvoiceStatus
    lines: list[InvoiceLine]
    subtotal: int
    discount: int
    tax: int
    total: int
    customer_balance_applied: int
    amount_paid: int
    pre_payment_credited: int = 0
    post_payment_credited: int = 0
    refunded: int = 0
    credit_note_count: int = 0
    #: Per trigger type (``sla.breached``, ...): the total of its non-void credit notes.
    credited_by_trigger: dict[str, int] = field(default_factory=dict)
    #: Its payments, oldest (sequence 0: at finalization) first (loaded under the lock).
    payments: list[Payment] = field(default_factory=list)
    #: The refunds of all its credit notes, in the order recorded (loaded under the lock).
    refunds: list[Refund] = field(default_factory=list)
    #: The sum of its failed refunds (``refunded`` counts every refund ever recorded).
    refunds_failed: int = 0
    events: list[Event] = field(default_factory=list, compare=False, repr=False)

    @property
    def amount_due(self) -> int:
        return self.total - self.customer_balance_applied

    @property
    def amount_remaining(self) -> int:
        return self.amount_due - self.amount_paid - self.pre_payment_credited

    @property
    def credited_total(self) -> int:
        """The sum of all non-void credit notes on this invoice."""
        return self.pre_payment_credited + self.post_payment_credited

    @property
    def creditable(self) -> int:
        """What may still be credited before the credit notes reach the total."""
        return self.total - self.credited_total

    @property
    def cash(self) -> tuple[PaymentCash, ...]:
        """Each payment's applied cash and what its pending and succeeded refunds took of it."""
        return refunds.cash_of(self.payments, self.refunds)

    @property
    def refundable(self) -> int:
        """Cash actually collected and not refunded (pending or succeeded); balance is not cash."""
        return refunds.refundable(self.cash)

    def refunds_of(self, credit_note_id: str) -> tuple[Refund, ...]:
        """A credit note's refunds as they stand, in the order recorded."""
        return tuple(refund for refund in self.refunds if refund.credit_note_id == credit_note_id)

    def load_credited_by_trigger(self, trigger_type: str, total: object) -> None:
        """Record what the non-void credit notes of ``trigger_type`` add up to (as stored).

        Money is an ``int`` of minor units; anything else (a ``Decimal`` from a
        SQL ``sum``, say) is refused here, where it enters, not deep in a cap.
        """
        if type(total) is not int:
            raise TypeError(f"credited total of {trigger_type} is a {type(total).__name__},"
                            " not an int of minor units")
        self.credited_by_trigger[trigger_type] = total

    def pop_events(self) -> list[Event]:
        """The events recorded since the last call (each is written to the outbox once)."""
        events, self.events = self.events, []
        return events

    def line(self, line_id: str) -> InvoiceLine:
        for line in self.lines:
            if line.id == line_id:
                return line
        raise errors.UnknownInvoiceLine(f"the invoice has no line {line_id!r}")

    def issue(self, priced: PricedCredit) -> CreditNote:
        """Take a priced credit note off this invoice and record what happened.

        ``priced`` was priced against this invoice as it stands (its sequence is
        the next one); the events recorded: ``CreditNoteIssued``, then
        ``InvoicePaid`` when the pre-payment part settled the rest, then one
        ``RefundRequested`` per new (not linked) refund, newest payment first,
        then ``CustomerBalanceCredited`` for its ``credit_amount``.
        """
        note = priced.note
        if note.invoice_id != self.id or note.sequence != self.credit_note_count + 1:
            raise ValueError("the credit note was not priced against this invoice as it stands")
        if sum(refund.amount for refund in note.refunds) != note.refund_amount or any(
                refund.credit_note_id != note.id for refund in note.refunds):
            raise ValueError("the credit note's refunds do not add up to its refund amount")
        refunds.cash_of(self.payments, [*self.refunds, *note.refunds])  # each on a payment it has
        for line, take in zip(note.lines, priced.takes, strict=True):
            if line.invoice_line_id is None:
                continue
            invoice_line = self.line(line.invoice_line_id)
            invoice_line.credited_net += line.net
            invoice_line.credited_tax += line.tax
            invoice_line.credited_quantity += take.quantity
            if take.method is not None:
                invoice_line.credit_method = take.method
            if line.covers_from is not None:
                invoice_line.time_credits = (*invoice_line.time_credits, line.covers_from)
        self._count_for_trigger(note.trigger.type, note.total)
        self.pre_payment_credited += note.pre_payment_amount
        self.post_payment_credited += note.post_payment_amount
        self.refunded += note.refund_amount
        self.refunds += note.refunds
        self.credit_note_count = note.sequence
        became_paid = (self.status is InvoiceStatus.OPEN and note.pre_payment_amount > 0
                       and self.amount_remaining == 0)
        if became_paid:
            self.status = InvoiceStatus.PAID
        self.events.append(CreditNoteIssued(note, self._state()))
        if became_paid:
            self.events.append(InvoicePaid(self.id, note.id, note.trigger))
        self.events += [RefundRequested(
            id=refund.refund_id, invoice_id=self.id, customer_id=self.customer_id,
            credit_note_id=note.id, amount=refund.amount, currency=note.currency,
            trigger=note.trigger, payment_id=refund.payment_id,
        ) for refund in note.refunds if not refund.linked]
        if note.credit_amount > 0:
            self.events.append(CustomerBalanceCredited(
                customer_id=self.customer_id, invoice_id=self.id, currency=self.currency,
                amount=note.credit_amount, reason=BalanceReason.CREDIT_NOTE, trigger=note.trigger,
                credit_note_id=note.id, effective_at=note.effective_at))
        return note

    def void_credit_note(self, note: CreditNote, trigger: Trigger, *,
                         now: datetime | None = None) -> CreditNote:
        """Void a wholly pre-payment credit note of this open invoice, restoring what it took.

        Raises a Rejection (``AlreadyVoid``, ``NotVoidable``) before changing anything.
        The void journal is dated by :func:`fact_date` (``now`` None: the event's time,
        else when stored), never before the note's ``effective_at``.
        """
        if note.status is CreditNoteStatus.VOID:
            raise errors.AlreadyVoid(f"credit note {note.number} is already void")
        if self.status is not InvoiceStatus.OPEN:
            raise errors.NotVoidable(
                f"credit note {note.number} cannot be voided: its invoice is {self.status}"
            )
        if note.post_payment_amount > 0:
            raise errors.NotVoidable(
                f"credit note {note.number} cannot be voided: part of it was post-payment"
            )
        lines = [(line, self.line(line.invoice_line_id)) for line in note.lines
                 if line.invoice_line_id is not None]
        for line, invoice_line in lines:
            invoice_line.give_back(line.net, line.tax, line.quantity or 0, line.covers_from)
        self.pre_payment_credited -= note.total
        self._count_for_trigger(note.trigger.type, -note.total)
        voided = note.voided(by=trigger)
        self.events.append(CreditNoteVoided(voided, self._state(), trigger,
                                            effective_at=fact_date(trigger, now,
                                                                   not_before=note.effective_at)))
        return voided

    def _count_for_trigger(self, kind: str, amount: int) -> None:
        credited = self.credited_by_trigger.get(kind, 0) + amount
        if credited:
            self.credited_by_trigger[kind] = credited
        else:
            self.credited_by_trigger.pop(kind, None)

    def _state(self) -> InvoiceState:
        return InvoiceState(amount_remaining=self.amount_remaining, status=self.status.value)

    def receive_payment(self, payment_id: str | None, amount: int, currency: str,
                        trigger: Trigger, *, now: datetime | None = None) -> Receipt:
        """Record a payment, never refused for the invoice's state (docs/rules.md, Payments).

        Another currency: ``PaymentCurrencyMismatch``; the same ``payment_id``
        with another amount: ``PaymentConflict`` (both before any change); the
        same again: ``Receipt.DUPLICATE``, no effect. A new one is applied up to
        the amount remaining (the invoice may become ``paid``); the rest is an
        overpayment, recorded as ``CustomerBalanceCredited`` (reason ``overpayment``).
        No ``invoice.paid`` is published: the payment's sender knows it was paid.
        The overpayment is dated by :func:`fact_date`.
        """
        if amount <= 0:
            raise errors.InvalidMessage("a payment amount must be positive")
        if currency != self.currency:
            raise errors.PaymentCurrencyMismatch(
                f"the payment is in {currency} but the invoice is in {self.currency}")
        receipt = payments.classify(self.payments, payment_id, amount)
        if receipt is Receipt.CONFLICT:
            raise errors.PaymentConflict(
                "the invoice has a payment with this payment_id and another amount")
        if receipt is Receipt.DUPLICATE:
            return receipt
        payment, application = payments.receive(self.payments, payment_id, amount,
                                                self.amount_remaining, self.status, trigger)
        self.payments.append(payment)
        self.amount_paid += application.applied
        if application.settles_invoice:
            self.status = InvoiceStatus.PAID
        if application.overpayment:
            self.events.append(CustomerBalanceCredited(
                customer_id=self.customer_id, invoice_id=self.id, currency=self.currency,
                amount=application.overpayment, reason=BalanceReason.OVERPAYMENT,
                trigger=trigger, payment_id=payment_id, effective_at=fact_date(trigger, now)))
        return receipt

    def settle_refund(self, refund_id: str, outcome: RefundState, trigger: Trigger, *,
                      failure_reason: str | None = None,
                      settlement: FailureSettlement = FailureSettlement.CUSTOMER_BALANCE,
                      now: datetime, not_before: datetime | None = None) -> Transition:
        """Apply a refund's outcome (docs/rules.md, Refunds), dated by :func:`fact_date`
        (``not_before``: its credit note's ``effective_at``).

        Unknown refund: ``RefundNotFound``; the opposite of a final outcome:
        ``RefundStateConflict`` (both before any change); the same again:
        ``Transition.DUPLICATE``, no effect. Applied: the refund is replaced in
        ``refunds``; a failure gives its payment's cash back (``refunds_failed``
        grows) and is settled again as ``settlement``. Records
        ``CreditNoteRefundSucceeded`` or ``CreditNoteRefundFailed`` (with the
        credit note's ``refund_status`` after it), then ``CustomerBalanceCredited``
        (reason ``refund_failed``) when it went to the balance.
        """
        if outcome is RefundState.PENDING:
            raise ValueError("an outcome is succeeded or failed")
        position = next((index for index, refund in enumerate(self.refunds)
                         if refund.refund_id == refund_id), None)
        if position is None:
            raise errors.RefundNotFound("the invoice has no refund with this id (yet)")
        refund = self.refunds[position]
        step = refunds.transition(refund.state, outcome)
        if step is Transition.CONFLICT:
            raise errors.RefundStateConflict(
                f"the refund is {refund.state} already; an outcome is final")
        if step is Transition.DUPLICATE:
            return step
        at = fact_date(trigger, now, not_before=not_before) or now
        failed = outcome is RefundState.FAILED
        settled = refund.settled(outcome, failure_reason=failure_reason if failed else None,
                                 resettled_to=settlement if failed else None, by=trigger, at=at)
        self.refunds[position] = settled
        if failed:
            self.refunds_failed += settled.amount
        self._record_outcome(settled, trigger, at)
        return step

    def _record_outcome(self, settled: Refund, trigger: Trigger, at: datetime) -> None:
        status = refunds.refund_status(other.state
                                       for other in self.refunds_of(settled.credit_note_id))
        journal = refund_journal(settled)
        if settled.resettled_to is None:
            self.events.append(CreditNoteRefundSucceeded(
                credit_note_id=settled.credit_note_id, invoice_id=self.id,
                refund_id=settled.refund_id, payment_id=settled.payment_id,
                amount=settled.amount, refund_status=status, journal=journal, effective_at=at,
                trigger=trigger))
            return
        self.events.append(CreditNoteRefundFailed(
            credit_note_id=settled.credit_note_id, invoice_id=self.id,
            refund_id=settled.refund_id, payment_id=settled.payment_id, amount=settled.amount,
            refund_status=status, journal=journal, effective_at=at, trigger=trigger,
            failure_reason=settled.failure_reason, resettled_to=settled.resettled_to))
        if settled.to_customer_balance:
            self.events.append(CustomerBalanceCredited(
                customer_id=self.customer_id, invoice_id=self.id, currency=self.currency,
                amount=settled.to_customer_balance, reason=BalanceReason.REFUND_FAILED,
                trigger=trigger, credit_note_id=settled.credit_note_id,
                refund_id=settled.refund_id, payment_id=settled.payment_id, effective_at=at))

    def update_credit_note(self, note: CreditNote, trigger: Trigger, *, memo: str | None = None,
                           memo_set: bool = False,
                           metadata_patch: Mapping[str, str | None] | None = None) -> CreditNote:
        """The credit note with its memo (when ``memo_set``) and merged metadata; records
        ``CreditNoteUpdated``. Any status, void included. A merged metadata beyond
        issue's limits: ``InvalidMessage``."""
        if note.invoice_id != self.id:
            raise ValueError("the credit note is not this invoice's")
        metadata = merged_metadata(note.metadata, metadata_patch or {})
        if len(metadata) > METADATA_MAX_KEYS or any(
                len(key) > METADATA_MAX_KEY_LENGTH
                or (isinstance(value, str) and len(value) > METADATA_MAX_VALUE_LENGTH)
                for key, value in metadata.items()):
            raise errors.InvalidMessage(
                f"the metadata after the update would exceed {METADATA_MAX_KEYS} keys of "
                f"{METADATA_MAX_KEY_LENGTH} characters with values of {METADATA_MAX_VALUE_LENGTH}")
        updated = replace(note, memo=memo if memo_set else note.memo, metadata=metadata)
        self.events.append(CreditNoteUpdated(updated, trigger))
        return updated

    def void(self) -> None:
        self._transition(InvoiceStatus.VOID, allowed_from={InvoiceStatus.OPEN,
                                                           InvoiceStatus.UNCOLLECTIBLE})

    def mark_uncollectible(self) -> None:
        self._transition(InvoiceStatus.UNCOLLECTIBLE, allowed_from={InvoiceStatus.OPEN})

    def _transition(self, target: InvoiceStatus, allowed_from: set[InvoiceStatus]) -> None:
        if self.status is target:
            return
        if self.status not in allowed_from:
            raise errors.InvalidInvoiceTransition(
                f"an invoice cannot go from {self.status} to {target}"
            )
        self.status = target


def discount_total(subtotal: int, discounts: tuple[Discount, ...]) -> int:
    """All invoice-level discounts as one amount, never more than the subtotal."""
    total = 0
    for discount in discounts:
        if discount.percent_off_bps is not None:
            total += money.basis_points(subtotal, discount.percent_off_bps)
        if discount.amount_off is not None:
            total += discount.amount_off
    return min(total, subtotal)


def finalize_invoice(command: FinalizeInvoice) -> Invoice:
    """Price a finalized invoice as docs/rules.md says, refusing a differing stated total."""
    if not command.lines:
        raise errors.InvalidMessage("an invoice needs at least one line")
    if any(line.quantity <= 0 or line.unit_amount < 0 or line.tax_rate_bps < 0
           for line in command.lines):
        raise errors.InvalidMessage("invoice lines need a positive quantity and no negative amounts")
    if any(value < 0 for discount in command.discounts
           for value in (discount.percent_off_bps or 0, discount.amount_off or 0)):
        raise errors.InvalidMessage("discounts cannot be negative")
    if command.customer_balance_applied < 0 or (command.amount_paid or 0) < 0:
        raise errors.InvalidMessage("customer_balance_applied and amount_paid cannot be negative")
    if len({line.id for line in command.lines}) != len(command.lines):
        raise errors.InvalidMessage("invoice line ids must be unique")
    subtotal = sum(line.quantity * line.unit_amount for line in command.lines)
    discount = discount_total(subtotal, command.discounts)
    shares = money.allocate(discount, [line.quantity * line.unit_amount for line in command.lines])
    lines = [_price_line(position, draft, share)
             for position, (draft, share) in enumerate(zip(command.lines, shares, strict=True))]
    tax = sum(line.tax for line in lines)
    total = subtotal - discount + tax
    if command.stated_total is not None and command.stated_total != total:
        raise errors.InvoiceTotalMismatch(
            "the stated total differs from the total computed from the lines, discounts and tax"
        )
    if command.customer_balance_applied > total:
        raise errors.InvalidMessage("customer_balance_applied exceeds the invoice total")
    status, amount_paid = _status_and_paid(InvoiceStatus(command.status), command.amount_paid,
                                           total - command.customer_balance_applied)
    return Invoice(
        id=command.invoice_id,
        number=command.number,
        customer_id=command.customer_id,
        currency=command.currency,
        status=status,
        lines=lines,
        subtotal=subtotal,
        discount=discount,
        tax=tax,
        total=total,
        customer_balance_applied=command.customer_balance_applied,
        amount_paid=amount_paid,
        payments=[payment] if (payment := finalization_payment(amount_paid)) else [],
    )


def _status_and_paid(status: InvoiceStatus, amount_paid: int | None,
                     amount_due: int) -> tuple[InvoiceStatus, int]:
    """Status and amount paid that agree (docs/rules.md), or ``InvoiceInconsistent``.

    ``paid`` without ``amount_paid`` was paid in full; ``paid`` with another
    amount than the amount due, or any amount above it, is refused; ``open``
    with nothing left to pay is ``paid``.
    """
    if amount_paid is None:
        amount_paid = amount_due if status is InvoiceStatus.PAID else 0
    if amount_paid > amount_due:
        raise errors.InvoiceInconsistent("amount_paid exceeds the amount due")
    if status is InvoiceStatus.PAID and amount_paid != amount_due:
        raise errors.InvoiceInconsistent("a paid invoice's amount_paid differs from its amount due")
    if status is InvoiceStatus.OPEN and amount_paid == amount_due:
        status = InvoiceStatus.PAID
    return status, amount_paid


def _price_line(position: int, draft: DraftLine, discount: int) -> InvoiceLine:
    net = draft.quantity * draft.unit_amount - discount
    return InvoiceLine(
        id=draft.id,
        position=position,
        description=draft.description,
        quantity=draft.quantity,
        unit_amount=draft.unit_amount,
        tax_rate_bps=draft.tax_rate_bps,
        period=draft.period,
        discount=discount,
        tax=money.basis_points(net, draft.tax_rate_bps),
    )


def fact_date(trigger: Trigger, now: datetime | None, *,
              not_before: datetime | None = None) -> datetime | None:
    """The accounting date of a fact (an outcome, a void, an overpayment), which is never
    refused for its date: the event's ``time`` but not after ``now`` (when processed) and
    not before ``not_before`` (the credit note's ``effective_at``). None: neither known."""
    at = trigger.time
    if at is None or (now is not None and at > now):
        at = now
    if at is not None and not_before is not None and at < not_before:
        at = not_before
    return at
