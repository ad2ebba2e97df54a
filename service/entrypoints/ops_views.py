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
from service.domain import errors, issuing
from service.domain.commands import IssueCreditNote, Trigger
from service.domain.credit_note import CreditNote
from service.domain.invoice import Invoice
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
    finally:
        await connection.close()
    if invoice is None:
        console.print(f"[red]no invoice {escape(repr(invoice_id))}")
        return 2
    remaining_before = invoice.amount_remaining
    try:
        note = issuing.issue_credit_note(invoice, command)
    except errors.Rejection as rejection:
        console.print(f"[red]would be rejected: {rejection.code}[/]: {escape(rejection.message)}")
        return 1
    currency = invoice.currency
    console.print(Group(
        credit_note_table(note, title=f"Preview (nothing saved): credit note {note.number}"),
        journal_table(note),
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
        events = await queries.events_of(connection, invoice_id)
    finally:
        await connection.close()
    if invoice is None:
        console.print(f"[red]no invoice {escape(repr(invoice_id))}")
        return 1
    console.print(invoice_table(invoice), lines_table(invoice),
                  notes_table(notes, invoice.currency), events_table(events, invoice.currency))
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


def notes_table(notes: list[CreditNote], currency: str) -> Table:
    table = Table(title="credit notes", title_justify="left")
    for column in ("number", "status", "type", "reason", "total", "pre-payment", "refund",
                   "balance", "out of band", "trigger"):
        table.add_column(column)
    for note in notes:
        table.add_row(escape(note.number), note.status.value, note.type.value, note.reason.value,
                      money(note.total, currency), money(note.pre_payment_amount, currency),
                      money(note.refund_amount, currency), money(note.credit_amount, currency),
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
            detail = f"amount {money(event.data.get('amount'), currency)}"
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
