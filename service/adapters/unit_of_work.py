"""The PostgreSQL unit of work: one connection, one transaction for a batch of messages.

Everything a batch changes (the processed-message rows, the invoices with
their payments and refunds, the credit notes with their lines and journals,
the refunds' outcomes with theirs, the outbox rows) is written through here
inside that transaction, so it commits together or not at all.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from service.adapters.event_codec import encode
from service.adapters.unavailable import mapped_to_unavailable
from service.domain import errors
from service.domain.commands import ServicePeriod, Trigger
from service.domain.credit_note import (
    CreditNote,
    CreditNoteLine,
    CreditNoteStatus,
    Reason,
    refund_journal,
)
from service.domain.events import CreditNoteUpdated, CreditNoteVoided, Event
from service.domain.invoice import CreditMethod, Invoice, InvoiceLine, InvoiceStatus
from service.domain.payments import Payment
from service.domain.refunds import FailureSettlement, Refund, RefundState
from service.ports import Claims, Delivery, Key, Locked, Message, key_of
from service.settings import Topics

Connection = asyncpg.Connection | PoolConnectionProxy
#: SQLSTATE classes that refuse a value or a constraint: data exception, integrity
#: constraint violation, program limit exceeded (an index row too large, say).
REFUSED_CLASSES = frozenset({"22", "23", "54"})


class PooledConnection(asyncpg.Connection):
    """The service pool's connection (``create_pool(connection_class=...)``).

    asyncpg resets a connection going back to its pool with one more round trip
    (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``). A unit of
    work leaves nothing of that behind: everything it runs is inside its
    transaction, which has ended (committed or rolled back) when it says so
    with :meth:`left_no_session_state`; the next release then skips the query.
    Any other use of the pool (the relay's statements, retention's session
    advisory lock and settings) is reset as always.
    """

    _no_session_state = False

    def left_no_session_state(self) -> None:
        self._no_session_state = True

    def get_reset_query(self) -> str:
        if self._no_session_state:
            self._no_session_state = False
            return ""
        query: str = super().get_reset_query()
        return query


def _left_no_session_state(connection: Connection) -> None:
    """Tell a :class:`PooledConnection` (through its pool's proxy) that its transaction
    ended and left no session state; any other connection resets as usual."""
    mark = getattr(connection, "left_no_session_state", None)
    if mark is not None:
        mark()


class PostgresUnitOfWork:
    """One transaction for a batch of messages, writing behind (``service.ports.UnitOfWork``).

    ``lock`` locks invoices (sorted by id, so concurrent batches never
    deadlock) and ``claim`` claims every message's idempotency key, one
    statement each; handlers then work on the invoices in memory, and
    everything they recorded is written in a few set-wise statements when the
    transaction commits, with the events the saved invoices recorded. A value
    or constraint PostgreSQL refuses at that point raises ``RefusedByDatabase``
    for the whole batch (the caller then applies it one message at a time).
    """

    def __init__(self, pool: asyncpg.Pool, topics: Topics,
                 on_commit: Callable[[], None] | None = None) -> None:
        self._pool = pool
        self._topics = topics
        #: called once the transaction committed outbox rows (wakes the relay)
        self._on_commit = on_commit
        self._wrote_outbox = False
        self._connection: Connection | None = None
        self._invoices: dict[str, Invoice | None] = {}
        self._notes: dict[str, CreditNote | None] = {}
        #: the claimed keys, and every key claim() was given with its delivery, in batch order
        self._claimed: frozenset[Key] = frozenset()
        self._deliveries: dict[Key, Delivery] = {}
        self._outcomes: dict[Key, str] = {}
        self._new_invoices: list[Invoice] = []
        self._saved_invoices: dict[str, Invoice] = {}
        self._new_notes: list[CreditNote] = []
        self._voided: list[CreditNote] = []
        self._added_events: list[Event] = []
        #: as read under the lock: each invoice's payment sequences, and every refund by id
        self._stored_payments: dict[str, frozenset[int]] = {}
        self._stored_refunds: dict[str, Refund] = {}
        #: each read invoice line's credit method, as read under the lock
        self._stored_methods: dict[tuple[str, str], CreditMethod | None] = {}

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            raise RuntimeError("the unit of work is used outside its transaction")
        return self._connection

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """The batch's transaction; PostgreSQL's failures come out as ``errors.Unavailable``.

        A value or constraint PostgreSQL refuses (SQLSTATE classes 22, 23, 54)
        is the batch's fault: ``RefusedByDatabase``, with the driver's class name.
        """
        with mapped_to_unavailable("PostgreSQL"):
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
                        _left_no_session_state(connection)
                        raise
                    await transaction.commit()
                    _left_no_session_state(connection)
                    if self._wrote_outbox and self._on_commit is not None:
                        self._on_commit()
                except asyncpg.PostgresError as error:
                    if str(error.sqlstate)[:2] not in REFUSED_CLASSES:
                        raise
                    raise errors.RefusedByDatabase(
                        f"PostgreSQL refused the effect (SQLSTATE {error.sqlstate})",
                        cause=error) from None
                finally:
                    self._connection = None

    async def lock(self, invoice_ids: Collection[str], credit_note_ids: Collection[str] = (),
                   refund_ids: Collection[str] = ()) -> Locked:
        """Lock invoices in a stable order, and read credit notes under their invoices' locks.

        A credit note's invoice is looked up first, unlocked, so that it is
        locked in the same sorted round as the others; the note itself is read
        only once its invoice is locked (see ``_load_credit_notes``). Of
        ``refund_ids``, those some refund already has (of any invoice, committed
        or recorded in this batch) come back as ``taken_refund_ids``.
        """
        note_ids = sorted(set(credit_note_ids))
        unread = [note_id for note_id in note_ids if note_id not in self._notes]
        note_invoices = await self._invoices_of_notes(unread) if unread else set()
        await self._load_invoices(sorted(set(invoice_ids) | note_invoices))
        if note_ids:
            await self._load_credit_notes(note_ids)
        notes = {note_id: self._notes[note_id] for note_id in note_ids}
        wanted = set(invoice_ids) | {note.invoice_id for note in notes.values() if note}
        return Locked({invoice_id: self._invoices[invoice_id] for invoice_id in sorted(wanted)},
                      notes, await self._taken_refund_ids(refund_ids) if refund_ids else frozenset())

    async def _taken_refund_ids(self, refund_ids: Collection[str]) -> frozenset[str]:
        """Read, not locked: a refund id linked meanwhile elsewhere loses on the primary key."""
        rows = await self.connection.fetch(
            "SELECT refund_id FROM refunds WHERE refund_id = ANY($1::text[])", sorted(refund_ids))
        recorded = {refund.refund_id for invoice in self._invoices.values() if invoice
                    for refund in invoice.refunds}
        return frozenset({row["refund_id"] for row in rows} | (recorded & set(refund_ids)))

    async def claim(self, messages: Sequence[Message]) -> Claims:
        """Claim the messages' keys in the ledger, in one statement (``UnitOfWork.claim``)."""
        first: dict[Key, Message] = {}
        for m in messages:  # the first copy of a key is the one that may apply
            first.setdefault(key_of(m.command.trigger), m)
        for key, m in first.items():
            self._deliveries.setdefault(key, m.delivery)
        keys = sorted(first.items())
        # A key is claimed when it is new, released, or dead-lettered by another delivery
        # (a replay); one whose event already had an effect (issued a credit note, recorded
        # a payment, settled a refund, updated a credit note) is a duplicate even after
        # retention pruned its ledger row. A key dead-lettered by this very delivery
        # (topic, partition, offset) is not re-evaluated: its dead letter is sent again.
        rows = await self.connection.fetch(
            """
            WITH claimed AS (
                INSERT INTO processed_messages
                    (source, id, type, topic, kafka_partition, kafka_offset, outcome)
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[],
                                     $6::bigint[], $7::text[])
                ON CONFLICT (source, id) DO UPDATE
                    SET outcome = 'applied', type = EXCLUDED.type, topic = EXCLUDED.topic,
                        kafka_partition = EXCLUDED.kafka_partition,
                        kafka_offset = EXCLUDED.kafka_offset, processed_at = now()
                    WHERE processed_messages.outcome LIKE 'released:%'
                       OR (processed_messages.outcome LIKE 'dead_lettered:%'
                           AND NOT (EXCLUDED.kafka_offset IS NOT NULL
                                    AND (processed_messages.topic,
                                         processed_messages.kafka_partition,
                                         processed_messages.kafka_offset)
                                        IS NOT DISTINCT FROM (EXCLUDED.topic,
                                                              EXCLUDED.kafka_partition,
                                                              EXCLUDED.kafka_offset)))
                RETURNING source, id
            )
            SELECT source, id FROM claimed
            WHERE NOT EXISTS (SELECT FROM credit_notes
                              WHERE trigger_source = claimed.source AND trigger_id = claimed.id)
              AND NOT EXISTS (SELECT FROM payments
                              WHERE trigger_source = claimed.source AND trigger_id = claimed.id)
              AND NOT EXISTS (SELECT FROM refunds
                              WHERE outcome_source = claimed.source AND outcome_id = claimed.id)
              AND NOT EXISTS (SELECT FROM credit_note_updates
                              WHERE trigger_source = claimed.source AND trigger_id = claimed.id)
            """,
            [key[0] for key, _ in keys], [key[1] for key, _ in keys],
            [m.command.trigger.type for _, m in keys], [m.delivery.topic for _, m in keys],
            [m.delivery.partition for _, m in keys], [m.delivery.offset for _, m in keys],
            ["applied"] * len(keys),
        )
        claimed = frozenset((row["source"], row["id"]) for row in rows)
        self._claimed |= claimed
        for key in claimed:  # the delivery that may apply it (a replay claimed later too)
            self._deliveries[key] = first[key].delivery
        dead_lettered: dict[Key, tuple[Delivery, str]] = {}
        if len(claimed) < len(keys):
            for row in await self.connection.fetch(
                    "SELECT source, id, topic, kafka_partition, kafka_offset, outcome"
                    " FROM processed_messages AS p"
                    " JOIN unnest($1::text[], $2::text[]) AS k(source, id) USING (source, id)"
                    " WHERE p.outcome LIKE 'dead_lettered:%' AND p.kafka_offset IS NOT NULL",
                    [key[0] for key, _ in keys], [key[1] for key, _ in keys]):
                dead_lettered[(row["source"], row["id"])] = (
                    Delivery(row["topic"], row["kafka_partition"], row["kafka_offset"]),
                    row["outcome"].removeprefix("dead_lettered:"))
        return Claims(claimed, dead_lettered)

    async def add(self, new: Invoice | CreditNote | Event) -> None:
        if isinstance(new, Invoice):
            self._invoices[new.id] = new
            self._new_invoices.append(new)
        elif isinstance(new, CreditNote):
            self._notes[new.id] = new
            self._new_notes.append(new)
        else:
            self._added_events.append(new)

    async def save(self, changed: Invoice | CreditNote) -> None:
        """A changed invoice, or a credit note voided or updated (see :func:`saved_note`).

        An update's memo and metadata are written from its ``CreditNoteUpdated``
        event (collected from the saved invoice), with its ``credit_note_updates`` row.
        """
        if isinstance(changed, Invoice):
            self._saved_invoices.setdefault(changed.id, changed)
            return
        if saved_note(self._notes.get(changed.id), changed, self._voided):
            self._voided.append(changed)
        self._notes[changed.id] = changed

    async def record(self, message: Message, outcome: str) -> bool:
        """The ledger's outcome of a message (``UnitOfWork.record``).

        For a key not claimed here, a compare-and-set: the key is written
        ``dead_lettered:<reason>`` when it has no row (its transaction was
        rolled back), a released one, or a dead-lettered one (this delivery's
        own, its dead letter is resent; or another delivery's). A row another
        transaction applied or rejected meanwhile (another replica) is left
        alone, and so is the record: it must not be dead-lettered too.
        """
        trigger, delivery = message.command.trigger, message.delivery
        if key_of(trigger) in self._claimed:
            self._outcomes[key_of(trigger)] = outcome
            return True
        reason = outcome.removeprefix("dead_lettered:")
        if reason == outcome:
            raise ValueError(f"only a dead letter is recorded for a key not claimed: {outcome}")
        row = await self.connection.fetchrow(
            """
            INSERT INTO processed_messages
                (source, id, type, topic, kafka_partition, kafka_offset, outcome)
            VALUES ($1, $2, $3, $4, $5, $6, 'dead_lettered:' || $7::text)
            ON CONFLICT (source, id) DO UPDATE
                SET outcome = EXCLUDED.outcome, type = EXCLUDED.type, topic = EXCLUDED.topic,
                    kafka_partition = EXCLUDED.kafka_partition,
                    kafka_offset = EXCLUDED.kafka_offset, processed_at = now()
                WHERE processed_messages.outcome LIKE 'released:%'
                   OR processed_messages.outcome LIKE 'dead_lettered:%'
            RETURNING outcome
            """, trigger.source, trigger.id, trigger.type, delivery.topic, delivery.partition,
            delivery.offset, reason)
        return row is not None

    def _collect_new_events(self) -> list[Event]:
        """The saved invoices' new events and the added ones.

        In the order of the messages that caused them (stable: an invoice's own
        events keep theirs).
        """
        events: list[Event] = list(self._added_events)
        for invoice in [*self._new_invoices, *self._saved_invoices.values()]:
            events += invoice.pop_events()
        order = {key: position for position, key in enumerate(self._deliveries)}
        events.sort(key=lambda event: order.get(key_of(event.trigger), len(order)))
        return events

    def _outbox_rows(self, events: Sequence[Event]
                     ) -> list[tuple[str, str, str | None, str, str, str | None]]:
        """Events as outbox rows, each with its message's trace context."""
        rows = []
        for event in events:
            outgoing = encode(event, self._topics)
            delivery = self._deliveries.get(key_of(event.trigger))
            rows.append((outgoing.id, outgoing.topic, outgoing.key, outgoing.type,
                         outgoing.to_json(), delivery.traceparent if delivery else None))
        return rows

    async def _load_invoices(self, invoice_ids: Sequence[str]) -> None:
        wanted = [invoice_id for invoice_id in invoice_ids if invoice_id not in self._invoices]
        if not wanted:
            return
        rows = await self.connection.fetch(
            "SELECT * FROM invoices WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE", wanted)
        ids = [row["id"] for row in rows]
        # read in one statement once the locks are held (a statement's snapshot is taken when
        # it starts: reading in the locking statement could miss what the batch whose lock it
        # waited for committed)
        details = {row["id"]: row for row in await self.connection.fetch(
            _DETAILS_OF_INVOICES, ids)} if ids else {}
        refunds: dict[str, list[Refund]] = {}
        with_refunds = [invoice_id for invoice_id, row in details.items() if row["has_refunds"]]
        if with_refunds:
            for refund in await self.connection.fetch(_REFUNDS_OF_INVOICES, with_refunds):
                refunds.setdefault(refund["invoice_id"], []).append(refund_from_row(refund))
        for invoice_id in wanted:
            self._invoices[invoice_id] = None
        for row in rows:
            invoice_id = row["id"]
            detail = details[invoice_id]
            payments = [payment_from_row(payment) for payment in detail["payments"]]
            read = self._invoices[invoice_id] = invoice_from_rows(
                row, detail["lines"], payments, refunds.get(invoice_id, []))
            self._stored_methods.update(
                ((invoice_id, line.id), line.credit_method) for line in read.lines)
            self._stored_payments[invoice_id] = frozenset(
                payment.sequence for payment in payments)
            self._stored_refunds.update(
                (refund.refund_id, refund) for refund in refunds.get(invoice_id, []))
            # per trigger type, what its non-void credit notes add up to (policy caps are
            # cumulative); read under the invoices' locks, so no other batch changes it
            for trigger_type, total in zip(detail["credited_types"], detail["credited_totals"],
                                           strict=True):
                read.load_credited_by_trigger(trigger_type, total)

    async def _invoices_of_notes(self, note_ids: Sequence[str]) -> set[str]:
        """The invoices of existing credit notes (read unlocked: a note's invoice never changes)."""
        rows = await self.connection.fetch(
            "SELECT invoice_id FROM credit_notes WHERE id = ANY($1::text[])", note_ids)
        return {row["invoice_id"] for row in rows}

    async def _load_credit_notes(self, note_ids: Sequence[str]) -> None:
        """Read credit notes under their invoices' locks, locking any invoice not locked yet.

        A note is issued and voided under its invoice's lock, so only a note read
        with its invoice locked shows a status no other batch is changing. A note
        created since ``prepare`` looked (another replica issued it) has an invoice
        this batch has not locked: it is locked now, in id order, and the notes are
        read again. That second round may wait on a batch locking in the usual
        order; PostgreSQL then reports a deadlock (40P01), an ``Unavailable`` the
        consumer retries, and the retry finds the note up front in one round.
        """
        wanted = [note_id for note_id in note_ids if note_id not in self._notes]
        if not wanted:
            return
        while True:
            rows = await self.connection.fetch(
                "SELECT * FROM credit_notes WHERE id = ANY($1::text[])", wanted)
            missed = sorted({row["invoice_id"] for row in rows} - self._invoices.keys())
            if not missed:
                break
            await self._load_invoices(missed)
        lines = await self.connection.fetch(
            "SELECT * FROM credit_note_lines WHERE credit_note_id = ANY($1::text[])"
            " ORDER BY credit_note_id, position", wanted)
        by_note: dict[str, list[asyncpg.Record]] = {}
        for line in lines:
            by_note.setdefault(line["credit_note_id"], []).append(line)
        for note_id in wanted:
            self._notes[note_id] = None
        for row in rows:
            invoice = self._invoices[row["invoice_id"]]
            self._notes[row["id"]] = credit_note_from_rows(
                row, by_note.get(row["id"], []),
                [refund for refund in invoice.refunds if refund.credit_note_id == row["id"]]
                if invoice else ())

    async def _flush(self) -> None:
        """Write everything the batch recorded, one set-wise write per table, parents first.

        The steps run in this order: the deferred triggers, the BEFORE triggers
        that read a credit note's row (its lines, journals and refunds are
        written only by the transaction that issued or voided it) and the two-step
        write of a line whose method a void freed depend on it, and the notes' lines
        go before the voids (0018's keeping trigger refuses a line of a note that is
        not issued: the lines of a note issued and voided in one batch are put on,
        then the void takes them off). What no BEFORE trigger reads and no other
        step writes again (the journals, the invoices' figures and lines, the note
        updates, the outbox and the ledger's outcomes) goes out last, in one
        statement of data-modifying CTEs; an empty write is no statement at all.
        """
        events = self._collect_new_events()
        # every invoice the batch created or saved, once (a new one may be saved too)
        touched = list({i.id: i for i in [*self._new_invoices,
                                          *self._saved_invoices.values()]}.values())
        await _execute(self.connection, self._new_invoice_writes())
        await _execute(self.connection, [self._payment_writes(touched)])
        await _execute(self.connection, [self._new_note_writes()])
        # the notes' lines before the voids: 0018 refuses a line of a note that is not issued,
        # so a note this batch issues and voids has its lines put on, then taken off by its void
        await self._write_refunds(touched, self._note_line_writes())
        await _execute(self.connection, [_update_sql(_VOIDS, [
            (n.id, n.voided_by.source, n.voided_by.id) for n in self._voided if n.voided_by])])
        await _execute(self.connection, [self._freed_line_writes()])
        updates = [event for event in events if isinstance(event, CreditNoteUpdated)]
        outbox = self._outbox_rows(events)
        self._wrote_outbox = bool(outbox)
        await _execute(self.connection, [
            self._journal_writes(events), *self._figure_writes(),
            _insert_sql(_CREDIT_NOTE_UPDATES, [
                (u.credit_note.id, u.trigger.source, u.trigger.id, u.credit_note.memo,
                 json.dumps(u.credit_note.metadata)) for u in updates]),
            _insert_sql(_OUTBOX, outbox),
            _update_sql(_OUTCOMES, [(source, id_, outcome)
                                    for (source, id_), outcome in self._outcomes.items()])])
        # an edit is written with its credit_note_updates row (credit_notes_edited_with_update)
        edited = {u.credit_note.id: u.credit_note for u in updates}  # the last of each note
        await _execute(self.connection, [_update_sql(_NOTE_EDITS, [
            (n.id, n.memo, json.dumps(n.metadata)) for n in edited.values()])])

    def _new_invoice_writes(self) -> list[_Write | None]:
        """Insert the invoices the batch created, with their lines."""
        new = self._new_invoices
        return [_insert_sql(_INVOICES, [
            (i.id, i.number, i.customer_id, i.currency, i.status.value, i.subtotal, i.discount,
             i.tax, i.total, i.customer_balance_applied, i.amount_paid) for i in new]),
            _insert_sql(_INVOICE_LINES, [
                (i.id, line.id, line.position, line.description, line.quantity,
                 line.unit_amount, line.tax_rate_bps,
                 _utc(line.period.start) if line.period else None,
                 _utc(line.period.end) if line.period else None, line.discount, line.tax)
                for i in new for line in i.lines])]

    def _payment_writes(self, touched: Sequence[Invoice]) -> _Write | None:
        """Insert the payments recorded on the touched invoices that are not stored yet."""
        return _insert_sql(_PAYMENTS, [
            (i.id, p.sequence, p.payment_id, p.amount, p.applied,
             p.trigger.source if p.trigger else None, p.trigger.id if p.trigger else None)
            for i in touched for p in i.payments
            if p.sequence not in self._stored_payments.get(i.id, frozenset())])

    def _new_note_writes(self) -> _Write | None:
        """Insert the credit notes the batch issued (their lines go in the next statement)."""
        return _insert_sql(_CREDIT_NOTES, [
            (n.id, n.invoice_id, n.sequence, n.number, n.customer_id, n.currency,
             CreditNoteStatus.ISSUED.value, n.reason.value, n.subtotal, n.tax, n.total,
             n.pre_payment_amount, n.refund_amount, n.credit_amount, n.out_of_band_amount,
             n.refund_id, n.trigger.source, n.trigger.id, n.trigger.type, n.policy, n.memo,
             json.dumps(n.metadata), _utc(n.effective_at) if n.effective_at else None)
            for n in self._new_notes])

    def _note_line_writes(self) -> _Write | None:
        return _insert_sql(_CREDIT_NOTE_LINES, [
            (n.id, position, line.invoice_line_id, line.description, line.quantity,
             line.unit_amount, line.tax_rate_bps, line.net, line.tax,
             _utc(line.covers_from) if line.covers_from else None)
            for n in self._new_notes for position, line in enumerate(n.lines)])

    async def _write_refunds(self, touched: Sequence[Invoice], note_lines: _Write | None) -> None:
        """Insert the new refunds (with ``note_lines``, the new notes' lines: no trigger of
        either reads the other), write the outcomes, then the refunds' journal lines."""
        connection = self.connection
        new_refunds, settled = self._changed_refunds(touched)
        # a requested refund is inserted pending (refunds_written_with_their_note), even one
        # this batch settled already: its outcome is the update below, as for any other
        await _execute(connection, [note_lines, _insert_sql(_REFUNDS, [
            (i.id, r.refund_id, r.payment_sequence, r.credit_note_id, r.amount,
             r.state.value if r.linked else RefundState.PENDING.value, r.linked)
            for i, r in new_refunds])])
        await _execute(connection, [_update_sql(_REFUND_OUTCOMES, [
            (r.refund_id, r.state.value, r.failure_reason,
             r.resettled_to.value if r.resettled_to else None,
             r.settled_by.source if r.settled_by else None,
             r.settled_by.id if r.settled_by else None,
             r.settled_by.type if r.settled_by else None,
             _utc(r.settled_at) if r.settled_at else None) for r in settled])])
        await _execute(connection, [_insert_sql(_REFUND_JOURNAL_LINES, [
            (r.refund_id, position, line.account.value, line.debit, line.credit,
             _utc(r.settled_at) if r.settled_at else None)
            for r in [*(r for _, r in new_refunds if r.linked), *settled]
            for position, line in enumerate(refund_journal(r))])])

    def _journal_writes(self, events: Sequence[Event]) -> _Write | None:
        """The issue and void journal lines (after the voids: a void journal needs its void)."""
        void_dates = {event.credit_note.id: event.effective_at for event in events
                      if isinstance(event, CreditNoteVoided)}
        return _insert_sql(_JOURNAL_LINES, [
            (n.id, "issue", position, line.account.value, line.debit, line.credit,
             _utc(n.effective_at) if n.effective_at else None)
            for n in self._new_notes for position, line in enumerate(n.journal)] + [
            (n.id, "void", position, line.account.value, line.debit, line.credit,
             _utc(date) if (date := void_dates.get(n.id)) else None)
            for n in self._voided for position, line in enumerate(n.void_journal)])

    def _freed_line_writes(self) -> _Write | None:
        """A line whose method a void of this batch freed and a later credit fixed anew:
        written freed first (invoice_lines_fixed refuses a switch while anything is
        credited, as one UPDATE of both steps would be), then as the batch left it."""
        return _update_sql(_INVOICE_LINE_CREDITS, [
            (invoice_id, line_id, 0, 0, 0, None, "{}")
            for invoice_id, line_id in switched_methods(
                list(self._saved_invoices.values()), self._stored_methods, self._voided)])

    def _figure_writes(self) -> list[_Write | None]:
        """Update the saved invoices' figures, and their lines' credits."""
        # invoices new in this batch too: they were inserted as finalized, and what the
        # batch credited on them (counters, number count, coverage) is written here
        dirty = list(self._saved_invoices.values())
        return [_update_sql(_INVOICE_FIGURES, [
            (i.id, i.status.value, i.amount_paid, i.pre_payment_credited,
             i.post_payment_credited, i.refunded, i.refunds_failed, i.credit_note_count)
            for i in dirty]),
            _update_sql(_INVOICE_LINE_CREDITS, [
                (i.id, line.id, line.credited_net, line.credited_tax, line.credited_quantity,
                 line.credit_method.value if line.credit_method else None,
                 _timestamps_literal(line.time_credits))
                for i in dirty for line in i.lines])]

    def _changed_refunds(self, invoices: Sequence[Invoice]
                         ) -> tuple[list[tuple[Invoice, Refund]], list[Refund]]:
        """The refunds the batch recorded (with their invoice), and those it settled."""
        new: list[tuple[Invoice, Refund]] = []
        settled: list[Refund] = []
        for invoice in invoices:
            for refund in invoice.refunds:
                stored = self._stored_refunds.get(refund.refund_id)
                if stored is None:
                    new.append((invoice, refund))
                    if not refund.linked and refund.state is not RefundState.PENDING:
                        settled.append(refund)  # requested and settled in this batch
                elif refund != stored:
                    if stored.state is not RefundState.PENDING:
                        raise ValueError(f"refund {refund.refund_id} is settled: it never changes")
                    settled.append(refund)
        return new, settled


def switched_methods(invoices: Sequence[Invoice],
                     stored: Mapping[tuple[str, str], CreditMethod | None],
                     voided: Sequence[CreditNote]) -> list[tuple[str, str]]:
    """The lines (invoice id, line id) whose credit method changed in one transaction, each
    after a void of it freed it (nothing credited: free to choose, or to credit by amount).

    A change with no void of the line among ``voided`` is not returned: storage refuses it.
    """
    freed = {(note.invoice_id, line.invoice_line_id) for note in voided for line in note.lines
             if line.invoice_line_id is not None}
    return [(invoice.id, line.id) for invoice in invoices for line in invoice.lines
            if (invoice.id, line.id) in freed
            and stored.get((invoice.id, line.id)) not in (None, line.credit_method)]


def saved_note(stored: CreditNote | None, changed: CreditNote,
               voided: Sequence[CreditNote]) -> bool:
    """Whether a credit note saved is voided now (True) or edited (False), else ValueError.

    A credit note changes only by being voided, or in its memo and metadata
    (and its refunds' outcomes, written with its invoice's refunds).
    """
    if stored is None:
        raise ValueError("a credit note changes only once read under its invoice's lock")
    if (changed.status is CreditNoteStatus.VOID and stored.status is CreditNoteStatus.ISSUED
            and changed.voided_by is not None and all(note.id != changed.id for note in voided)):
        return True  # (a void note read back says who voided it: edited, not voided again)
    if replace(changed, memo=stored.memo, metadata=stored.metadata,
               refunds=stored.refunds) != stored:
        raise ValueError("a credit note changes only by being voided, or in its memo and metadata")
    return False


@dataclass(frozen=True)
class _Table:
    """A table's columns as (name, PostgreSQL type), for set-wise statements."""

    name: str
    columns: tuple[tuple[str, str], ...]
    keys: int = 0  # for updates: how many leading columns identify the row
    extra_set: str = ""
    #: (column, SQL) written instead of a NULL value, e.g. ("effective_at", "now()")
    fallbacks: tuple[tuple[str, str], ...] = ()

    def value(self, name: str, kind: str) -> str:
        fallback = dict(self.fallbacks).get(name)
        return f"coalesce(v.{name}::{kind}, {fallback})" if fallback else f"v.{name}::{kind}"

    def arrays(self) -> str:
        # an array column travels as its text form (unnest would flatten an array of arrays)
        return ", ".join(f"${n}::{'text' if kind.endswith('[]') else kind}[]"
                         for n, (_, kind) in enumerate(self.columns, 1))

    def names(self) -> str:
        return ", ".join(name for name, _ in self.columns)


#: One set-wise write: its SQL with parameters numbered from ``$1``, and their values.
_Write = tuple[str, list[list[Any]]]


def _insert_sql(table: _Table, rows: Sequence[tuple[Any, ...]]) -> _Write | None:
    """All rows in one INSERT: column arrays unnested server-side (None: no rows)."""
    if not rows:
        return None
    casts = ", ".join(table.value(name, kind) for name, kind in table.columns)
    return (f"INSERT INTO {table.name} ({table.names()}) SELECT {casts}"
            f" FROM unnest({table.arrays()}) AS v({table.names()})", _columns(table, rows))


def _update_sql(table: _Table, rows: Sequence[tuple[Any, ...]]) -> _Write | None:
    """All rows in one UPDATE ... FROM unnest(...), matched on the leading key columns."""
    if not rows:
        return None
    keys, values = table.columns[:table.keys], table.columns[table.keys:]
    assignments = ", ".join([f"{name} = {table.value(name, kind)}" for name, kind in values]
                            + ([table.extra_set] if table.extra_set else []))
    match = " AND ".join(f"t.{name} = v.{name}" for name, _ in keys)
    return (f"UPDATE {table.name} AS t SET {assignments}"
            f" FROM unnest({table.arrays()}) AS v({table.names()}) WHERE {match}",
            _columns(table, rows))


_PARAMETER = re.compile(r"\$(\d+)")


def _renumbered(sql: str, offset: int) -> str:
    return _PARAMETER.sub(lambda match: f"${int(match.group(1)) + offset}", sql)


async def _execute(connection: Connection, writes: Sequence[_Write | None]) -> None:
    """The writes in one statement (nothing when all are empty): the first ones as
    data-modifying CTEs of the last, their parameters renumbered after each other's.

    They run as one command: none sees another's rows (a BEFORE trigger of one must
    not read what another writes), and no two may write the same row.
    """
    present = [write for write in writes if write is not None]
    if not present:
        return
    parts: list[str] = []
    arguments: list[Any] = []
    for sql, values in present:
        offset = len(arguments)
        parts.append(_renumbered(sql, offset) if offset else sql)
        arguments += values
    *ctes, last = parts
    with_clause = ("WITH " + ", ".join(f"w{n} AS ({cte})" for n, cte in enumerate(ctes)) + " "
                   if ctes else "")
    await connection.execute(with_clause + last, *arguments)


def _columns(table: _Table, rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)] if rows else [
        [] for _ in table.columns]


_INVOICES = _Table("invoices", (
    ("id", "text"), ("number", "text"), ("customer_id", "text"), ("currency", "text"),
    ("status", "text"), ("subtotal", "bigint"), ("discount", "bigint"), ("tax", "bigint"),
    ("total", "bigint"), ("customer_balance_applied", "bigint"), ("amount_paid", "bigint")))
_INVOICE_LINES = _Table("invoice_lines", (
    ("invoice_id", "text"), ("line_id", "text"), ("position", "integer"),
    ("description", "text"), ("quantity", "bigint"), ("unit_amount", "bigint"),
    ("tax_rate_bps", "integer"), ("period_start", "timestamptz"),
    ("period_end", "timestamptz"), ("discount", "bigint"), ("tax", "bigint")))
_CREDIT_NOTES = _Table("credit_notes", (
    ("id", "text"), ("invoice_id", "text"), ("sequence", "integer"), ("number", "text"),
    ("customer_id", "text"), ("currency", "text"), ("status", "text"), ("reason", "text"),
    ("subtotal", "bigint"), ("tax", "bigint"), ("total", "bigint"),
    ("pre_payment_amount", "bigint"), ("refund_amount", "bigint"), ("credit_amount", "bigint"),
    ("out_of_band_amount", "bigint"), ("refund_id", "text"), ("trigger_source", "text"),
    ("trigger_id", "text"), ("trigger_type", "text"), ("policy", "text"), ("memo", "text"),
    ("metadata", "jsonb"), ("effective_at", "timestamptz")),
    fallbacks=(("effective_at", "now()"),))
_CREDIT_NOTE_LINES = _Table("credit_note_lines", (
    ("credit_note_id", "text"), ("position", "integer"), ("invoice_line_id", "text"),
    ("description", "text"), ("quantity", "bigint"), ("unit_amount", "bigint"),
    ("tax_rate_bps", "integer"), ("net", "bigint"), ("tax", "bigint"),
    ("covers_from", "timestamptz")))
_JOURNAL_LINES = _Table("journal_lines", (
    ("credit_note_id", "text"), ("entry", "text"), ("position", "integer"), ("account", "text"),
    ("debit", "bigint"), ("credit", "bigint"), ("effective_at", "timestamptz")),
    fallbacks=(("effective_at", "now()"),))
_PAYMENTS = _Table("payments", (
    ("invoice_id", "text"), ("sequence", "integer"), ("payment_id", "text"),
    ("amount", "bigint"), ("applied", "bigint"), ("trigger_source", "text"),
    ("trigger_id", "text")))
_REFUNDS = _Table("refunds", (
    ("invoice_id", "text"), ("refund_id", "text"), ("payment_sequence", "integer"),
    ("credit_note_id", "text"), ("amount", "bigint"), ("status", "text"), ("linked", "boolean")))
_REFUND_OUTCOMES = _Table("refunds", (
    ("refund_id", "text"), ("status", "text"), ("failure_reason", "text"),
    ("resettled_to", "text"), ("outcome_source", "text"), ("outcome_id", "text"),
    ("outcome_type", "text"), ("outcome_at", "timestamptz")), keys=1,
    fallbacks=(("outcome_at", "now()"),))
_REFUND_JOURNAL_LINES = _Table("refund_journal_lines", (
    ("refund_id", "text"), ("position", "integer"), ("account", "text"), ("debit", "bigint"),
    ("credit", "bigint"), ("effective_at", "timestamptz")),
    fallbacks=(("effective_at", "now()"),))
_CREDIT_NOTE_UPDATES = _Table("credit_note_updates", (
    ("credit_note_id", "text"), ("trigger_source", "text"), ("trigger_id", "text"),
    ("memo", "text"), ("metadata", "jsonb")))
# updated_at is set by the database (credit_notes_edited_with_update, migration 0016)
_NOTE_EDITS = _Table("credit_notes", (
    ("id", "text"), ("memo", "text"), ("metadata", "jsonb")), keys=1)
_OUTBOX = _Table("outbox", (
    ("event_id", "text"), ("topic", "text"), ("key", "text"), ("type", "text"),
    ("payload", "json"), ("traceparent", "text")))
_VOIDS = _Table("credit_notes", (
    ("id", "text"), ("voided_by_source", "text"), ("voided_by_id", "text")), keys=1,
    extra_set="status = 'void', voided_at = now()")
_INVOICE_FIGURES = _Table("invoices", (
    ("id", "text"), ("status", "text"), ("amount_paid", "bigint"),
    ("pre_payment_credited", "bigint"), ("post_payment_credited", "bigint"),
    ("refunded", "bigint"), ("refunds_failed", "bigint"), ("credit_note_count", "integer")),
    keys=1,
    extra_set="updated_at = now()")
_INVOICE_LINE_CREDITS = _Table("invoice_lines", (
    ("invoice_id", "text"), ("line_id", "text"), ("credited_net", "bigint"),
    ("credited_tax", "bigint"), ("credited_quantity", "bigint"), ("credit_method", "text"),
    ("time_credits", "timestamptz[]")), keys=2)
_OUTCOMES = _Table("processed_messages", (
    ("source", "text"), ("id", "text"), ("outcome", "text")), keys=2)


def _timestamps_literal(times: Sequence[datetime]) -> str:
    """A ``timestamptz[]`` as PostgreSQL's text form (ISO times in UTC)."""
    return "{" + ",".join(f'"{_utc(time).isoformat()}"' for time in times) + "}"


def _utc(time: datetime) -> datetime:
    """A time as written: in UTC (RFC 3339 allows offsets to +-23:59, PostgreSQL +-15:59)."""
    return time.astimezone(UTC)


#: What a locked invoice (of ``$1``) holds: its lines and payments (rows of their tables),
#: what its issued credit notes add up to per trigger type (bigint: minor units; kept by the
#: database, migration 0018's invoice_trigger_credit_totals: a type whose notes are all void
#: keeps a row of 0, left out as the sum over no notes was), and whether it has refunds
#: (read with ``_REFUNDS_OF_INVOICES`` only then).
_DETAILS_OF_INVOICES = """
    SELECT i.id,
           ARRAY(SELECT l FROM invoice_lines AS l WHERE l.invoice_id = i.id
                 ORDER BY l.position) AS lines,
           ARRAY(SELECT p FROM payments AS p WHERE p.invoice_id = i.id
                 ORDER BY p.sequence) AS payments,
           c.types AS credited_types, c.totals AS credited_totals,
           EXISTS (SELECT FROM refunds AS r WHERE r.invoice_id = i.id) AS has_refunds
      FROM unnest($1::text[]) AS i(id)
      CROSS JOIN LATERAL (
          SELECT coalesce(array_agg(t.trigger_type ORDER BY t.trigger_type), '{}') AS types,
                 coalesce(array_agg(t.total ORDER BY t.trigger_type), '{}') AS totals
            FROM invoice_trigger_credit_totals AS t
           WHERE t.invoice_id = i.id AND t.total <> 0) AS c
"""

#: The refunds of some invoices (``$1``), each with its payment's id and, for a linked one,
#: its credit note's date; in the order recorded: by credit note, then as a credit note
#: lists them (linked first, then newest payment first).
_REFUNDS_OF_INVOICES = """
    SELECT r.*, p.payment_id, n.effective_at AS note_effective_at
      FROM refunds AS r
      JOIN payments AS p ON p.invoice_id = r.invoice_id AND p.sequence = r.payment_sequence
      JOIN credit_notes AS n ON n.id = r.credit_note_id
     WHERE r.invoice_id = ANY($1::text[])
     ORDER BY r.invoice_id, n.sequence, r.linked DESC, r.payment_sequence DESC, r.refund_id
"""


def payment_from_row(row: asyncpg.Record) -> Payment:
    trigger = (Trigger(row["trigger_source"], row["trigger_id"], "invoice.payment_succeeded")
               if row["trigger_id"] is not None else None)
    return Payment(sequence=row["sequence"], payment_id=row["payment_id"], amount=row["amount"],
                   applied=row["applied"], trigger=trigger)


def refund_from_row(row: asyncpg.Record) -> Refund:
    """A refund from a row of ``_REFUNDS_OF_INVOICES`` (or any with ``payment_id``).

    A linked refund's date is its credit note's ``effective_at`` (``note_effective_at``).
    """
    settled_by = (Trigger(row["outcome_source"], row["outcome_id"], row["outcome_type"])
                  if row["outcome_id"] is not None else None)
    settled_at = row["outcome_at"]
    if row["linked"]:
        settled_at = row.get("note_effective_at", settled_at)
    resettled_to = row["resettled_to"]
    return Refund(
        refund_id=row["refund_id"], credit_note_id=row["credit_note_id"],
        payment_sequence=row["payment_sequence"], payment_id=row["payment_id"],
        amount=row["amount"], linked=row["linked"], state=RefundState(row["status"]),
        failure_reason=row["failure_reason"],
        resettled_to=FailureSettlement(resettled_to) if resettled_to else None,
        settled_by=settled_by, settled_at=settled_at)


def invoice_from_rows(row: asyncpg.Record, lines: Sequence[asyncpg.Record],
                      payments: Sequence[Payment] = (), refunds: Sequence[Refund] = ()
                      ) -> Invoice:
    return Invoice(
        id=row["id"], number=row["number"], customer_id=row["customer_id"],
        currency=row["currency"], status=InvoiceStatus(row["status"]),
        lines=[_invoice_line(line) for line in lines],
        subtotal=row["subtotal"], discount=row["discount"], tax=row["tax"], total=row["total"],
        customer_balance_applied=row["customer_balance_applied"],
        amount_paid=row["amount_paid"], pre_payment_credited=row["pre_payment_credited"],
        post_payment_credited=row["post_payment_credited"], refunded=row["refunded"],
        credit_note_count=row["credit_note_count"], payments=list(payments),
        refunds=list(refunds), refunds_failed=row["refunds_failed"],
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
        time_credits=tuple(row["time_credits"]),
    )


def credit_note_from_rows(row: asyncpg.Record, lines: Sequence[asyncpg.Record],
                          refunds: Sequence[Refund] = ()) -> CreditNote:
    metadata: Any = row["metadata"]
    # the void's trigger (its type is not stored: a void is always a credit_note.void)
    voided_by = (Trigger(row["voided_by_source"], row["voided_by_id"], "credit_note.void")
                 if row["voided_by_id"] is not None else None)
    return CreditNote(
        id=row["id"], number=row["number"], sequence=row["sequence"],
        invoice_id=row["invoice_id"], customer_id=row["customer_id"],
        currency=row["currency"], reason=Reason(row["reason"]),
        lines=tuple(
            CreditNoteLine(description=line["description"], net=line["net"], tax=line["tax"],
                           tax_rate_bps=line["tax_rate_bps"],
                           invoice_line_id=line["invoice_line_id"], quantity=line["quantity"],
                           unit_amount=line["unit_amount"], covers_from=line["covers_from"])
            for line in lines
        ),
        pre_payment_amount=row["pre_payment_amount"], refund_amount=row["refund_amount"],
        credit_amount=row["credit_amount"], out_of_band_amount=row["out_of_band_amount"],
        trigger=Trigger(row["trigger_source"], row["trigger_id"], row["trigger_type"]),
        refund_id=row["refund_id"], policy=row["policy"], memo=row["memo"],
        metadata=json.loads(metadata) if isinstance(metadata, str) else dict(metadata),
        status=CreditNoteStatus(row["status"]), effective_at=row["effective_at"],
        refunds=tuple(refunds), voided_by=voided_by,
    )
