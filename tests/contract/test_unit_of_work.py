"""The unit of work's contract (``service.ports.UnitOfWork``), on the fake and on PostgreSQL.

Each test drives the port directly, as the handlers do, and reads back what
was committed: the ledger's outcome, the invoice's figures, the credit note's
status, the outbox rows in order.
"""

from __future__ import annotations

import pytest

from service.domain import errors
from service.domain.commands import DraftLine, FinalizeInvoice, IssueCreditNote, Trigger
from service.domain.events import CreditNoteRejected
from service.domain.invoice import finalize_invoice
from service.domain.issuing import price_credit_note
from service.ports import Delivery, Message, UnitOfWork
from tests.contract.conftest import Backend

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def finalized(invoice_id: str, total: int = 10_000) -> Message:
    return Message(FinalizeInvoice(
        Trigger("/tests", f"fin-{invoice_id}", "invoice.finalized"), invoice_id,
        f"ACME-{invoice_id}", "cus_1", "usd", "open",
        (DraftLine("il_1", "Widget", 1, total),)), Delivery("invoices", 0, 1))


def credit(id_: str, invoice_id: str, amount: int, *, offset: int | None = 7,
           memo: str | None = None, traceparent: str | None = None) -> Message:
    return Message(IssueCreditNote(Trigger("/tests", id_, "credit_note.issue"), invoice_id,
                                   "other", amount=amount, memo=memo),
                   Delivery("commands", 0, offset, traceparent))


async def add_invoice(backend: Backend, invoice_id: str, total: int = 10_000) -> None:
    message = finalized(invoice_id, total)
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message])
        assert isinstance(message.command, FinalizeInvoice)
        await uow.add(finalize_invoice(message.command))


async def issue(uow: UnitOfWork, message: Message) -> str:
    """What the issuing handler does: lock, price, apply, add, save. Returns the note's id."""
    command = message.command
    assert isinstance(command, IssueCreditNote)
    invoice = (await uow.lock([command.invoice_id])).invoices[command.invoice_id]
    assert invoice is not None
    note = invoice.issue(price_credit_note(invoice, command))
    await uow.add(note)
    await uow.save(invoice)
    return note.id


def key(message: Message) -> tuple[str, str]:
    return (message.command.trigger.source, message.command.trigger.id)


# ------------------------------------------------------------------------------- claim


async def test_a_new_key_is_claimed_once_and_a_committed_one_is_a_duplicate(
        backend: Backend) -> None:
    await add_invoice(backend, "in_1")
    message = credit("c1", "in_1", 1_000)
    uow = backend.unit_of_work()
    async with uow.transaction():
        claims = await uow.claim([message, credit("c1", "in_1", 999)])
        assert claims.claimed == {key(message)}
        await issue(uow, message)
    assert await backend.outcome(key(message)) == "applied"

    again = backend.unit_of_work()
    async with again.transaction():
        claims = await again.claim([message])
    assert claims.claimed == frozenset()
    assert claims.dead_letter_of(message) is None


async def test_a_released_key_is_claimed_again_and_a_rejected_one_is_not(
        backend: Backend) -> None:
    waiting, refused = credit("w1", "in_9", 1_000), credit("r1", "in_9", 1_000)
    uow = backend.unit_of_work()
    async with uow.transaction():
        assert (await uow.claim([waiting, refused])).claimed == {key(waiting), key(refused)}
        assert await uow.record(waiting, "released:invoice_not_found")
        assert await uow.record(refused, "rejected:invoice_void")
    assert await backend.outcome(key(waiting)) == "released:invoice_not_found"

    uow = backend.unit_of_work()
    async with uow.transaction():
        claims = await uow.claim([waiting, refused])
    assert claims.claimed == {key(waiting)}
    assert await backend.outcome(key(refused)) == "rejected:invoice_void"


async def test_a_key_dead_lettered_by_this_delivery_is_not_claimed_by_another_it_is(
        backend: Backend) -> None:
    message = credit("d1", "in_1", 1_000, offset=40)
    uow = backend.unit_of_work()
    async with uow.transaction():  # decided without claiming (its transaction rolled back)
        assert await uow.record(message, "dead_lettered:processing_failed")
    assert await backend.outcome(key(message)) == "dead_lettered:processing_failed"

    uow = backend.unit_of_work()
    async with uow.transaction():
        claims = await uow.claim([message])
    assert claims.claimed == frozenset()
    assert claims.dead_letter_of(message) == "processing_failed"

    replayed = credit("d1", "in_1", 1_000, offset=41)  # the same key, another record
    uow = backend.unit_of_work()
    async with uow.transaction():
        claims = await uow.claim([replayed])
    assert claims.claimed == {key(replayed)}
    assert await backend.outcome(key(replayed)) == "applied"


# ------------------------------------------------------------------------- dead letters


async def test_a_dead_letter_is_not_recorded_over_a_key_another_transaction_applied(
        backend: Backend) -> None:
    await add_invoice(backend, "in_1")
    message = credit("c1", "in_1", 1_000)
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message])
        await issue(uow, message)

    late = backend.unit_of_work()
    async with late.transaction():
        assert not await late.record(message, "dead_lettered:processing_failed")
    assert await backend.outcome(key(message)) == "applied"


async def test_a_dead_letter_replaces_a_released_key(backend: Backend) -> None:
    message = credit("w1", "in_9", 1_000)
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message])
        await uow.record(message, "released:invoice_not_found")
    uow = backend.unit_of_work()
    async with uow.transaction():
        assert await uow.record(message, "dead_lettered:invoice_not_found")
    assert await backend.outcome(key(message)) == "dead_lettered:invoice_not_found"


async def test_a_claimed_key_is_dead_lettered_at_commit(backend: Backend) -> None:
    message = credit("x1", "in_9", 1_000)
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message])
        assert await uow.record(message, "dead_lettered:invalid_message")
    assert await backend.outcome(key(message)) == "dead_lettered:invalid_message"


# ------------------------------------------------------------------------ lock and save


async def test_lock_finds_no_invoice_that_was_never_added(backend: Backend) -> None:
    uow = backend.unit_of_work()
    async with uow.transaction():
        locked = await uow.lock(["in_none"], ["cn_none"])
    assert locked.invoices == {"in_none": None}
    assert locked.credit_notes == {"cn_none": None}


async def test_a_saved_invoice_and_its_credit_note_are_read_back_together(
        backend: Backend) -> None:
    await add_invoice(backend, "in_1")
    message = credit("c1", "in_1", 2_500)
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message])
        note_id = await issue(uow, message)
    assert await backend.figures("in_1") == ("open", 0, 2_500, 1)

    void = Message(IssueCreditNote(Trigger("/tests", "v1", "credit_note.void"), "in_1",
                                   "other", amount=1), Delivery("commands", 0, 8))
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([void])
        locked = await uow.lock((), [note_id])  # a credit note comes with its invoice
        note, invoice = locked.credit_notes[note_id], locked.invoices["in_1"]
        assert note is not None and invoice is not None
        assert (note.total, invoice.credit_note_count) == (2_500, 1)
        await uow.save(invoice.void_credit_note(note, void.command.trigger))
        await uow.save(invoice)
    assert await backend.credit_note_status(note_id) == "void"
    assert await backend.figures("in_1") == ("open", 0, 0, 1)
    assert [entry[0] for entry in await backend.outbox()] == [
        "credit_note.issued", "credit_note.voided"]


# ----------------------------------------------------------------------- the events


async def test_events_are_collected_from_saved_invoices_in_message_order_with_their_trace(
        backend: Backend) -> None:
    await add_invoice(backend, "in_a")
    await add_invoice(backend, "in_b", total=1_000)
    first, second = (credit("c1", "in_a", 1_000, traceparent=TRACE),
                     credit("c2", "in_b", 1_000))  # pays in_b in full
    rejected = credit("c3", "in_a", 1_000)
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([first, second, rejected])
        await issue(uow, first)
        await issue(uow, second)
        await uow.add(CreditNoteRejected(rejected.command.trigger, "in_a", "invoice_void", "x"))
        await uow.record(rejected, "rejected:invoice_void")

    assert await backend.outbox() == [
        ("credit_note.issued", "in_a", TRACE),
        ("credit_note.issued", "in_b", None),
        ("invoice.paid", "in_b", None),
        ("credit_note.rejected", "in_a", None),
    ]
    assert await backend.figures("in_b") == ("paid", 0, 1_000, 1)


async def test_an_invoice_locked_but_not_saved_writes_no_event(backend: Backend) -> None:
    await add_invoice(backend, "in_1")
    message = credit("c1", "in_1", 1_000)
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message])
        invoice = (await uow.lock(["in_1"])).invoices["in_1"]
        assert invoice is not None
        invoice.issue(price_credit_note(invoice, message.command))  # type: ignore[arg-type]
    assert await backend.outbox() == []
    assert await backend.figures("in_1") == ("open", 0, 0, 0)


# -------------------------------------------------------------------------- rollback


async def test_an_exception_inside_the_transaction_writes_nothing(backend: Backend) -> None:
    await add_invoice(backend, "in_1")
    message = credit("c1", "in_1", 1_000)
    uow = backend.unit_of_work()

    async def failing() -> None:
        async with uow.transaction():
            await uow.claim([message])
            await issue(uow, message)
            raise KeyError("a bug")

    with pytest.raises(KeyError):
        await failing()
    assert await backend.outcome(key(message)) is None
    assert await backend.figures("in_1") == ("open", 0, 0, 0)
    assert await backend.outbox() == []


async def test_a_value_storage_refuses_fails_the_whole_commit_as_refused(
        backend: Backend) -> None:
    await add_invoice(backend, "in_1")
    good, bad = credit("c1", "in_1", 1_000), credit("c2", "in_1", 1_000, memo="nul \x00 here")
    uow = backend.unit_of_work()

    async def both() -> None:
        async with uow.transaction():
            await uow.claim([good, bad])
            await issue(uow, good)
            await issue(uow, bad)

    with pytest.raises(errors.RefusedByDatabase) as refused:
        await both()
    cause = refused.value.__cause__ or refused.value.__context__
    assert str(getattr(cause, "sqlstate", ""))[:2] == "22"
    assert await backend.outcome(key(good)) is None
    assert await backend.figures("in_1") == ("open", 0, 0, 0)
    assert await backend.outbox() == []
