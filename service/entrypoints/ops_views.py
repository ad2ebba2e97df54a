"""``creditnotes preview`` and ``creditnotes invoice show``: readable tables for ops.

``preview`` runs the very domain code the service runs on the invoice as it is
stored now, in memory; nothing is written and nothing is published.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from rich.console import Console, Group
from rich.table import Table

from service.adapters import queries
from service.domain import errors, issuing
from service.domain.commands import IssueCreditNote, Trigger
from service.domain.credit_note import CreditNote
from service.domain.invoice import Invoice
from service.entrypoints import translators, wire


def money(amount: int | None) -> str:
    return "" if amount is None else f"{amount:,}"


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
        console.print(f"[red]no invoice {invoice_id!r}")
        return 2
    remaining_before = invoice.amount_remaining
    try:
        note = issuing.issue_credit_note(invoice, command)
    except errors.Rejection as rejection:
        console.print(f"[red]would be rejected: {rejection.code}[/]: {rejection.message}")
        return 1
    console.print(Group(
        credit_note_table(note, title=f"Preview (nothing saved): credit note {note.number}"),
        journal_table(note),
        f"invoice {invoice.id}: amount remaining {money(remaining_before)} -> "
        f"{money(invoice.amount_remaining)}, status {invoice.status}; events: "
        + ", ".join(type(event).__name__ for event in invoice.events)))
    return 0


def credit_note_table(note: CreditNote, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("line", "description", "quantity", "unit amount", "tax rate (bps)", "net",
                   "tax", "total"):
        table.add_column(column, justify="right" if column not in {"line", "description"}
                         else "left")
    for line in note.lines:
        table.add_row(line.invoice_line_id or "custom", line.description,
                      str(line.quantity or ""), money(line.unit_amount),
                      str(line.tax_rate_bps), money(line.net), money(line.tax),
                      money(line.total))
    table.add_section()
    table.add_row("", f"{note.type}, reason {note.reason}", "", "", "", money(note.subtotal),
                  money(note.tax), money(note.total))
    table.add_row("", f"pre-payment {money(note.pre_payment_amount)}, refund "
                      f"{money(note.refund_amount)}, customer balance {money(note.credit_amount)},"
                      f" out of band {money(note.out_of_band_amount)}")
    return table


def journal_table(note: CreditNote) -> Table:
    table = Table(title="journal", title_justify="left")
    table.add_column("account")
    table.add_column("debit", justify="right")
    table.add_column("credit", justify="right")
    for entry in note.journal:
        table.add_row(entry.account.value, money(entry.debit or None), money(entry.credit or None))
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
        console.print(f"[red]no invoice {invoice_id!r}")
        return 1
    console.print(invoice_table(invoice), lines_table(invoice), notes_table(notes),
                  events_table(events))
    return 0


def invoice_table(invoice: Invoice) -> Table:
    table = Table(title=f"Invoice {invoice.id} ({invoice.number})", title_justify="left",
                  show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    for name, value in (
            ("customer", invoice.customer_id), ("currency", invoice.currency),
            ("status", invoice.status.value), ("subtotal", money(invoice.subtotal)),
            ("discount", money(invoice.discount)), ("tax", money(invoice.tax)),
            ("total", money(invoice.total)),
            ("customer balance applied", money(invoice.customer_balance_applied)),
            ("amount paid", money(invoice.amount_paid)),
            ("pre-payment credits", money(invoice.pre_payment_credited)),
            ("post-payment credits", money(invoice.post_payment_credited)),
            ("refunded", money(invoice.refunded)),
            ("amount remaining", money(invoice.amount_remaining)),
            ("left to credit", money(invoice.creditable))):
        table.add_row(name, value)
    return table


def lines_table(invoice: Invoice) -> Table:
    table = Table(title="lines", title_justify="left")
    for column in ("line", "description", "quantity", "unit amount", "discount", "net", "tax",
                   "credited net", "credited tax", "credited qty", "credited by"):
        table.add_column(column)
    for line in invoice.lines:
        table.add_row(line.id, line.description, str(line.quantity), money(line.unit_amount),
                      money(line.discount), money(line.net), money(line.tax),
                      money(line.credited_net), money(line.credited_tax),
                      str(line.credited_quantity),
                      line.credit_method.value if line.credit_method else "")
    return table


def notes_table(notes: list[CreditNote]) -> Table:
    table = Table(title="credit notes", title_justify="left")
    for column in ("number", "status", "type", "reason", "total", "pre-payment", "refund",
                   "balance", "out of band", "trigger"):
        table.add_column(column)
    for note in notes:
        table.add_row(note.number, note.status.value, note.type.value, note.reason.value,
                      money(note.total), money(note.pre_payment_amount),
                      money(note.refund_amount), money(note.credit_amount),
                      money(note.out_of_band_amount),
                      f"{note.trigger.type} {note.trigger.source} {note.trigger.id}")
    return table


def events_table(events: list[queries.PublishedEvent]) -> Table:
    table = Table(title="events out", title_justify="left")
    for column in ("type", "id", "topic", "written", "published", "detail"):
        table.add_column(column)
    for event in events:
        detail = event.data.get("number") or event.data.get("reason") or ""
        if event.type == "refund.requested":
            detail = f"amount {money(event.data.get('amount'))}"
        table.add_row(event.type, event.event_id, event.topic,
                      f"{event.created_at:%Y-%m-%d %H:%M:%S}",
                      f"{event.published_at:%H:%M:%S}" if event.published_at else "[red]pending",
                      str(detail))
    return table


def parse_data(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("--data must be a JSON object")
    return value
