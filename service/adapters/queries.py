"""Read-only queries for ops commands (``creditnotes preview``, ``creditnotes invoice show``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from service.adapters.unit_of_work import credit_note_from_rows, invoice_from_rows
from service.domain.credit_note import CreditNote
from service.domain.invoice import Invoice


@dataclass(frozen=True)
class PublishedEvent:
    type: str
    event_id: str
    topic: str
    created_at: Any
    published_at: Any
    data: dict[str, Any]


async def load_invoice(connection: asyncpg.Connection, invoice_id: str) -> Invoice | None:
    row = await connection.fetchrow("SELECT * FROM invoices WHERE id = $1", invoice_id)
    if row is None:
        return None
    lines = await connection.fetch(
        "SELECT * FROM invoice_lines WHERE invoice_id = $1 ORDER BY position", invoice_id)
    return invoice_from_rows(row, lines)


async def credit_notes_of(connection: asyncpg.Connection, invoice_id: str) -> list[CreditNote]:
    rows = await connection.fetch(
        "SELECT * FROM credit_notes WHERE invoice_id = $1 ORDER BY sequence", invoice_id)
    notes = []
    for row in rows:
        lines = await connection.fetch(
            "SELECT * FROM credit_note_lines WHERE credit_note_id = $1 ORDER BY position",
            row["id"])
        notes.append(credit_note_from_rows(row, lines))
    return notes


async def events_of(connection: asyncpg.Connection, invoice_id: str) -> list[PublishedEvent]:
    rows = await connection.fetch(
        "SELECT * FROM outbox WHERE key = $1 ORDER BY seq", invoice_id)
    return [PublishedEvent(row["type"], row["event_id"], row["topic"], row["created_at"],
                           row["published_at"], json.loads(row["payload"]).get("data", {}))
            for row in rows]
