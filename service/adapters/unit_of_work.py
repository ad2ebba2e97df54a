"""The PostgreSQL unit of work: one connection, one transaction, savepoints per message.

Everything one message changes (the processed-message row, the invoice, the
credit note with its lines and journal, the outbox rows) is written through
here inside the caller's transaction, so it commits together or not at all.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from service.adapters.event_codec import encode
from service.domain import errors
from service.domain.commands import ServicePeriod, Trigger, VoidCreditNote
from service.domain.credit_note import (
    CreditNote,
    CreditNoteLine,
    CreditNoteStatus,
    Reason,
)
from service.domain.events import Event
from service.domain.invoice import CreditMethod, Invoice, InvoiceLine, InvoiceStatus
from service.handlers import Delivery, Message, invoice_of
from service.settings import Topics

Connection = asyncpg.Connection | PoolConnectionProxy


class PostgresUnitOfWork:
    """One transaction for a batch of messages, writing behind.

    ``prepare`` locks the batch's invoices (sorted by id, so concurrent batches
    never deadlock) and claims every message's idempotency key in one
    statement each; handlers then work on the invoices in memory, and
    everything they recorded is written in a few set-wise statements when the
    transaction commits. A value or constraint PostgreSQL refuses at that
    point raises ``RefusedByDatabase`` for the whole batch (the caller then
    applies it one message at a time).
    """

    def __init__(self, pool: asyncpg.Pool, topics: Topics) -> None:
        self._pool = pool
        self._topics = topics
        self._connection: Connection | None = None
        self._invoices: dict[str, Invoice | None] = {}
        self._notes: dict[str, CreditNote | None] = {}
        self._claimed: set[tuple[str, str]] = set()
        self._used: set[tuple[str, str]] = set()
        self._outcomes: dict[tuple[str, str], str] = {}
        self._new_invoices: list[Invoice] = []
        self._dirty_invoices: dict[str, Invoice] = {}
        self._new_notes: list[CreditNote] = []
        self._voided: list[tuple[CreditNote, Trigger]] = []
        self._events: list[tuple[str, str, str | None, str, str, str | None]] = []
        self._traceparent: str | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            raise RuntimeError("the unit of work is used outside its transaction")
        return self._connection

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self._pool.acquire() as connection:
            self._connection = connection
            try:
                transaction = connection.transaction()
                await transaction.start()
                try:
                    yield
                    await self._flush()
                except BaseException:
                    await transaction.rollback()
                    raise
                await transaction.commit()
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as error:
                raise errors.RefusedByDatabase(
                    f"PostgreSQL refused the effect (SQLSTATE {error.sqlstate})") from None
            finally:
                self._connection = None

    async def prepare(self, messages: Sequence[Message]) -> None:
        """Lock the batch's invoices in a stable order, then claim its messages' keys."""
        void_ids = [m.command.credit_note_id for m in messages
                    if isinstance(m.command, VoidCreditNote)]
        if void_ids:
            rows = await self.connection.fetch(
                "SELECT id, invoice_id FROM credit_notes WHERE id = ANY($1::text[])", void_ids)
            note_invoices = [row["invoice_id"] for row in rows]
        else:
            note_invoices = []
        invoice_ids = sorted({invoice_of(m.command) for m in messages} - {""}
                             | set(note_invoices))
        await self._load_invoices(invoice_ids)
        if void_ids:
            await self._load_credit_notes(void_ids)
        keys = sorted({(m.command.trigger.source, m.command.trigger.id): m for m in messages}
                      .items())
        rows = await self.connection.fetch(
            """
            INSERT INTO processed_messages
                (source, id, type, topic, kafka_partition, kafka_offset, outcome)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[],
                                 $6::bigint[], $7::text[])
            ON CONFLICT (source, id) DO UPDATE
                SET outcome = 'applied', type = EXCLUDED.type, topic = EXCLUDED.topic,
                    kafka_partition = EXCLUDED.kafka_partition,
                    kafka_offset = EXCLUDED.kafka_offset, processed_at = now()
                WHERE processed_messages.outcome LIKE 'released:%'
            RETURNING source, id
            """,
            [key[0] for key, _ in keys], [key[1] for key, _ in keys],
            [m.command.trigger.type for _, m in keys], [m.delivery.topic for _, m in keys],
            [m.delivery.partition for _, m in keys], [m.delivery.offset for _, m in keys],
            ["applied"] * len(keys),
        )
        self._claimed = {(row["source"], row["id"]) for row in rows}

    async def claim(self, trigger: Trigger, delivery: Delivery) -> bool:
        """Whether this message is the first to carry its key (in the ledger and the batch)."""
        key = (trigger.source, trigger.id)
        self._traceparent = delivery.traceparent  # the events this message writes carry it
        if key not in self._claimed or key in self._used:
            return False
        self._used.add(key)
        return True

    async def release(self, trigger: Trigger, reason: str) -> None:
        """Give back the key of a message that will be dead-lettered, so a replay can apply it."""
        self._outcomes[(trigger.source, trigger.id)] = f"released:{reason}"

    async def record_outcome(self, trigger: Trigger, outcome: str) -> None:
        self._outcomes[(trigger.source, trigger.id)] = outcome

    async def get_invoice_for_update(self, invoice_id: str) -> Invoice | None:
        if invoice_id not in self._invoices:
            await self._load_invoices([invoice_id])
        return self._invoices[invoice_id]

    async def add_invoice(self, invoice: Invoice) -> None:
        self._invoices[invoice.id] = invoice
        self._new_invoices.append(invoice)

    async def save_invoice(self, invoice: Invoice) -> None:
        self._dirty_invoices[invoice.id] = invoice

    async def get_credit_note(self, credit_note_id: str) -> CreditNote | None:
        if credit_note_id not in self._notes:
            await self._load_credit_notes([credit_note_id])
        return self._notes[credit_note_id]

    async def add_credit_note(self, note: CreditNote) -> None:
        self._notes[note.id] = note
        self._new_notes.append(note)

    async def save_voided_credit_note(self, note: CreditNote, trigger: Trigger) -> None:
        self._notes[note.id] = note
        self._voided.append((note, trigger))

    async def add_events(self, events: Sequence[Event]) -> None:
        for event in events:
            outgoing = encode(event, self._topics)
            self._events.append((outgoing.id, outgoing.topic, outgoing.key, outgoing.type,
                                 json.dumps(outgoing.cloudevent), self._traceparent))

    async def _load_invoices(self, invoice_ids: Sequence[str]) -> None:
        wanted = [invoice_id for invoice_id in invoice_ids if invoice_id not in self._invoices]
        if not wanted:
            return
        rows = await self.connection.fetch(
            "SELECT * FROM invoices WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE", wanted)
        lines = await self.connection.fetch(
            "SELECT * FROM invoice_lines WHERE invoice_id = ANY($1::text[])"
            " ORDER BY invoice_id, position", [row["id"] for row in rows])
        by_invoice: dict[str, list[asyncpg.Record]] = {}
        for line in lines:
            by_invoice.setdefault(line["invoice_id"], []).append(line)
        for invoice_id in wanted:
            self._invoices[invoice_id] = None
        for row in rows:
            self._invoices[row["id"]] = invoice_from_rows(row, by_invoice.get(row["id"], []))

    async def _load_credit_notes(self, note_ids: Sequence[str]) -> None:
        wanted = [note_id for note_id in note_ids if note_id not in self._notes]
        rows = await self.connection.fetch(
            "SELECT * FROM credit_notes WHERE id = ANY($1::text[])", wanted)
        lines = await self.connection.fetch(
            "SELECT * FROM credit_note_lines WHERE credit_note_id = ANY($1::text[])"
            " ORDER BY credit_note_id, position", wanted)
        by_note: dict[str, list[asyncpg.Record]] = {}
        for line in lines:
            by_note.setdefault(line["credit_note_id"], []).append(line)
        for note_id in wanted:
            self._notes[note_id] = None
        for row in rows:
            self._notes[row["id"]] = credit_note_from_rows(row, by_note.get(row["id"], []))

    async def _flush(self) -> None:
        """Write everything the batch recorded, parents before children."""
        connection = self.connection
        if self._new_invoices:
            await connection.executemany(_INSERT_INVOICE, [
                (i.id, i.number, i.customer_id, i.currency, i.status.value, i.subtotal,
                 i.discount, i.tax, i.total, i.customer_balance_applied, i.amount_paid)
                for i in self._new_invoices])
            await connection.executemany(_INSERT_INVOICE_LINE, [
                (i.id, line.id, line.position, line.description, line.quantity,
                 line.unit_amount, line.tax_rate_bps,
                 line.period.start if line.period else None,
                 line.period.end if line.period else None, line.discount, line.tax)
                for i in self._new_invoices for line in i.lines])
        if self._new_notes:
            await connection.executemany(_INSERT_CREDIT_NOTE, [
                (n.id, n.invoice_id, n.sequence, n.number, n.customer_id, n.currency,
                 CreditNoteStatus.ISSUED.value, n.reason.value, n.subtotal, n.tax, n.total,
                 n.pre_payment_amount, n.refund_amount, n.credit_amount, n.out_of_band_amount,
                 n.refund_id, n.trigger.source, n.trigger.id, n.trigger.type, n.policy, n.memo,
                 json.dumps(n.metadata))
                for n in self._new_notes])
            await connection.executemany(_INSERT_CREDIT_NOTE_LINE, [
                (n.id, position, line.invoice_line_id, line.description, line.quantity,
                 line.unit_amount, line.tax_rate_bps, line.net, line.tax)
                for n in self._new_notes for position, line in enumerate(n.lines)])
        journal = [(n.id, "issue", position, line.account.value, line.debit, line.credit)
                   for n in self._new_notes for position, line in enumerate(n.journal)]
        if self._voided:
            await connection.executemany(_VOID_CREDIT_NOTE, [
                (n.id, trigger.source, trigger.id) for n, trigger in self._voided])
            journal += [(n.id, "void", position, line.account.value, line.debit, line.credit)
                        for n, _ in self._voided for position, line in enumerate(n.void_journal)]
        if journal:
            await connection.executemany(_INSERT_JOURNAL_LINE, journal)
        new_ids = {invoice.id for invoice in self._new_invoices}
        dirty = [i for i in self._dirty_invoices.values() if i.id not in new_ids]
        if dirty:
            await connection.executemany(_UPDATE_INVOICE, [
                (i.id, i.status.value, i.amount_paid, i.pre_payment_credited,
                 i.post_payment_credited, i.refunded, i.credit_note_count) for i in dirty])
            await connection.executemany(_UPDATE_INVOICE_LINE, [
                (i.id, line.id, line.credited_net, line.credited_tax, line.credited_quantity,
                 line.credit_method.value if line.credit_method else None)
                for i in dirty for line in i.lines])
        if self._events:
            await connection.executemany(_INSERT_OUTBOX, self._events)
        if self._outcomes:
            await connection.executemany(
                "UPDATE processed_messages SET outcome = $3 WHERE source = $1 AND id = $2",
                [(source, id_, outcome) for (source, id_), outcome in self._outcomes.items()])


_INSERT_INVOICE = """
    INSERT INTO invoices (id, number, customer_id, currency, status, subtotal, discount, tax,
                          total, customer_balance_applied, amount_paid)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
"""
_INSERT_INVOICE_LINE = """
    INSERT INTO invoice_lines (invoice_id, line_id, position, description, quantity,
        unit_amount, tax_rate_bps, period_start, period_end, discount, tax)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
"""
_UPDATE_INVOICE = """
    UPDATE invoices SET status = $2, amount_paid = $3, pre_payment_credited = $4,
        post_payment_credited = $5, refunded = $6, credit_note_count = $7, updated_at = now()
    WHERE id = $1
"""
_UPDATE_INVOICE_LINE = """
    UPDATE invoice_lines SET credited_net = $3, credited_tax = $4, credited_quantity = $5,
        credit_method = $6
    WHERE invoice_id = $1 AND line_id = $2
"""
_INSERT_CREDIT_NOTE = """
    INSERT INTO credit_notes (id, invoice_id, sequence, number, customer_id, currency, status,
        reason, subtotal, tax, total, pre_payment_amount, refund_amount, credit_amount,
        out_of_band_amount, refund_id, trigger_source, trigger_id, trigger_type, policy, memo,
        metadata)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
            $19, $20, $21, $22::jsonb)
"""
_INSERT_CREDIT_NOTE_LINE = """
    INSERT INTO credit_note_lines (credit_note_id, position, invoice_line_id, description,
        quantity, unit_amount, tax_rate_bps, net, tax)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
"""
_VOID_CREDIT_NOTE = """
    UPDATE credit_notes SET status = 'void', voided_at = now(), voided_by_source = $2,
        voided_by_id = $3
    WHERE id = $1
"""
_INSERT_JOURNAL_LINE = """
    INSERT INTO journal_lines (credit_note_id, entry, position, account, debit, credit)
    VALUES ($1, $2, $3, $4, $5, $6)
"""
_INSERT_OUTBOX = """
    INSERT INTO outbox (event_id, topic, key, type, payload, traceparent)
    VALUES ($1, $2, $3, $4, $5::json, $6)
"""


def invoice_from_rows(row: asyncpg.Record, lines: Sequence[asyncpg.Record]) -> Invoice:
    return Invoice(
        id=row["id"], number=row["number"], customer_id=row["customer_id"],
        currency=row["currency"], status=InvoiceStatus(row["status"]),
        lines=[_invoice_line(line) for line in lines],
        subtotal=row["subtotal"], discount=row["discount"], tax=row["tax"], total=row["total"],
        customer_balance_applied=row["customer_balance_applied"],
        amount_paid=row["amount_paid"], pre_payment_credited=row["pre_payment_credited"],
        post_payment_credited=row["post_payment_credited"], refunded=row["refunded"],
        credit_note_count=row["credit_note_count"],
    )


def _invoice_line(row: asyncpg.Record) -> InvoiceLine:
    period = (ServicePeriod(row["period_start"], row["period_end"])
              if row["period_start"] is not None else None)
    method = row["credit_method"]
    return InvoiceLine(
        id=row["line_id"], position=row["position"], description=row["description"],
        quantity=row["quantity"], unit_amount=row["unit_amount"],
        tax_rate_bps=row["tax_rate_bps"], period=period, discount=row["discount"],
        tax=row["tax"], credited_net=row["credited_net"], credited_tax=row["credited_tax"],
        credited_quantity=row["credited_quantity"],
        credit_method=CreditMethod(method) if method else None,
    )


def credit_note_from_rows(row: asyncpg.Record, lines: Sequence[asyncpg.Record]) -> CreditNote:
    metadata: Any = row["metadata"]
    return CreditNote(
        id=row["id"], number=row["number"], sequence=row["sequence"],
        invoice_id=row["invoice_id"], customer_id=row["customer_id"],
        currency=row["currency"], reason=Reason(row["reason"]),
        lines=tuple(
            CreditNoteLine(description=line["description"], net=line["net"], tax=line["tax"],
                           tax_rate_bps=line["tax_rate_bps"],
                           invoice_line_id=line["invoice_line_id"], quantity=line["quantity"],
                           unit_amount=line["unit_amount"])
            for line in lines
        ),
        pre_payment_amount=row["pre_payment_amount"], refund_amount=row["refund_amount"],
        credit_amount=row["credit_amount"], out_of_band_amount=row["out_of_band_amount"],
        trigger=Trigger(row["trigger_source"], row["trigger_id"], row["trigger_type"]),
        refund_id=row["refund_id"], policy=row["policy"], memo=row["memo"],
        metadata=json.loads(metadata) if isinstance(metadata, str) else dict(metadata),
        status=CreditNoteStatus(row["status"]),
    )
