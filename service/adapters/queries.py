"""Read-only queries for ops commands (``creditnotes preview``, ``creditnotes invoice show``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from service.adapters.unit_of_work import credit_note_from_rows, invoice_from_rows
from service.domain.commands import Trigger
from service.domain.credit_note import CreditNote
from service.domain.invoice import Invoice
from service.domain.payments import Payment
from service.domain.refunds import FailureSettlement, Refund, RefundState


@dataclass(frozen=True)
class PublishedEvent:
    type: str
    event_id: str
    topic: str
    created_at: Any
    published_at: Any
    data: dict[str, Any]


async def load_invoice(connection: asyncpg.Connection, invoice_id: str) -> Invoice | None:
    """The invoice as stored, with its lines, payments and refunds."""
    row = await connection.fetchrow("SELECT * FROM invoices WHERE id = $1", invoice_id)
    if row is None:
        return None
    lines = await connection.fetch(
        "SELECT * FROM invoice_lines WHERE invoice_id = $1 ORDER BY position", invoice_id)
    invoice = invoice_from_rows(row, lines)
    invoice.payments = await payments_of(connection, invoice_id)
    invoice.refunds = await refunds_of(connection, invoice_id)
    invoice.refunds_failed = row["refunds_failed"]
    return invoice


async def payments_of(connection: asyncpg.Connection, invoice_id: str) -> list[Payment]:
    """The invoice's payments, oldest (at finalization) first."""
    rows = await connection.fetch(
        "SELECT sequence, payment_id, amount, applied FROM payments WHERE invoice_id = $1"
        " ORDER BY sequence", invoice_id)
    return [Payment(row["sequence"], row["payment_id"], row["amount"], row["applied"])
            for row in rows]


async def refunds_of(connection: asyncpg.Connection, invoice_id: str) -> list[Refund]:
    """The refunds of the invoice's credit notes: per credit note, linked ones first, then newest
    payment first."""
    rows = await connection.fetch(
        "SELECT r.*, p.payment_id FROM refunds AS r"
        " JOIN payments AS p ON p.invoice_id = r.invoice_id AND p.sequence = r.payment_sequence"
        " JOIN credit_notes AS n ON n.id = r.credit_note_id"
        " WHERE r.invoice_id = $1"
        " ORDER BY n.sequence, NOT r.linked, r.payment_sequence DESC, r.refund_id", invoice_id)
    return [refund_from_row(row) for row in rows]


def refund_from_row(row: asyncpg.Record) -> Refund:
    settled_by = (Trigger(row["outcome_source"], row["outcome_id"], row["outcome_type"])
                  if row["outcome_id"] is not None else None)
    return Refund(
        refund_id=row["refund_id"], credit_note_id=row["credit_note_id"],
        payment_sequence=row["payment_sequence"], payment_id=row["payment_id"],
        amount=row["amount"], linked=row["linked"], state=RefundState(row["status"]),
        failure_reason=row["failure_reason"],
        resettled_to=(FailureSettlement(row["resettled_to"]) if row["resettled_to"] else None),
        settled_by=settled_by, settled_at=row["outcome_at"])


async def taken_refund_ids(connection: asyncpg.Connection, refund_ids: list[str]) -> set[str]:
    """Those of ``refund_ids`` that a refund (of any invoice) already has."""
    rows = await connection.fetch(
        "SELECT refund_id FROM refunds WHERE refund_id = ANY($1::text[])", refund_ids)
    return {row["refund_id"] for row in rows}


async def credit_notes_of(connection: asyncpg.Connection, invoice_id: str) -> list[CreditNote]:
    """The invoice's credit notes in sequence order, each with its lines and refunds."""
    rows = await connection.fetch(
        "SELECT * FROM credit_notes WHERE invoice_id = $1 ORDER BY sequence", invoice_id)
    refunds = await refunds_of(connection, invoice_id)
    notes = []
    for row in rows:
        lines = await connection.fetch(
            "SELECT * FROM credit_note_lines WHERE credit_note_id = $1 ORDER BY position",
            row["id"])
        note = credit_note_from_rows(row, lines)
        notes.append(replace(note, refunds=tuple(
            refund for refund in refunds if refund.credit_note_id == note.id)))
    return notes


async def events_of(connection: asyncpg.Connection, invoice_id: str,
                    customer_id: str | None = None) -> list[PublishedEvent]:
    """The outbox rows of the invoice: keyed by it, or (``customer_balance.credited``, keyed
    by the customer) naming it."""
    rows = await connection.fetch(
        "SELECT * FROM outbox WHERE key = $1 OR (key = $2 AND type = 'customer_balance.credited'"
        " AND json_extract_path_text(payload, 'data', 'invoice_id') = $1) ORDER BY seq",
        invoice_id, customer_id)
    return [PublishedEvent(row["type"], row["event_id"], row["topic"], row["created_at"],
                           row["published_at"], json.loads(row["payload"]).get("data", {}))
            for row in rows]


@dataclass(frozen=True)
class PendingRefunds:
    """Refunds requested and still waiting for their outcome (the ``/metrics`` gauges)."""

    count: int
    oldest_seconds: float


async def pending_refunds(connection: asyncpg.Connection) -> PendingRefunds:
    """How many refunds are pending, and the age of the oldest (0 when none), whole table."""
    row = await connection.fetchrow(
        "SELECT count(*) AS pending, coalesce(extract(epoch FROM now() - min(created_at)), 0)"
        " AS oldest_seconds FROM refunds WHERE status = 'pending'")
    assert row is not None  # an aggregate always answers one row
    return PendingRefunds(row["pending"], float(row["oldest_seconds"]))
