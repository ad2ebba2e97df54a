"""Terse builders for invoices, triggers and credit-note commands in unit tests.

Everything goes through the domain's own entry points (``finalize_invoice``,
``issue_credit_note``, ``void_credit_note``, ``Invoice.receive_payment``,
``Invoice.settle_refund``), so a
test built with these helpers exercises exactly what the service runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from service.domain.commands import (
    CustomLine,
    Discount,
    DraftLine,
    FinalizeInvoice,
    InvoiceLineByAmount,
    InvoiceLineByQuantity,
    IssueCreditNote,
    LineRequest,
    OnExcess,
    ServicePeriod,
    Settlement,
    SettlementSplit,
    Trigger,
    VoidCreditNote,
)
from service.domain.credit_note import CreditNote
from service.domain.invoice import Invoice, finalize_invoice
from service.domain.issuing import issue_credit_note, void_credit_note
from service.domain.payments import Receipt
from service.domain.refunds import FailureSettlement, LinkedRefund, RefundState, Transition

INVOICE_ID = "in_1"
INVOICE_NUMBER = "ACME-0042"
CUSTOMER_ID = "cus_1"
CURRENCY = "usd"

_ids = itertools.count(1)

E = TypeVar("E")


def trigger(type_: str = "test.event") -> Trigger:
    """A trigger with an id no other trigger in this test run has."""
    return Trigger(source="tests", id=f"evt_{next(_ids)}", type=type_)


def line(
    id_: str = "L1",
    quantity: int = 1,
    unit_amount: int = 10_000,
    tax_rate_bps: int = 0,
    period: ServicePeriod | None = None,
    description: str | None = None,
) -> DraftLine:
    return DraftLine(
        id=id_,
        description=description or f"line {id_}",
        quantity=quantity,
        unit_amount=unit_amount,
        tax_rate_bps=tax_rate_bps,
        period=period,
    )


def percent_off(bps: int) -> Discount:
    return Discount(percent_off_bps=bps)


def amount_off(amount: int) -> Discount:
    return Discount(amount_off=amount)


def invoice(
    lines: Iterable[DraftLine] | None = None,
    discounts: Iterable[Discount] = (),
    status: str = "open",
    amount_paid: int = 0,
    customer_balance_applied: int = 0,
    currency: str = CURRENCY,
    number: str = INVOICE_NUMBER,
    stated_total: int | None = None,
) -> Invoice:
    """A finalized invoice; by default one open line of 100.00 with no tax."""
    return finalize_invoice(
        FinalizeInvoice(
            trigger=trigger("invoice.finalized"),
            invoice_id=INVOICE_ID,
            number=number,
            customer_id=CUSTOMER_ID,
            currency=currency,
            status=status,
            lines=tuple(lines) if lines is not None else (line(),),
            discounts=tuple(discounts),
            customer_balance_applied=customer_balance_applied,
            amount_paid=amount_paid,
            stated_total=stated_total,
        )
    )


def paid_invoice(**kwargs: Any) -> Invoice:
    """An invoice paid in full through ``receive_payment`` (so it is ``paid``)."""
    built = invoice(**kwargs)
    pay(built, built.amount_remaining)
    return built


def pay(target: Invoice, amount: int, payment_id: str | None = None,
        currency: str | None = None) -> Receipt:
    """``invoice.payment_succeeded`` of ``amount`` on ``target`` (each with its own event)."""
    return target.receive_payment(payment_id, amount, currency or target.currency,
                                  trigger("invoice.payment_succeeded"))


#: The service's clock in unit tests (refund outcomes without an event time are dated so).
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def settle(target: Invoice, refund_id: str, outcome: RefundState,
           settlement: FailureSettlement = FailureSettlement.CUSTOMER_BALANCE,
           failure_reason: str | None = None) -> Transition:
    """``refund.succeeded`` / ``refund.failed`` for ``refund_id`` on ``target``."""
    kind = "refund.succeeded" if outcome is RefundState.SUCCEEDED else "refund.failed"
    return target.settle_refund(refund_id, outcome, trigger(kind), failure_reason=failure_reason,
                                settlement=settlement, now=NOW)


def by_quantity(line_id: str, quantity: int) -> InvoiceLineByQuantity:
    return InvoiceLineByQuantity(invoice_line_id=line_id, quantity=quantity)


def by_amount(line_id: str, amount: int) -> InvoiceLineByAmount:
    return InvoiceLineByAmount(invoice_line_id=line_id, amount=amount)


def custom(description: str, quantity: int, unit_amount: int, tax_rate_bps: int = 0) -> CustomLine:
    return CustomLine(
        description=description,
        quantity=quantity,
        unit_amount=unit_amount,
        tax_rate_bps=tax_rate_bps,
    )


def command(
    amount: int | None = None,
    lines: Iterable[LineRequest] = (),
    settlement: Settlement | SettlementSplit = Settlement.CUSTOMER_BALANCE,
    on_excess: OnExcess = OnExcess.REJECT,
    reason: str = "other",
    currency: str | None = None,
    policy: str | None = None,
    linked: Iterable[tuple[str, int]] = (),
    effective_at: datetime | None = None,
) -> IssueCreditNote:
    return IssueCreditNote(
        trigger=trigger("credit_note.issue"),
        invoice_id=INVOICE_ID,
        reason=reason,
        lines=tuple(lines),
        amount=amount,
        settlement=settlement,
        on_excess=on_excess,
        currency=currency,
        policy=policy,
        linked_refunds=tuple(LinkedRefund(refund_id, amount) for refund_id, amount in linked),
        effective_at=effective_at,
    )


def issue(
    target: Invoice,
    amount: int | None = None,
    lines: Iterable[LineRequest] = (),
    settlement: Settlement | SettlementSplit = Settlement.CUSTOMER_BALANCE,
    on_excess: OnExcess = OnExcess.REJECT,
    reason: str = "other",
    currency: str | None = None,
    policy: str | None = None,
    linked: Iterable[tuple[str, int]] = (),
    taken: Iterable[str] = (),
) -> CreditNote:
    """Issue a credit note on ``target`` (an explicit command unless ``on_excess`` says CAP).

    ``linked``: ``(refund_id, amount)`` refunds to link; ``taken``: the refund ids the
    lock reports as some refund's already.
    """
    return issue_credit_note(
        target,
        command(
            amount=amount,
            lines=lines,
            settlement=settlement,
            on_excess=on_excess,
            reason=reason,
            currency=currency,
            policy=policy,
            linked=linked,
        ),
        now=NOW,
        taken_refund_ids=frozenset(taken),
    )


def void(target: Invoice, note: CreditNote) -> CreditNote:
    return void_credit_note(
        target, note, VoidCreditNote(trigger=trigger("credit_note.void"), credit_note_id=note.id)
    )


def events_of(target: Invoice, kind: type[E]) -> list[E]:
    """The events of one kind the invoice has recorded, in order."""
    return [event for event in target.events if isinstance(event, kind)]


def event_kinds(target: Invoice) -> list[str]:
    return [type(event).__name__ for event in target.events]


def journal_rows(entries: Iterable[Any]) -> list[tuple[str, int, int]]:
    """A journal as ``(account, debit, credit)`` rows, easy to compare."""
    return [(entry.account.value, entry.debit, entry.credit) for entry in entries]
