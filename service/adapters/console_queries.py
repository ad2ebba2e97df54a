"""Read-only SQL for the ops console and its HTTP API (``service.entrypoints.console``).

Nothing here writes: the console changes money only through commands on
``credit-note-commands`` (its own audit rows are ``console_audit``'s). What
``creditnotes invoice show`` already reads is reused from :mod:`queries`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg

from service.adapters import queries
from service.adapters.outbox_relay import Backlog, backlog
from service.adapters.unit_of_work import credit_note_from_rows
from service.domain.credit_note import CreditNote

#: The most rows one page of a list holds.
MAX_PAGE = 200


@dataclass(frozen=True)
class OutboxEvent:
    """An event the service wrote for an invoice, and where it stands on its way out."""

    seq: int
    event_id: str
    topic: str
    key: str | None
    type: str
    created_at: datetime
    published_at: datetime | None
    parked_at: datetime | None
    park_error: str | None
    held_behind: int | None
    data: dict[str, Any]

    @property
    def state(self) -> str:
        """``published``, ``pending`` (the relay sends it next), ``parked`` (the broker
        refused it for good) or ``held`` (waits behind a parked row of its key)."""
        if self.published_at is not None:
            return "published"
        if self.parked_at is None:
            return "pending"
        return "held" if self.held_behind is not None else "parked"


async def events_of(connection: asyncpg.Connection, invoice_id: str,
                    customer_id: str | None) -> list[OutboxEvent]:
    """The outbox rows of the invoice (keyed by it, or its ``customer_balance.credited``
    keyed by the customer), in the order written."""
    rows = await connection.fetch(
        "SELECT seq, event_id, topic, key, type, created_at, published_at, parked_at,"
        " park_error, held_behind, payload FROM outbox"
        " WHERE key = $1 OR (key = $2 AND type = 'customer_balance.credited'"
        " AND json_extract_path_text(payload, 'data', 'invoice_id') = $1) ORDER BY seq",
        invoice_id, customer_id)
    return [_event(row) for row in rows]


def _event(row: asyncpg.Record) -> OutboxEvent:
    payload = json.loads(row["payload"])
    data = payload.get("data") if isinstance(payload, dict) else None
    return OutboxEvent(row["seq"], row["event_id"], row["topic"], row["key"], row["type"],
                       row["created_at"], row["published_at"], row["parked_at"],
                       row["park_error"], row["held_behind"],
                       data if isinstance(data, dict) else {})


@dataclass(frozen=True)
class Arrival:
    """When a fact reached the service, and the upstream event that told it."""

    received_at: datetime
    trigger_source: str | None = None
    trigger_id: str | None = None


async def arrivals(connection: asyncpg.Connection, invoice_id: str
                   ) -> tuple[datetime | None, dict[int, Arrival]]:
    """When the invoice was stored, and each of its payments (by sequence) with its event."""
    received = await connection.fetchval("SELECT created_at FROM invoices WHERE id = $1",
                                         invoice_id)
    rows = await connection.fetch(
        "SELECT sequence, received_at, trigger_source, trigger_id FROM payments"
        " WHERE invoice_id = $1", invoice_id)
    return received, {row["sequence"]: Arrival(row["received_at"], row["trigger_source"],
                                                row["trigger_id"]) for row in rows}


async def credit_note(connection: asyncpg.Connection, id_or_number: str) -> CreditNote | None:
    """A credit note by its id or its number, with its lines and refunds."""
    row = await connection.fetchrow(
        "SELECT * FROM credit_notes WHERE id = $1 OR number = $1 ORDER BY id = $1 DESC LIMIT 1",
        id_or_number)
    if row is None:
        return None
    lines = await connection.fetch(
        "SELECT * FROM credit_note_lines WHERE credit_note_id = $1 ORDER BY position", row["id"])
    note = credit_note_from_rows(row, lines)
    refunds = await queries.refunds_of(connection, note.invoice_id)
    return replace(note, refunds=tuple(r for r in refunds if r.credit_note_id == note.id))


async def invoice_of_credit_note(connection: asyncpg.Connection, credit_note_id: str
                                 ) -> str | None:
    """The invoice id of a credit note (by id only: a command names the id)."""
    value: str | None = await connection.fetchval(
        "SELECT invoice_id FROM credit_notes WHERE id = $1", credit_note_id)
    return value


@dataclass(frozen=True)
class NoteRow:
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
    trigger_type: str
    policy: str | None
    issued_at: datetime
    refund_states: tuple[str, ...]


@dataclass(frozen=True)
class NoteQuery:
    """What a list of credit notes is narrowed to (None: any)."""

    invoice_id: str | None = None
    customer_id: str | None = None
    reason: str | None = None
    status: str | None = None
    issued_from: datetime | None = None
    issued_to: datetime | None = None


async def list_credit_notes(connection: asyncpg.Connection, query: NoteQuery,
                            after: tuple[datetime, str] | None, limit: int) -> list[NoteRow]:
    """Newest first, paged by ``(issued_at, id)`` of the last row of the previous page
    (keyset: a page costs the same however deep, and a note issued meanwhile moves nothing)."""
    rows = await connection.fetch(
        """SELECT n.id, n.number, n.invoice_id, n.customer_id, n.currency, n.status, n.reason,
                  n.total, n.pre_payment_amount, n.refund_amount, n.credit_amount,
                  n.out_of_band_amount, n.trigger_type, n.policy, n.issued_at,
                  coalesce((SELECT array_agg(r.status ORDER BY r.refund_id) FROM refunds AS r
                            WHERE r.credit_note_id = n.id), '{}') AS refund_states
             FROM credit_notes AS n
            WHERE ($1::text IS NULL OR n.invoice_id = $1)
              AND ($2::text IS NULL OR n.customer_id = $2)
              AND ($3::text IS NULL OR n.reason = $3)
              AND ($4::text IS NULL OR n.status = $4)
              AND ($5::timestamptz IS NULL OR n.issued_at >= $5)
              AND ($6::timestamptz IS NULL OR n.issued_at < $6)
              AND ($7::timestamptz IS NULL OR (n.issued_at, n.id) < ($7, $8::text))
            ORDER BY n.issued_at DESC, n.id DESC
            LIMIT $9""",
        query.invoice_id, query.customer_id, query.reason, query.status, query.issued_from,
        query.issued_to, after[0] if after else None, after[1] if after else None,
        min(limit, MAX_PAGE))
    return [NoteRow(**{**dict(row), "refund_states": tuple(row["refund_states"])})
            for row in rows]


@dataclass(frozen=True)
class CommandOutcome:
    """What the service's ledger says of one upstream event (``source`` + ``id``)."""

    outcome: str  # applied, rejected:<code>, dead_lettered:<reason>, duplicate:<what>, released:*
    type: str
    topic: str
    processed_at: datetime


async def command_outcome(connection: asyncpg.Connection, source: str, event_id: str
                          ) -> CommandOutcome | None:
    row = await connection.fetchrow(
        "SELECT outcome, type, topic, processed_at FROM processed_messages"
        " WHERE source = $1 AND id = $2", source, event_id)
    return CommandOutcome(**dict(row)) if row is not None else None


async def credit_note_issued_by(connection: asyncpg.Connection, source: str, event_id: str
                                ) -> str | None:
    """The id of the credit note one upstream event issued, if it did."""
    value: str | None = await connection.fetchval(
        "SELECT id FROM credit_notes WHERE trigger_source = $1 AND trigger_id = $2",
        source, event_id)
    return value


async def rejection_of(connection: asyncpg.Connection, source: str, event_id: str,
                       invoice_id: str | None) -> tuple[str, str] | None:
    """The reason and message of the ``credit_note.rejected`` one event caused (while the
    outbox still holds it: published rows are pruned after the retention period)."""
    row = await connection.fetchrow(
        "SELECT payload FROM outbox WHERE type = 'credit_note.rejected'"
        " AND ($3::text IS NULL OR key = $3)"
        " AND json_extract_path_text(payload, 'data', 'trigger', 'source') = $1"
        " AND json_extract_path_text(payload, 'data', 'trigger', 'id') = $2"
        " ORDER BY seq DESC LIMIT 1", source, event_id, invoice_id)
    if row is None:
        return None
    data = json.loads(row["payload"]).get("data", {})
    return str(data.get("reason", "")), str(data.get("message", ""))


@dataclass(frozen=True)
class ReplayRow:
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


async def replay_history(connection: asyncpg.Connection, limit: int,
                         operator: str | None = None) -> list[ReplayRow]:
    """The newest replay audit rows (``dlq_replays``), optionally of one operator."""
    rows = await connection.fetch(
        "SELECT replay_run, replayed_by, replayed_at, sent_at, state, dlq_topic,"
        " dlq_partition, dlq_offset, original_topic, original_partition, original_offset,"
        " reason, record_key FROM dlq_replays WHERE ($2::text IS NULL OR replayed_by = $2)"
        " ORDER BY replayed_at DESC, dlq_topic, dlq_partition, dlq_offset LIMIT $1",
        min(limit, MAX_PAGE), operator)
    return [ReplayRow(**dict(row)) for row in rows]


@dataclass(frozen=True)
class ReasonCount:
    topic: str
    reason: str
    count: int
    last_at: datetime


@dataclass(frozen=True)
class PolicyCount:
    trigger_type: str
    policy: str
    credit_notes: int
    total: int


@dataclass(frozen=True)
class Health:
    outbox: Backlog
    pending_refunds: queries.PendingRefunds
    rejections: list[ReasonCount]
    dead_letters: list[ReasonCount]
    policies: list[PolicyCount]
    invoices_at_cap: dict[str, int]


async def health(connection: asyncpg.Connection, caps_bps: dict[str, int]) -> Health:
    """The database's side of flow health; ``caps_bps``: the policy cap per trigger type."""
    outcomes = await connection.fetch(
        "SELECT topic, split_part(outcome, ':', 1) AS kind,"
        " substr(outcome, strpos(outcome, ':') + 1) AS reason, count(*) AS count,"
        " max(processed_at) AS last_at FROM processed_messages"
        " WHERE outcome LIKE 'rejected:%' OR outcome LIKE 'dead_lettered:%'"
        " GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 3")
    policies = await connection.fetch(
        "SELECT trigger_type, policy, count(*) AS credit_notes, sum(total)::bigint AS total"
        " FROM credit_notes WHERE policy IS NOT NULL AND status = 'issued'"
        " GROUP BY 1, 2 ORDER BY 1, 2")
    at_cap = await connection.fetch(
        "SELECT t.trigger_type, count(*) AS invoices FROM invoice_trigger_credit_totals AS t"
        " JOIN invoices AS i ON i.id = t.invoice_id"
        " JOIN unnest($1::text[], $2::int[]) AS c(trigger_type, bps)"
        "   ON c.trigger_type = t.trigger_type"
        # the cap as money.basis_points rounds it (half away from zero; never negative here)
        " WHERE t.total > 0 AND t.total >= (i.total * c.bps + 5000) / 10000"
        " GROUP BY 1", list(caps_bps), list(caps_bps.values()))
    return Health(
        outbox=await backlog(connection),
        pending_refunds=await queries.pending_refunds(connection),
        rejections=[ReasonCount(row["topic"], row["reason"], row["count"], row["last_at"])
                    for row in outcomes if row["kind"] == "rejected"],
        dead_letters=[ReasonCount(row["topic"], row["reason"], row["count"], row["last_at"])
                      for row in outcomes if row["kind"] == "dead_lettered"],
        policies=[PolicyCount(**dict(row)) for row in policies],
        invoices_at_cap={row["trigger_type"]: row["invoices"] for row in at_cap})
