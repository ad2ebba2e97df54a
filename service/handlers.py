"""Application handlers: one async function per command, each reading like its rule.

Handlers run inside a transaction the caller opened on the unit of work
(:mod:`service.ports`), so a batch of messages shares one transaction
(:func:`apply_batch`): it locks the batch's invoices (and the invoices of the
credit notes voided or updated) up front, which the unit of work does in a
stable order, and reads which of the refund ids ``credit_note.issue`` links
some refund already has; the unit of work writes everything, with the events
the invoices recorded, when the batch commits.

Each message first claims its ``source`` + ``id`` in the processed-message
ledger; a message already claimed has no second effect. A business refusal
becomes a ``credit_note.rejected`` event. An
:class:`~service.domain.errors.Undeliverable` error is raised before the
domain changes anything. The ledger records the dead-letter DECISION before
the caller sends the dead letter: ``dead_lettered:<reason>`` with the
delivery (topic, partition, offset), in the message's own transaction, or, for
a message whose transaction was rolled back or that waited in vain, by a
compare-and-set that refuses if another transaction applied the key meanwhile
(:func:`decide_dead_letter`). A message still waiting for its invoice only
gives its key back (``released:<reason>``). A redelivery of a dead-lettered
delivery is not re-evaluated: its dead letter is sent again (and a replay of
it in the same batch is claimed for itself and applies). So a record gets a
dead letter or an effect, never both.

A fact told again under another upstream id (a payment's ``payment_id`` with
the same amount, a refund's outcome again) has no effect either: the ledger
records ``duplicate:<what>`` and the outcome is ``duplicate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from service.domain import errors, issuing
from service.domain.commands import (
    Command,
    FinalizeInvoice,
    IssueCreditNote,
    MarkInvoiceUncollectible,
    RecordPayment,
    RecordRefundOutcome,
    UpdateCreditNote,
    VoidCreditNote,
    VoidInvoice,
)
from service.domain.credit_note import CreditNote
from service.domain.events import CreditNoteRejected, Event
from service.domain.invoice import Invoice, finalize_invoice
from service.domain.payments import Receipt
from service.domain.refunds import Transition
from service.ports import Claims, Delivery, Key, Message, UnitOfWork, key_of

#: the port's types, where callers of the handlers have always found them
__all__ = ["Delivery", "Message", "Outcome", "Result", "UnitOfWork", "apply_batch",
           "decide_dead_letter", "handle", "invoice_of"]


class Outcome(StrEnum):
    APPLIED = "applied"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Result:
    message: Message
    outcome: Outcome | None = None
    #: the rejection's reason code when the outcome is REJECTED
    reason: str = ""
    error: errors.Undeliverable | None = None
    #: the ledger records its dead letter: the caller sends it (else ``error`` is retryable:
    #: the message waits for what it refers to)
    decided: bool = False
    #: how many times it was applied (for ``dlq.attempts``)
    attempts: int = 1
    #: what the invoices recorded for it (committed with it), for the metrics
    events: tuple[Event, ...] = ()


#: Called before a message that failed is tried alone again: sleeps, and says whether to.
Pause = Callable[[Message, errors.Undeliverable, int], Awaitable[bool]]
#: Told the results committed one message at a time before an outage interrupted the batch.
Committed = Callable[[Sequence[Result]], None]
#: SQLSTATE classes whose refusal a second attempt cannot change: data exception (22),
#: program limit exceeded (54).
DETERMINISTIC_CLASSES = frozenset({"22", "54"})


class _DeadLetterDecided(Exception):
    """This very delivery was dead-lettered before: send its dead letter again."""

    def __init__(self, error: errors.Undeliverable) -> None:
        super().__init__(error.code)
        self.error = error


async def apply_batch(messages: Sequence[Message], unit_of_work: Callable[[], UnitOfWork],
                      *, attempts: int = 1, pause: Pause | None = None,
                      committed: Committed | None = None) -> list[Result]:
    """Apply messages in one transaction; if that fails, one message at a time, in order.

    The fallback isolates the message at fault: every other one is applied,
    and only that one comes back with its error: ``RefusedByDatabase`` when
    PostgreSQL refused its effect, ``ProcessingFailed`` for any other
    exception. It is tried alone up to ``attempts`` times in all (``pause``
    first; SQLSTATE classes 22 and 54 are not retried) BEFORE the messages
    after it, so an invoice's messages keep their order; then its dead letter
    is decided and the next message goes. ``errors.Unavailable`` (PostgreSQL
    itself failed) is nobody's fault and propagates (``committed`` is first
    told what was committed one by one): the caller retries the same messages
    in place.
    """
    try:
        return await _apply_together(messages, unit_of_work())
    except errors.Unavailable:
        raise
    except Exception as error:  # any other failure is a message's: find which one
        failure: Exception | None = error
    results: list[Result] = []
    try:
        for message in messages:
            results.append(await _apply_alone(
                message, unit_of_work, attempts, pause,
                failure if len(messages) == 1 else None))
    except errors.Unavailable:
        if committed is not None:
            committed(results)
        raise
    return results


async def _apply_alone(message: Message, unit_of_work: Callable[[], UnitOfWork], attempts: int,
                       pause: Pause | None, failure: Exception | None) -> Result:
    attempt = 1
    while True:
        if failure is None:
            try:
                [result] = await _apply_together([message], unit_of_work())
            except errors.Unavailable:
                raise
            except Exception as raised:
                failure = raised
            else:
                return dataclasses.replace(result, attempts=attempt)
        refused = _undeliverable(failure)
        if (attempt >= attempts or pause is None or _deterministic(refused)
                or not await pause(message, refused, attempt)):
            return await decide_dead_letter(message, refused, unit_of_work, attempt)
        attempt += 1
        failure = None


async def decide_dead_letter(message: Message, error: errors.Undeliverable,
                             unit_of_work: Callable[[], UnitOfWork],
                             attempts: int = 1) -> Result:
    """Record in the ledger, in a transaction of its own, that ``message`` is dead-lettered.

    For a message whose transaction was rolled back, or that waited in vain
    (its key released). If another transaction applied or rejected the key
    meanwhile (another replica that took its partition), the message is a
    duplicate and must not be dead-lettered. A key PostgreSQL cannot store
    (refused) can never be applied either: dead-lettered without a row.
    """
    uow = unit_of_work()
    try:
        async with uow.transaction():
            decided = await uow.record(message, f"dead_lettered:{error.code}")
    except errors.RefusedByDatabase:
        decided = True
    if decided:
        return Result(message, error=error, decided=True, attempts=attempts)
    return Result(message, outcome=Outcome.DUPLICATE, attempts=attempts)


def _deterministic(error: errors.Undeliverable) -> bool:
    """A refusal of a value (SQLSTATE 22, 54): trying the same message again cannot differ."""
    if not isinstance(error, errors.RefusedByDatabase):
        return False
    cause = error.__cause__ or error.__context__
    return str(getattr(cause, "sqlstate", "") or "")[:2] in DETERMINISTIC_CLASSES


def _undeliverable(error: Exception) -> errors.Undeliverable:
    if isinstance(error, errors.Undeliverable):
        return error
    return errors.ProcessingFailed(f"applying the message raised {type(error).__name__}"
                                   f"{errors.raised_in(error)}", cause=error)


def _redelivered(reason: str) -> errors.Undeliverable:
    """The error of a dead letter decided by an earlier delivery of the same record."""
    kind = _undeliverable_kinds().get(reason, errors.Undeliverable)
    return kind(f"{reason}: dead-lettered by an earlier delivery of this record,"
                " sent again without applying it")


def _undeliverable_kinds() -> dict[str, type[errors.Undeliverable]]:
    """Every Undeliverable class by its code (the tree in ``errors``, walked breadth first)."""
    found: dict[str, type[errors.Undeliverable]] = {}
    pending: list[type[errors.Undeliverable]] = [errors.Undeliverable]
    while pending:
        kind = pending.pop(0)
        found.setdefault(kind.code, kind)
        pending.extend(kind.__subclasses__())
    return found


async def _apply_together(messages: Sequence[Message], uow: UnitOfWork) -> list[Result]:
    results: list[Result] = []
    async with uow.transaction():
        # every invoice of the batch locked up front, in one sorted round: no deadlock
        await uow.lock({invoice_of(m.command) for m in messages} - {""},
                       {note for m in messages for note in credit_notes_of(m.command)},
                       refund_ids={refund for m in messages for refund in linked_of(m.command)})
        first: dict[Key, Message] = {}
        for m in messages:  # the first copy of a key is the one that may apply
            first.setdefault(key_of(m.command.trigger), m)
        batch = await _claim(messages, first, uow)
        for message in messages:
            try:
                outcome, reason, events = await _handle_recording(message, uow, batch)
            except _DeadLetterDecided as decided:
                results.append(Result(message, error=decided.error, decided=True))
            except errors.Undeliverable as error:
                # waits: gives its key back, a later attempt claims it; else dead-lettered
                verdict = "released" if error.retryable else "dead_lettered"
                await uow.record(message, f"{verdict}:{error.code}")
                results.append(Result(message, error=error, decided=not error.retryable))
            else:
                results.append(Result(message, outcome=outcome, reason=reason, events=events))
    return results


async def _handle_recording(message: Message, uow: UnitOfWork,
                            batch: _Batch) -> tuple[Outcome, str, tuple[Event, ...]]:
    """:func:`handle`, and the events its invoice recorded meanwhile (read, not taken)."""
    invoices = await _invoices_of(message.command, uow)
    before = {invoice.id: len(invoice.events) for invoice in invoices}
    outcome, reason = await handle(message, uow, batch)
    events = tuple(event for invoice in invoices
                   for event in invoice.events[before[invoice.id]:])
    return outcome, reason, events


async def _invoices_of(command: Command, uow: UnitOfWork) -> list[Invoice]:
    """The locked invoices ``command`` may change (read again: locked for the batch already)."""
    locked = await uow.lock({invoice_of(command)} - {""}, credit_notes_of(command))
    return [invoice for invoice in locked.invoices.values() if invoice is not None]


async def _claim(messages: Sequence[Message], first: dict[Key, Message],
                 uow: UnitOfWork) -> _Batch:
    """Claim the first copy of each key; for a replay next to its dead-lettered original, the
    replay.

    The first copy of a key that this very delivery dead-lettered (redelivered: its
    offset was not committed) gets its dead letter again; the next copy of that key
    from another delivery (an operator's replay in the same batch) is claimed and may
    apply, as it would in a batch of its own.
    """
    claims = await uow.claim(list(first.values()))
    replays: dict[Key, Message] = {}
    for key, original in first.items():
        if key in claims.claimed or claims.dead_letter_of(original) is None:
            continue
        replay = next((m for m in messages if key_of(m.command.trigger) == key
                       and not m.delivery.same_record(original.delivery)), None)
        if replay is not None:
            replays[key] = replay
    if replays:
        more = await uow.claim(list(replays.values()))
        claims = Claims(claims.claimed | more.claimed, claims.dead_lettered)
        first = {**first, **{key: m for key, m in replays.items() if key in more.claimed}}
    return _Batch(claims, first)


@dataclass
class _Batch:
    """The batch's claims, the copy of each key that may apply, and the keys used."""

    claims: Claims
    #: the copy of each key that may apply (a key not here: its first copy)
    chosen: dict[Key, Message] = dataclasses.field(default_factory=dict)
    used: set[Key] = dataclasses.field(default_factory=set)

    def take(self, message: Message) -> bool:
        """Whether ``message`` is the copy of its key that applies (claimed, not used yet)."""
        key = key_of(message.command.trigger)
        if (key not in self.claims.claimed or key in self.used
                or self.chosen.get(key, message) is not message):
            return False
        self.used.add(key)
        return True


async def handle(message: Message, uow: UnitOfWork, batch: _Batch) -> tuple[Outcome, str]:
    """Apply one message; returns its outcome and, for a rejection, the reason code."""
    command = message.command
    if not batch.take(message):
        reason = batch.claims.dead_letter_of(message)
        if reason is not None:
            raise _DeadLetterDecided(_redelivered(reason))
        return Outcome.DUPLICATE, ""
    try:
        duplicate = await _HANDLERS[type(command)](command, uow)
    except errors.Rejection as rejection:
        invoice_id = invoice_of(command)
        for note_id in credit_notes_of(command):  # keyed and ordered with its invoice's events
            note = (await uow.lock((), [note_id])).credit_notes.get(note_id)
            invoice_id = note.invoice_id if note is not None else ""
        await uow.add(CreditNoteRejected(
            trigger=command.trigger, invoice_id=invoice_id or None,
            reason=rejection.code, message=rejection.message,
        ))
        await uow.record(message, f"rejected:{rejection.code}")
        return Outcome.REJECTED, rejection.code
    if duplicate is not None:
        await uow.record(message, duplicate)
        return Outcome.DUPLICATE, ""
    return Outcome.APPLIED, ""


#: What a handler returns: None when it applied its command, else the ledger's outcome of a
#: fact told again under another upstream id (``duplicate:<what>``), which has no effect.
Duplicate = str | None


async def issue_credit_note(command: IssueCreditNote, uow: UnitOfWork) -> Duplicate:
    # the ids it links that some refund already has, read under the invoice's lock
    linked = linked_of(command)
    locked = await uow.lock([command.invoice_id], refund_ids=linked)
    invoice = locked.invoices.get(command.invoice_id)
    if invoice is None:
        raise errors.InvoiceNotFound("the invoice has not been received (yet)")
    # stored ones (another invoice's too), and this invoice's added earlier in the batch
    taken = (locked.taken_refund_ids | {refund.refund_id for refund in invoice.refunds}) \
        & set(linked)
    note = invoice.issue(issuing.price_credit_note(invoice, command, taken_refund_ids=taken))
    await uow.add(note)
    await uow.save(invoice)
    return None


async def void_credit_note(command: VoidCreditNote, uow: UnitOfWork) -> Duplicate:
    note, invoice = await _locked_credit_note(uow, command.credit_note_id)
    voided = invoice.void_credit_note(note, command.trigger, now=datetime.now(UTC))
    await uow.save(voided)
    await uow.save(invoice)
    return None


async def update_credit_note(command: UpdateCreditNote, uow: UnitOfWork) -> Duplicate:
    note, invoice = await _locked_credit_note(uow, command.credit_note_id)
    updated = invoice.update_credit_note(note, command.trigger, memo=command.memo,
                                         memo_set=command.memo_set,
                                         metadata_patch=command.metadata_patch)
    await uow.save(updated)
    await uow.save(invoice)
    return None


async def finalize(command: FinalizeInvoice, uow: UnitOfWork) -> Duplicate:
    invoice = finalize_invoice(command)
    existing = (await uow.lock([command.invoice_id])).invoices.get(command.invoice_id)
    if existing is None:
        await uow.add(invoice)
    elif not _same_document(existing, invoice):
        raise errors.InvoiceConflict("a different invoice with this id was finalized before")
    return None


async def record_payment(command: RecordPayment, uow: UnitOfWork) -> Duplicate:
    """A payment is a fact: recorded once per ``payment_id``, never refused for the state."""
    invoice = await _locked_invoice(uow, command.invoice_id)
    receipt = invoice.receive_payment(command.payment_id, command.amount, command.currency,
                                      command.trigger, now=datetime.now(UTC))
    if receipt is Receipt.DUPLICATE:
        return "duplicate:payment"
    await uow.save(invoice)
    return None


async def record_refund_outcome(command: RecordRefundOutcome, uow: UnitOfWork) -> Duplicate:
    """An outcome applies to a pending refund of its invoice; one not known (yet) waits."""
    invoice = (await uow.lock([command.invoice_id])).invoices.get(command.invoice_id)
    if invoice is None:  # no invoice: no refund of it either (the note may not be committed)
        raise errors.RefundNotFound("the invoice of the refund has not been received (yet)")
    # its journal is never dated before its credit note's (read under the invoice's lock)
    refund = next((r for r in invoice.refunds if r.refund_id == command.refund_id), None)
    note = None if refund is None else (
        await uow.lock((), [refund.credit_note_id])).credit_notes.get(refund.credit_note_id)
    transition = invoice.settle_refund(
        command.refund_id, command.outcome, command.trigger,
        failure_reason=command.failure_reason, settlement=command.failure_settlement,
        now=datetime.now(UTC), not_before=None if note is None else note.effective_at)
    if transition is Transition.DUPLICATE:
        return f"duplicate:refund_{command.outcome}"
    await uow.save(invoice)
    return None


async def void_invoice(command: VoidInvoice, uow: UnitOfWork) -> Duplicate:
    invoice = await _locked_invoice(uow, command.invoice_id)
    invoice.void()
    await uow.save(invoice)
    return None


async def mark_uncollectible(command: MarkInvoiceUncollectible, uow: UnitOfWork) -> Duplicate:
    invoice = await _locked_invoice(uow, command.invoice_id)
    invoice.mark_uncollectible()
    await uow.save(invoice)
    return None


_HANDLERS: dict[type, Callable[[Any, UnitOfWork], Awaitable[Duplicate]]] = {
    IssueCreditNote: issue_credit_note,
    VoidCreditNote: void_credit_note,
    UpdateCreditNote: update_credit_note,
    FinalizeInvoice: finalize,
    RecordPayment: record_payment,
    RecordRefundOutcome: record_refund_outcome,
    VoidInvoice: void_invoice,
    MarkInvoiceUncollectible: mark_uncollectible,
}


async def _locked_credit_note(uow: UnitOfWork, credit_note_id: str) -> tuple[CreditNote, Invoice]:
    """A credit note read under its invoice's lock (the port's ``lock``), and that invoice."""
    note = (await uow.lock((), [credit_note_id])).credit_notes.get(credit_note_id)
    if note is None:
        raise errors.CreditNoteNotFound("no credit note has this id")
    return note, await _locked_invoice(uow, note.invoice_id)


async def _locked_invoice(uow: UnitOfWork, invoice_id: str) -> Invoice:
    invoice = (await uow.lock([invoice_id])).invoices.get(invoice_id)
    if invoice is None:
        raise errors.InvoiceNotFound("the invoice has not been received (yet)")
    return invoice


def invoice_of(command: Command) -> str:
    """The invoice a command is about ("" for a void or an update: they name a credit note)."""
    return "" if isinstance(command, VoidCreditNote | UpdateCreditNote) else command.invoice_id


def credit_notes_of(command: Command) -> Collection[str]:
    """The credit note a command names (its invoice is locked for it)."""
    if isinstance(command, VoidCreditNote | UpdateCreditNote):
        return (command.credit_note_id,)
    return ()


def linked_of(command: Command) -> list[str]:
    """The refund ids a ``credit_note.issue`` links (each must be no refund's yet)."""
    if isinstance(command, IssueCreditNote):
        return [refund.refund_id for refund in command.linked_refunds]
    return []


def _same_document(a: Invoice, b: Invoice) -> bool:
    """The parts of an invoice that never change after finalization."""
    def key(invoice: Invoice) -> tuple[object, ...]:
        return (invoice.number, invoice.customer_id, invoice.currency, invoice.total,
                [(line.id, line.quantity, line.unit_amount, line.tax_rate_bps, line.discount)
                 for line in invoice.lines])
    return key(a) == key(b)


