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
from service.domain.commands import ServicePeriod, Trigger
from service.domain.credit_note import (
    CreditNote,
    CreditNoteLine,
    CreditNoteStatus,
    JournalLine,
    Reason,
)
from service.domain.events import Event
from service.domain.invoice import CreditMethod, Invoice, InvoiceLine, InvoiceStatus
from service.handlers import Delivery
from service.settings import Topics

Connection = asyncpg.Connection | PoolConnectionProxy


class PostgresUnitOfWork:
    def __init__(self, pool: asyncpg.Pool, topics: Topics) -> None:
        self._pool = pool
        self._topics = topics
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            raise RuntimeError("the unit of work is used outside its transaction")
        return self._connection

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self._pool.acquire() as connection, connection.transaction():
            self._connection = connection
            try:
                yield
            finally:
                self._connection = None

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """One message's changes; a value PostgreSQL refuses makes that message undeliverable."""
        try:
            async with self.connection.transaction():
                yield
        except asyncpg.DataError as error:  # SQLSTATE class 22: the data, not the database
            raise errors.InvalidMessage(
                f"the database refused a value in the message (SQLSTATE {error.sqlstate})"
            ) from None

    async def claim(self, trigger: Trigger, delivery: Delivery) -> bool:
        """Take the upstream event's idempotency key; False when it was taken before."""
        claimed = await self.connection.fetchval(
            """
            INSERT INTO processed_messages
                (source, id, type, topic, kafka_partition, kafka_offset, outcome)
            VALUES ($1, $2, $3, $4, $5, $6, 'applied')
            ON CONFLICT (source, id) DO NOTHING
            RETURNING true
            """,
            trigger.source, trigger.id, trigger.type, delivery.topic, delivery.partition,
            delivery.offset,
        )
        return bool(claimed)

    async def record_outcome(self, trigger: Trigger, outcome: str) -> None:
        await self.connection.execute(
            "UPDATE processed_messages SET outcome = $3 WHERE source = $1 AND id = $2",
            trigger.source, trigger.id, outcome,
        )

    async def lock_invoices(self, invoice_ids: Sequence[str]) -> None:
        if invoice_ids:
            await self.connection.execute(
                "SELECT 1 FROM invoices WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                list(invoice_ids),
            )

    async def get_invoice_for_update(self, invoice_id: str) -> Invoice | None:
        row = await self.connection.fetchrow(
            "SELECT * FROM invoices WHERE id = $1 FOR UPDATE", invoice_id)
        if row is None:
            return None
        lines = await self.connection.fetch(
            "SELECT * FROM invoice_lines WHERE invoice_id = $1 ORDER BY position", invoice_id)
        return invoice_from_rows(row, lines)

    async def add_invoice(self, invoice: Invoice) -> None:
        await self.connection.execute(
            """
            INSERT INTO invoices (id, number, customer_id, currency, status, subtotal, discount,
                                  tax, total, customer_balance_applied, amount_paid)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
            """,
            invoice.id, invoice.number, invoice.customer_id, invoice.currency,
            invoice.status.value, invoice.subtotal, invoice.discount, invoice.tax,
            invoice.total, invoice.customer_balance_applied, invoice.amount_paid,
        )
        await self.connection.executemany(
            """
            INSERT INTO invoice_lines (invoice_id, line_id, position, description, quantity,
                unit_amount, tax_rate_bps, period_start, period_end, discount, tax)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
            """,
            [(invoice.id, line.id, line.position, line.description, line.quantity,
              line.unit_amount, line.tax_rate_bps,
              line.period.start if line.period else None,
              line.period.end if line.period else None, line.discount, line.tax)
             for line in invoice.lines],
        )

    async def save_invoice(self, invoice: Invoice) -> None:
        await self.connection.execute(
            """
            UPDATE invoices SET status = $2, amount_paid = $3, pre_payment_credited = $4,
                post_payment_credited = $5, refunded = $6, credit_note_count = $7,
                updated_at = now()
            WHERE id = $1
            """,
            invoice.id, invoice.status.value, invoice.amount_paid, invoice.pre_payment_credited,
            invoice.post_payment_credited, invoice.refunded, invoice.credit_note_count,
        )
        await self.connection.executemany(
            """
            UPDATE invoice_lines SET credited_net = $3, credited_tax = $4,
                credited_quantity = $5, credit_method = $6
            WHERE invoice_id = $1 AND line_id = $2
            """,
            [(invoice.id, line.id, line.credited_net, line.credited_tax,
              line.credited_quantity, line.credit_method.value if line.credit_method else None)
             for line in invoice.lines],
        )

    async def get_credit_note(self, credit_note_id: str) -> CreditNote | None:
        row = await self.connection.fetchrow(
            "SELECT * FROM credit_notes WHERE id = $1", credit_note_id)
        if row is None:
            return None
        lines = await self.connection.fetch(
            "SELECT * FROM credit_note_lines WHERE credit_note_id = $1 ORDER BY position",
            credit_note_id)
        return credit_note_from_rows(row, lines)

    async def add_credit_note(self, note: CreditNote) -> None:
        await self.connection.execute(
            """
            INSERT INTO credit_notes (id, invoice_id, sequence, number, customer_id, currency,
                status, reason, subtotal, tax, total, pre_payment_amount, refund_amount,
                credit_amount, out_of_band_amount, refund_id, trigger_source, trigger_id,
                trigger_type, policy, memo, metadata)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                    $17, $18, $19, $20, $21, $22::jsonb)
            """,
            note.id, note.invoice_id, note.sequence, note.number, note.customer_id,
            note.currency, note.status.value, note.reason.value, note.subtotal, note.tax,
            note.total, note.pre_payment_amount, note.refund_amount, note.credit_amount,
            note.out_of_band_amount, note.refund_id, note.trigger.source, note.trigger.id,
            note.trigger.type, note.policy, note.memo, json.dumps(note.metadata),
        )
        await self.connection.executemany(
            """
            INSERT INTO credit_note_lines (credit_note_id, position, invoice_line_id,
                description, quantity, unit_amount, tax_rate_bps, net, tax)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            """,
            [(note.id, position, line.invoice_line_id, line.description, line.quantity,
              line.unit_amount, line.tax_rate_bps, line.net, line.tax)
             for position, line in enumerate(note.lines)],
        )
        await self._add_journal(note.id, "issue", note.journal)

    async def save_voided_credit_note(self, note: CreditNote, trigger: Trigger) -> None:
        await self.connection.execute(
            """
            UPDATE credit_notes SET status = 'void', voided_at = now(),
                voided_by_source = $2, voided_by_id = $3
            WHERE id = $1
            """,
            note.id, trigger.source, trigger.id,
        )
        await self._add_journal(note.id, "void", note.void_journal)

    async def add_events(self, events: Sequence[Event]) -> None:
        outgoing = [encode(event, self._topics) for event in events]
        await self.connection.executemany(
            """
            INSERT INTO outbox (event_id, topic, key, type, payload)
            VALUES ($1, $2, $3, $4, $5::json)
            """,
            [(event.id, event.topic, event.key, event.type, json.dumps(event.cloudevent))
             for event in outgoing],
        )

    async def _add_journal(self, note_id: str, entry: str,
                           journal: tuple[JournalLine, ...]) -> None:
        await self.connection.executemany(
            """
            INSERT INTO journal_lines (credit_note_id, entry, position, account, debit, credit)
            VALUES ($1, $2, $3, $4, $5, $6)
            """,
            [(note_id, entry, position, line.account.value, line.debit, line.credit)
             for position, line in enumerate(journal)],
        )


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
