"""An in-memory unit of work: the port (``service.ports``) with no PostgreSQL.

``FakeStore`` is the "database" (committed invoices, credit notes, the
processed-message ledger and the outbox); ``FakeUnitOfWork`` works on copies
and writes at commit, so an exception inside its transaction writes nothing.
It keeps the PostgreSQL unit of work's rules, and ``tests/contract`` runs one
suite against both so it cannot drift: the claim rules of the ledger (an
upstream event that recorded a payment, settled a refund or updated a credit
note has had its effect too), the compare-and-set of a dead letter, events
collected from the saved invoices in the order of their messages, refund ids
taken anywhere, a credit note's memo and metadata written from its update
event, and what storage refuses failing the whole commit: a NUL character in
text (SQLSTATE 22021), a refund id or a payment id used twice (23505), a line's
credit method switched while anything is credited (23000, ``invoice_lines_fixed``:
a switch is written in two steps only when a void of the same transaction freed
the line, as ``PostgresUnitOfWork`` does).

Invoice locks are modelled as PostgreSQL's row locks are: ``lock`` takes a
per-invoice ``asyncio.Lock`` of the store, in sorted order, held until the
transaction ends, so two units of work on one invoice serialise (the second
reads what the first committed). A ledger key is not locked.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from service.adapters.event_codec import encode
from service.adapters.unit_of_work import saved_note, switched_methods
from service.domain import errors
from service.domain.credit_note import CreditNote
from service.domain.events import CreditNoteUpdated, Event
from service.domain.invoice import Invoice
from service.ports import Claims, Delivery, Key, Locked, Message, key_of
from service.settings import Topics

#: (event id, topic, key, type, payload JSON, traceparent): an outbox row, as PostgreSQL's
OutboxRow = tuple[str, str, str | None, str, str, str | None]


@dataclass
class LedgerRow:
    type: str
    delivery: Delivery
    outcome: str


class DataException(Exception):
    """What the driver raises for a refused value (SQLSTATE 22021: a NUL character in text)."""

    sqlstate = "22021"


@dataclass
class FakeStore:
    """The committed state every :class:`FakeUnitOfWork` of it reads and writes."""

    topics: Topics = field(default_factory=Topics)
    invoices: dict[str, Invoice] = field(default_factory=dict)
    credit_notes: dict[str, CreditNote] = field(default_factory=dict)
    ledger: dict[Key, LedgerRow] = field(default_factory=dict)
    outbox: list[OutboxRow] = field(default_factory=list)
    #: the upstream events that updated a credit note (credit_note_updates' keys)
    note_updates: set[Key] = field(default_factory=set)
    commits: int = 0
    #: called as each transaction commits (may raise, e.g. ``errors.Unavailable``)
    before_commit: Callable[[FakeUnitOfWork], None] | None = None
    #: each invoice's lock (PostgreSQL's row lock), taken by ``lock``, held to the end
    invoice_locks: dict[str, asyncio.Lock] = field(default_factory=dict, repr=False)

    def unit_of_work(self) -> FakeUnitOfWork:
        return FakeUnitOfWork(self)

    def outcome(self, key: Key) -> str | None:
        row = self.ledger.get(key)
        return row.outcome if row else None

    def has_effect(self, key: Key) -> bool:
        """Whether an upstream event issued a note, recorded a payment, settled a refund or
        updated a note (what ``claim`` finds even without its ledger row)."""
        return (key in self.note_updates
                or any(key_of(note.trigger) == key for note in self.credit_notes.values())
                or any(payment.trigger is not None and key_of(payment.trigger) == key
                       for invoice in self.invoices.values() for payment in invoice.payments)
                or any(refund.settled_by is not None and key_of(refund.settled_by) == key
                       for invoice in self.invoices.values() for refund in invoice.refunds))


class FakeUnitOfWork:
    """``service.ports.UnitOfWork`` in memory (the rules of ``PostgresUnitOfWork``)."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self._open = False
        self._invoices: dict[str, Invoice | None] = {}
        self._notes: dict[str, CreditNote | None] = {}
        self._ledger: dict[Key, LedgerRow] = {}  # rows written in this transaction
        self._claimed: frozenset[Key] = frozenset()
        self._deliveries: dict[Key, Delivery] = {}
        self._outcomes: dict[Key, str] = {}
        self._new_invoices: list[Invoice] = []
        self._saved_invoices: dict[str, Invoice] = {}
        self._new_notes: list[CreditNote] = []
        self._voided: list[CreditNote] = []
        self._added_events: list[Event] = []
        self._held: list[asyncio.Lock] = []

    @property
    def claimed(self) -> frozenset[Key]:
        """The keys this unit of work claimed (for a test's ``before_commit``)."""
        return self._claimed

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self._open = True
        try:
            yield
            if self.store.before_commit is not None:
                self.store.before_commit(self)
            self._commit()
        finally:
            self._open = False
            for held in reversed(self._held):
                held.release()
            self._held.clear()

    async def claim(self, messages: Sequence[Message]) -> Claims:
        self._check_open()
        first: dict[Key, Message] = {}
        for m in messages:
            first.setdefault(key_of(m.command.trigger), m)
        claimed: set[Key] = set()
        for key, m in first.items():
            self._deliveries.setdefault(key, m.delivery)
            row = self._row(key)
            if row is None or row.outcome.startswith("released:") or (
                    row.outcome.startswith("dead_lettered:")
                    and not m.delivery.same_record(row.delivery)):
                self._ledger[key] = LedgerRow(m.command.trigger.type, m.delivery, "applied")
                if not self.store.has_effect(key):
                    claimed.add(key)
        self._claimed |= claimed
        dead_lettered = {}
        for key in first.keys() - claimed:
            row = self._row(key)
            if (row is not None and row.outcome.startswith("dead_lettered:")
                    and row.delivery.offset is not None):
                dead_lettered[key] = (row.delivery, row.outcome.removeprefix("dead_lettered:"))
        return Claims(frozenset(claimed), dead_lettered)

    async def lock(self, invoice_ids: Collection[str], credit_note_ids: Collection[str] = (),
                   refund_ids: Collection[str] = ()) -> Locked:
        self._check_open()
        unread = [note_id for note_id in credit_note_ids if note_id not in self._notes]
        wanted = set(invoice_ids) | {self.store.credit_notes[note_id].invoice_id
                                     for note_id in unread if note_id in self.store.credit_notes}
        await self._acquire(wanted)
        for invoice_id in wanted:
            if invoice_id not in self._invoices:
                stored = self.store.invoices.get(invoice_id)
                self._invoices[invoice_id] = copy.deepcopy(stored)
        for note_id in unread:  # with its refunds as its invoice, read under the lock, has them
            note = self.store.credit_notes.get(note_id)
            invoice = self._invoices.get(note.invoice_id) if note else None
            self._notes[note_id] = note and dataclasses.replace(note, refunds=tuple(
                refund for refund in (invoice.refunds if invoice else ())
                if refund.credit_note_id == note.id))
        notes = {note_id: self._notes[note_id] for note_id in sorted(set(credit_note_ids))}
        wanted |= {note.invoice_id for note in notes.values() if note}
        taken = {refund.refund_id
                 for invoice in [*self.store.invoices.values(), *self._invoices.values()]
                 if invoice for refund in invoice.refunds}
        return Locked({invoice_id: self._invoices[invoice_id] for invoice_id in sorted(wanted)},
                      notes, frozenset(taken & set(refund_ids)))

    async def add(self, new: Invoice | CreditNote | Event) -> None:
        self._check_open()
        if isinstance(new, Invoice):
            self._invoices[new.id] = new
            self._new_invoices.append(new)
        elif isinstance(new, CreditNote):
            self._notes[new.id] = new
            self._new_notes.append(new)
        else:
            self._added_events.append(new)

    async def save(self, changed: Invoice | CreditNote) -> None:
        self._check_open()
        if isinstance(changed, Invoice):
            self._saved_invoices.setdefault(changed.id, changed)
            return
        if saved_note(self._notes.get(changed.id), changed, self._voided):
            self._voided.append(changed)
        self._notes[changed.id] = changed

    async def record(self, message: Message, outcome: str) -> bool:
        self._check_open()
        key = key_of(message.command.trigger)
        if key in self._claimed:
            self._outcomes[key] = outcome
            return True
        if not outcome.startswith("dead_lettered:"):
            raise ValueError(f"only a dead letter is recorded for a key not claimed: {outcome}")
        row = self._row(key)
        if row is not None and not row.outcome.startswith(("released:", "dead_lettered:")):
            return False
        self._ledger[key] = LedgerRow(message.command.trigger.type, message.delivery, outcome)
        return True

    async def _acquire(self, invoice_ids: Collection[str]) -> None:
        """Lock the invoices not locked yet, in sorted order (as ``FOR UPDATE ... ORDER BY``).

        A credit note's invoice never changes, so no second round is needed: the
        notes are read after the lock, and a note committed meanwhile by another
        unit of work is on an invoice that was locked (waited for) here.
        """
        for invoice_id in sorted(set(invoice_ids) - set(self._invoices)):
            lock = self.store.invoice_locks.setdefault(invoice_id, asyncio.Lock())
            if lock in self._held:
                continue
            await lock.acquire()
            self._held.append(lock)

    def _row(self, key: Key) -> LedgerRow | None:
        return self._ledger.get(key) or self.store.ledger.get(key)

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("the unit of work is used outside its transaction")

    def _collect_new_events(self) -> list[Event]:
        events: list[Event] = list(self._added_events)
        for invoice in [*self._new_invoices, *self._saved_invoices.values()]:
            events += invoice.pop_events()
        order = {key: position for position, key in enumerate(self._deliveries)}
        events.sort(key=lambda event: order.get(key_of(event.trigger), len(order)))
        return events

    def _outbox_rows(self, events: list[Event]) -> list[OutboxRow]:
        rows = []
        for event in events:
            outgoing = encode(event, self.store.topics)
            delivery = self._deliveries.get(key_of(event.trigger))
            rows.append((outgoing.id, outgoing.topic, outgoing.key, outgoing.type,
                         outgoing.to_json(), delivery.traceparent if delivery else None))
        return rows

    def _commit(self) -> None:
        for new in [*self._new_invoices, *self._new_notes]:
            if _has_nul(new):
                try:  # as the PostgreSQL unit of work raises it: the driver's error its context
                    raise DataException("invalid byte sequence for encoding UTF8: 0x00")
                except DataException as error:
                    raise errors.RefusedByDatabase(
                        "PostgreSQL refused the effect (SQLSTATE 22021)", cause=error) from None
        if any(invoice.id in self.store.invoices for invoice in self._new_invoices) or any(
                note.id in self.store.credit_notes for note in self._new_notes) or self._reused():
            raise errors.RefusedByDatabase("PostgreSQL refused the effect (SQLSTATE 23505)")
        if self._method_switched():
            raise errors.RefusedByDatabase("PostgreSQL refused the effect (SQLSTATE 23000)")
        events = self._collect_new_events()
        rows = self._outbox_rows(events)
        ledger = {**self.store.ledger, **self._ledger}
        for key, outcome in self._outcomes.items():
            ledger[key] = dataclasses.replace(ledger[key], outcome=outcome)
        self.store.ledger = ledger
        for invoice in [*self._new_invoices, *self._saved_invoices.values()]:
            self.store.invoices[invoice.id] = invoice
        for note in [*self._new_notes, *self._voided]:
            self.store.credit_notes[note.id] = note
        for event in events:  # memo and metadata as the update left them
            if isinstance(event, CreditNoteUpdated):
                note = event.credit_note
                self.store.credit_notes[note.id] = dataclasses.replace(
                    self.store.credit_notes[note.id], memo=note.memo, metadata=note.metadata)
                self.store.note_updates.add(key_of(event.trigger))
        self.store.outbox += rows
        self.store.commits += 1


    def _method_switched(self) -> bool:
        """A line's credit method changed while something is credited on it, not freed by a
        void of this transaction in between: what ``invoice_lines_fixed`` refuses."""
        saved = list(self._saved_invoices.values())
        stored = {(invoice.id, line.id): line.credit_method
                  for invoice in saved if (committed := self.store.invoices.get(invoice.id))
                  for line in committed.lines}
        freed = set(switched_methods(saved, stored, self._voided))
        return any(
            (before := stored.get((invoice.id, line.id))) is not None
            and line.credit_method is not before
            and (line.credit_method is not None or (line.credited_net, line.credited_tax,
                                                   line.credited_quantity) != (0, 0, 0))
            and (invoice.id, line.id) not in freed
            for invoice in saved for line in invoice.lines)

    def _reused(self) -> bool:
        """A refund id or payment id (per invoice) used twice: the keys PostgreSQL has."""
        invoices = {**self.store.invoices,
                    **{invoice.id: invoice for invoice in self._invoices.values() if invoice}}
        refund_ids = [refund.refund_id for invoice in invoices.values()
                      for refund in invoice.refunds]
        payment_ids = [(invoice.id, payment.payment_id) for invoice in invoices.values()
                       for payment in invoice.payments if payment.payment_id is not None]
        return (len(set(refund_ids)) != len(refund_ids)
                or len(set(payment_ids)) != len(payment_ids))


def _has_nul(value: Any) -> bool:
    """Whether any text in ``value`` holds a NUL character (PostgreSQL's text refuses it)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_has_nul(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False
