"""The port between the handlers and storage: the unit of work, and what crosses it.

The handlers (:mod:`service.handlers`) decide WHAT to lock, claim, add, save
and record; an adapter (``service.adapters.unit_of_work`` for PostgreSQL,
``tests/fakes.py`` in memory) decides HOW. Both sides import this module and
the domain, never each other.

The unit of work collects the events the aggregates it saved recorded when
its transaction commits (cosmicpython's ``collect_new_events``), with any
event added outside an aggregate (a rejection), in the order of the messages
that caused them, each carrying its message's trace context.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from service.domain.commands import Command, Trigger
from service.domain.credit_note import CreditNote
from service.domain.events import Event
from service.domain.invoice import Invoice

#: A message's idempotency key in the processed-message ledger: (source, id).
Key = tuple[str, str]


def key_of(trigger: Trigger) -> Key:
    return (trigger.source, trigger.id)


@dataclass(frozen=True)
class Delivery:
    """Where a command came from: kept in the processed-message ledger."""

    topic: str
    partition: int | None = None
    offset: int | None = None
    #: W3C trace context of the span processing the message (None: tracing off)
    traceparent: str | None = None

    def same_record(self, other: Delivery) -> bool:
        """The same record of the same partition (an offset is needed to tell)."""
        return (self.offset is not None
                and (self.topic, self.partition, self.offset)
                == (other.topic, other.partition, other.offset))


@dataclass(frozen=True)
class Message:
    command: Command
    delivery: Delivery


@dataclass(frozen=True)
class Claims:
    """What :meth:`UnitOfWork.claim` found for a batch's keys."""

    #: keys this unit of work claimed: their messages may have an effect
    claimed: frozenset[Key] = frozenset()
    #: keys not claimed because a delivery was dead-lettered: that delivery, and the reason
    dead_lettered: Mapping[Key, tuple[Delivery, str]] = field(default_factory=dict)

    def dead_letter_of(self, message: Message) -> str | None:
        """The reason this very delivery was dead-lettered before (None: it was not)."""
        found = self.dead_lettered.get(key_of(message.command.trigger))
        if found is None or not found[0].same_record(message.delivery):
            return None
        return found[1]


@dataclass(frozen=True)
class Locked:
    """Invoices and credit notes read under their invoices' locks (None: there is none).

    An invoice comes with its payments and the refunds of its credit notes; a
    credit note with its refunds.
    """

    invoices: Mapping[str, Invoice | None]
    credit_notes: Mapping[str, CreditNote | None]
    #: of the refund ids asked about, those some refund (of any invoice) already has
    taken_refund_ids: frozenset[str] = frozenset()


class UnitOfWork(Protocol):
    """What handlers need from storage: one transaction, six operations.

    Everything but :meth:`record` of a key another unit of work holds is written
    when :meth:`transaction` commits; an exception inside it writes nothing.
    """

    def transaction(self) -> AbstractAsyncContextManager[None]:
        """Commit what was claimed, added, saved and recorded, with the collected events.

        A value or constraint storage refuses raises ``RefusedByDatabase``;
        storage itself failing raises ``Unavailable``.
        """
        ...

    async def claim(self, messages: Sequence[Message]) -> Claims:
        """Claim each message's key in the ledger (the first copy of a key in ``messages``).

        A key is claimed when it is new, released, or dead-lettered by another
        delivery (a replay); one that has an effect (applied, rejected, or a
        credit note of its trigger) is not, nor one this very delivery
        dead-lettered (its dead letter is sent again).
        """
        ...

    async def lock(self, invoice_ids: Collection[str], credit_note_ids: Collection[str] = (),
                   refund_ids: Collection[str] = ()) -> Locked:
        """Lock invoices in a stable order, and read credit notes under their invoices' locks.

        Holds until the transaction ends; asking again returns what was read.
        ``refund_ids`` (to link): which of them a refund already has, committed
        or recorded in this transaction (not locked: a refund id linked
        concurrently elsewhere makes one of the two commits fail as refused).
        """
        ...

    async def add(self, new: Invoice | CreditNote | Event) -> None:
        """A new invoice or credit note, or an event recorded outside any aggregate."""
        ...

    async def save(self, changed: Invoice | CreditNote) -> None:
        """A locked invoice that changed (its new events are collected), or a credit note
        voided or updated (its memo and metadata: written with its ``CreditNoteUpdated``).

        An invoice's new payments and refunds, and its refunds' outcomes, are written with it.
        """
        ...

    async def record(self, message: Message, outcome: str) -> bool:
        """Write ``outcome`` (``rejected:``, ``released:``, ``dead_lettered:<reason>``).

        For a key this unit of work claimed, at commit; it always is recorded.
        Otherwise only a dead letter, at once, by compare-and-set: written when
        the key has no row, a released or a dead-lettered one; False, writing
        nothing, when another transaction applied or rejected it meanwhile.
        """
        ...
