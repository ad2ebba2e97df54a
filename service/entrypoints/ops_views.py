"""``creditnotes preview`` and ``creditnotes invoice show``: readable tables for ops.

``preview`` runs the very domain code the service runs on the invoice as it is
stored now, in memory; nothing is written and nothing is published.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from service.adapters import queries
from service.adapters.event_codec import encode
from service.domain import errors, issuing, refunds
from service.domain.commands import IssueCreditNote, Trigger
from service.domain.credit_note import CreditNote
from service.domain.invoice import Invoice
from service.domain.payments import FINALIZATION_SEQUENCE
from service.entrypoints import translators, wire
from service.entrypoints.display import money
from service.settings import Topics


def preview_command(invoice_id: str, data: dict[str, Any]) -> IssueCreditNote:
    """The command a ``credit_note.issue`` with this data would become."""
    event = wire.CloudEvent(specversion="1.0", id="preview", source="/creditnotes/preview",
                            type="credit_note.issue", data={"invoice_id": invoice_id, **data})
    command = translators.issue(event, Trigger(event.source, event.id, event.type))
    assert isinstance(command, IssueCreditNote)
    return command


async def preview(database_url: str, invoice_id: str, data: dict[str, Any],
                  console: Console) -> int:
    command = preview_command(invoice_id, data)
    connection = await asyncpg.connect(database_url)
    try:
        invoice = await queries.load_invoice(connection, invoice_id)
        taken = await queries.taken_refund_ids(
            connection, [refund.refund_id for refund in command.linked_refunds])
    finally:
        await connection.close()
    if invoice is None:
        console.print(f"[red]no invoice {escape(repr(invoice_id))}")
        return 2
    remaining_before = invoice.amount_remaining
    cash_before = refunds.cash_of(invoice.payments, invoice.refunds)
    try:
        note = issuing.issue_credit_note(invoice, command, taken_refund_ids=taken)
    except errors.Rejection as rejection:
        console.print(f"[red]would be rejected: {rejection.code}[/]: {escape(rejection.message)}")
        return 1
    currency = invoice.currency
    console.print(Group(
        credit_note_table(note, title=f"Preview (nothing saved): credit note {note.number}"),
        journal_table(note),
        *([allocation_table(note, cash_before)] if note.refunds else []),
        f"invoice {escape(invoice.id)}: amount remaining {money(remaining_before, currency)} -> "
        f"{money(invoice.amount_remaining, currency)}, status {invoice.status}; events: "
        + ", ".join(encode(event, Topics()).type for event in invoice.events)))
    return 0


def credit_note_table(note: CreditNote, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("line", "description", "quantity", "unit amount", "tax rate (bps)", "net",
                   "tax", "total"):
        table.add_column(column, justify="right" if column not in {"line", "description"}
                         else "left")
    currency = note.currency
    for line in note.lines:
        table.add_row(escape(line.invoice_line_id or "custom"), escape(line.description),
                      str(line.quantity or ""), money(line.unit_amount, currency),
                      str(line.tax_rate_bps), money(line.net, currency),
                      money(line.tax, currency), money(line.total, currency))
    table.add_section()
    table.add_row("", f"{note.type}, reason {note.reason}", "", "", "",
                  money(note.subtotal, currency), money(note.tax, currency),
                  money(note.total, currency))
    table.add_row("", f"pre-payment {money(note.pre_payment_amount, currency)}, refund "
                      f"{money(note.refund_amount, currency)}, customer balance "
                      f"{money(note.credit_amount, currency)}, out of band "
                      f"{money(note.out_of_band_amount, currency)}")
    return table


def allocation_table(note: CreditNote, cash: tuple[refunds.PaymentCash, ...]) -> Table:
    """Where the refund part goes: one refund per payment, linked ones first, then newest first,
    with what of each payment is left to refund before and after."""
    table = Table(title=f"refund allocation ({money(note.refund_amount, note.currency)})",
                  title_justify="left")
    for column in ("payment", "applied", "refundable before", "refund", "refundable after",
                   "refund id", "linked", "status"):
        table.add_column(column, justify="right" if column in {
            "applied", "refundable before", "refund", "refundable after"} else "left")
    left = {payment.sequence: payment.refundable for payment in cash}
    applied = {payment.sequence: payment.applied for payment in cash}
    currency = note.currency
    for refund in note.refunds:
        before = left.get(refund.payment_sequence, 0)
        left[refund.payment_sequence] = before - refund.amount
        table.add_row(payment_label(refund.payment_sequence, refund.payment_id),
                      money(applied.get(refund.payment_sequence), currency),
                      money(before, currency), money(refund.amount, currency),
                      money(before - refund.amount, currency), escape(refund.refund_id),
                      "yes" if refund.linked else "no", refund.state.value)
    return table


def payment_label(sequence: int, payment_id: str | None) -> str:
    """``pay_1``; the payment recorded with the invoice: ``at finalization``; else ``#<n>``."""
    if payment_id is not None:
        return escape(payment_id)
    return "at finalization" if sequence == FINALIZATION_SEQUENCE else f"#{sequence} (no id)"


def journal_table(note: CreditNote) -> Table:
    table = Table(title="journal", title_justify="left")
    table.add_column("account")
    table.add_column("debit", justify="right")
    table.add_column("credit", justify="right")
    for entry in note.journal:
        table.add_row(entry.account.value, money(entry.debit or None, note.currency),
                      money(entry.credit or None, note.currency))
    return table


async def show_invoice(database_url: str, invoice_id: str, console: Console) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        invoice = await queries.load_invoice(connection, invoice_id)
        notes = await queries.credit_notes_of(connection, invoice_id)
        events = await queries.events_of(connection, invoice_id,
                                         invoice.customer_id if invoice else None)
    finally:
        await connection.close()
    if invoice is None:
        console.print(f"[red]no invoice {escape(repr(invoice_id))}")
        return 1
    console.print(invoice_table(invoice), lines_table(invoice), payments_table(invoice),
                  notes_table(notes, invoice.currency), refunds_table(invoice, notes),
                  events_table(events, invoice.currency))
    return 0


def invoice_table(invoice: Invoice) -> Table:
    table = Table(title=f"Invoice {escape(invoice.id)} ({escape(invoice.number)})",
                  title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    currency = invoice.currency
    for name, value in (
            ("customer", escape(invoice.customer_id)), ("currency", currency.upper()),
            ("status", invoice.status.value), ("subtotal", money(invoice.subtotal, currency)),
            ("discount", money(invoice.discount, currency)),
            ("tax", money(invoice.tax, currency)), ("total", money(invoice.total, currency)),
            ("customer balance applied", money(invoice.customer_balance_applied, currency)),
            ("amount paid", money(invoice.amount_paid, currency)),
            ("pre-payment credits", money(invoice.pre_payment_credited, currency)),
            ("post-payment credits", money(invoice.post_payment_credited, currency)),
            ("refunded", money(invoice.refunded, currency)),
            ("refunds failed", money(invoice.refunds_failed, currency)),
            ("amount remaining", money(invoice.amount_remaining, currency)),
            ("left to credit", money(invoice.creditable, currency))):
        table.add_row(name, value)
    return table


def lines_table(invoice: Invoice) -> Table:
    table = Table(title="lines", title_justify="left")
    for column in ("line", "description", "quantity", "unit amount", "discount", "net", "tax",
                   "credited net", "credited tax", "credited qty", "credited by"):
        table.add_column(column)
    currency = invoice.currency
    for line in invoice.lines:
        table.add_row(escape(line.id), escape(line.description), str(line.quantity),
                      money(line.unit_amount, currency), money(line.discount, currency),
                      money(line.net, currency), money(line.tax, currency),
                      money(line.credited_net, currency), money(line.credited_tax, currency),
                      str(line.credited_quantity),
                      line.credit_method.value if line.credit_method else "")
    return table


def payments_table(invoice: Invoice) -> Table:
    """Each payment: what came in, what of it was applied, what went to the balance as an
    overpayment, and what of it is refunded (pending or succeeded) or left to refund."""
    table = Table(title="payments", title_justify="left")
    for column in ("payment", "amount", "applied", "overpayment", "refunded", "refundable"):
        table.add_column(column, justify="left" if column == "payment" else "right")
    currency = invoice.currency
    refunded: dict[int, int] = {}  # summed here: a damaged database is shown, not refused
    for refund in invoice.refunds:
        if refund.holds_cash:
            refunded[refund.payment_sequence] = (refunded.get(refund.payment_sequence, 0)
                                                 + refund.amount)
    for payment in invoice.payments:
        taken = refunded.get(payment.sequence, 0)
        table.add_row(payment_label(payment.sequence, payment.payment_id),
                      money(payment.amount, currency), money(payment.applied, currency),
                      money(payment.overpayment, currency), money(taken, currency),
                      money(payment.applied - taken, currency))
    return table


def refunds_table(invoice: Invoice, notes: list[CreditNote]) -> Table:
    """Each refund: its id, credit note, payment, amount, status, and whether it was linked."""
    table = Table(title="refunds", title_justify="left")
    for column in ("refund id", "credit note", "payment", "amount", "status", "linked",
                   "failure"):
        table.add_column(column, justify="right" if column == "amount" else "left")
    numbers = {note.id: note.number for note in notes}
    for refund in invoice.refunds:
        failure = ""
        if refund.resettled_to is not None:
            failure = f"settled to {refund.resettled_to.value}" + (
                f": {refund.failure_reason}" if refund.failure_reason else "")
        table.add_row(escape(refund.refund_id),
                      escape(numbers.get(refund.credit_note_id, refund.credit_note_id)),
                      payment_label(refund.payment_sequence, refund.payment_id),
                      money(refund.amount, invoice.currency), refund.state.value,
                      "yes" if refund.linked else "no", escape(failure))
    return table


def notes_table(notes: list[CreditNote], currency: str) -> Table:
    table = Table(title="credit notes", title_justify="left")
    for column in ("number", "status", "type", "reason", "total", "pre-payment", "refund",
                   "refund status", "balance", "out of band", "trigger"):
        table.add_column(column)
    for note in notes:
        table.add_row(escape(note.number), note.status.value, note.type.value, note.reason.value,
                      money(note.total, currency), money(note.pre_payment_amount, currency),
                      money(note.refund_amount, currency), note.refund_status.value,
                      money(note.credit_amount, currency),
                      money(note.out_of_band_amount, currency),
                      escape(f"{note.trigger.type} {note.trigger.source} {note.trigger.id}"))
    return table


def events_table(events: list[queries.PublishedEvent], currency: str) -> Table:
    table = Table(title="events out", title_justify="left")
    for column in ("type", "id", "topic", "written", "published", "detail"):
        table.add_column(column)
    for event in events:
        detail = event.data.get("number") or event.data.get("reason") or ""
        if event.type == "refund.requested":
            detail = (f"refund {event.data.get('id')} amount "
                      f"{money(event.data.get('amount'), currency)} on payment "
                      f"{event.data.get('payment_id') or 'without id'}")
        elif event.type in {"credit_note.refund_succeeded", "credit_note.refund_failed"}:
            detail = (f"refund {event.data.get('refund_id')} "
                      f"{money(event.data.get('amount'), currency)}, credit note refund status "
                      f"{event.data.get('refund_status')}")
            if event.data.get("resettled_to"):
                detail += f", settled to {event.data['resettled_to']}"
        elif event.type == "customer_balance.credited":
            detail = (f"{money(event.data.get('amount'), currency)} to "
                      f"{event.data.get('customer_id')}, reason {event.data.get('reason')}")
        table.add_row(event.type, event.event_id, escape(event.topic),
                      f"{event.created_at:%Y-%m-%d %H:%M:%S}",
                      f"{event.published_at:%H:%M:%S}" if event.published_at else "[red]pending",
                      escape(str(detail)))
    return table


def parse_data(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("--data must be a JSON object")
    return value
