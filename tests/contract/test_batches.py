"""Whole batches through ``apply_batch``, on the fake and on PostgreSQL.

What the handlers and the unit of work decide together: a replay redelivered
next to its dead-lettered original, a void and a new credit of the same
invoice line in one batch, and what a voided credit note reads back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from service import handlers
from service.domain import errors
from service.domain.commands import (
    DraftLine,
    FinalizeInvoice,
    InvoiceLineByQuantity,
    IssueCreditNote,
    Trigger,
    UpdateCreditNote,
    VoidCreditNote,
)
from service.domain.credit_note import derived_id
from service.domain.errors import InvoiceNotFound
from service.domain.invoice import CreditMethod
from service.handlers import Outcome, apply_batch, decide_dead_letter
from service.ports import Delivery, Message, UnitOfWork
from tests.contract.conftest import Backend
from tests.contract.test_unit_of_work import add_invoice, credit, key


def void(id_: str, note_id: str, offset: int) -> Message:
    return Message(VoidCreditNote(Trigger("/tests", id_, "credit_note.void"), note_id),
                   Delivery("commands", 0, offset))


def note_of(message: Message) -> str:
    return derived_id("cn", message.command.trigger)


async def test_a_replay_next_to_its_redelivered_dead_lettered_original_applies_once(
        backend: Backend) -> None:
    """The original (dead-lettered, its offset not committed after a crash) and the
    operator's replay of it (another offset) come back in one batch: the original's
    dead letter is sent again, and the replay is claimed and applied, as in a batch
    of its own. (Before: only the first copy was claimed; the replay was a duplicate.)
    """
    original = credit("r1", "in_1", 1_000, offset=10)
    [waiting] = await apply_batch([original], backend.unit_of_work)  # no invoice yet
    assert isinstance(waiting.error, InvoiceNotFound)
    assert (await decide_dead_letter(original, waiting.error, backend.unit_of_work)).decided
    await add_invoice(backend, "in_1")  # the cause is fixed, then the replay
    replay = dataclasses.replace(original, delivery=Delivery("commands", 0, 11))

    results = await apply_batch([original, replay, original, replay], backend.unit_of_work)

    assert [(r.decided, r.outcome) for r in results] == [
        (True, None), (False, Outcome.APPLIED), (True, None), (False, Outcome.DUPLICATE)]
    assert await backend.outcome(key(replay)) == "applied"
    assert await backend.figures("in_1") == ("open", 0, 1_000, 1)  # one effect
    assert await backend.credit_note_status(note_of(replay)) == "issued"


async def test_the_redelivered_original_alone_is_not_applied(backend: Backend) -> None:
    """Only another delivery of the key is claimed: the dead-lettered one twice is not."""
    original = credit("r1", "in_1", 1_000, offset=10)
    [waiting] = await apply_batch([original], backend.unit_of_work)
    assert waiting.error is not None
    await decide_dead_letter(original, waiting.error, backend.unit_of_work)
    await add_invoice(backend, "in_1")

    results = await apply_batch([original, original], backend.unit_of_work)

    assert [r.decided for r in results] == [True, True]
    assert await backend.figures("in_1") == ("open", 0, 0, 0)


async def test_a_second_claim_for_another_delivery_of_a_dead_lettered_key_claims_it(
        backend: Backend) -> None:
    """The port: in one transaction, the dead-lettered delivery is not claimed, and a
    later claim of the same key for another delivery (the replay) is."""
    original = credit("d1", "in_1", 1_000, offset=40)
    uow = backend.unit_of_work()
    async with uow.transaction():
        assert await uow.record(original, "dead_lettered:processing_failed")
    replay = credit("d1", "in_1", 1_000, offset=41)
    uow = backend.unit_of_work()
    async with uow.transaction():
        first = await uow.claim([original])
        assert first.claimed == frozenset()
        assert first.dead_letter_of(original) == "processing_failed"
        assert (await uow.claim([replay])).claimed == {key(replay)}
    assert await backend.outcome(key(replay)) == "applied"


async def test_a_void_then_a_credit_by_amount_of_the_same_line_commits_as_one_batch(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A note credited line il_1 by quantity; one batch voids it (nothing credited: the
    method is free) and credits the invoice by amount (il_1 among its lines). Written
    together it is one transaction, not refused (invoice_lines_fixed, 23000) and redone
    one message at a time. (Before: PostgreSQL refused it together; the fake did not.)
    """
    together: list[int] = []
    apply_together = handlers._apply_together

    async def counted(messages: Sequence[Message], uow: UnitOfWork) -> Any:
        together.append(len(messages))
        return await apply_together(messages, uow)
    monkeypatch.setattr(handlers, "_apply_together", counted)
    ten = Message(FinalizeInvoice(  # il_1: 10 x 1000
        Trigger("/tests", "fin-in_1", "invoice.finalized"), "in_1", "ACME-in_1", "cus_1", "usd",
        "open", (DraftLine("il_1", "Widget", 10, 1_000),)), Delivery("invoices", 0, 1))
    assert [r.outcome for r in await apply_batch([ten], backend.unit_of_work)] == [
        Outcome.APPLIED]
    by_quantity = Message(IssueCreditNote(
        Trigger("/tests", "q1", "credit_note.issue"), "in_1", "other",
        lines=(InvoiceLineByQuantity("il_1", 2),)), Delivery("commands", 0, 1))
    [issued] = await apply_batch([by_quantity], backend.unit_of_work)
    assert issued.outcome is Outcome.APPLIED
    together.clear()

    results = await apply_batch([void("v1", note_of(by_quantity), 2),
                                 credit("a1", "in_1", 2_500, offset=3)], backend.unit_of_work)

    assert [r.outcome for r in results] == [Outcome.APPLIED, Outcome.APPLIED]
    assert together == [2]  # one transaction for both
    assert await backend.credit_note_status(note_of(by_quantity)) == "void"
    assert await backend.figures("in_1") == ("open", 0, 2_500, 2)


def by_quantity(id_: str, quantity: int, offset: int) -> Message:
    return Message(IssueCreditNote(
        Trigger("/tests", id_, "credit_note.issue"), "in_1", "other",
        lines=(InvoiceLineByQuantity("il_1", quantity),)), Delivery("commands", 0, offset))


def count_together(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many messages each transaction of ``apply_batch`` applied together (a refused
    transaction is redone one message at a time: the outcomes alone would not tell)."""
    together: list[int] = []
    apply_together = handlers._apply_together

    async def counted(messages: Sequence[Message], uow: UnitOfWork) -> Any:
        together.append(len(messages))
        return await apply_together(messages, uow)
    monkeypatch.setattr(handlers, "_apply_together", counted)
    return together


async def test_a_note_issued_and_voided_in_one_batch_commits(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The note's lines are written before its void (0018 refuses a line of a note that is
    not issued): the batch commits as one transaction, the note is void, nothing credited."""
    together = count_together(monkeypatch)
    ten = Message(FinalizeInvoice(
        Trigger("/tests", "fin-in_1", "invoice.finalized"), "in_1", "ACME-in_1", "cus_1", "usd",
        "open", (DraftLine("il_1", "Widget", 10, 1_000),)), Delivery("invoices", 0, 1))
    assert [r.outcome for r in await apply_batch([ten], backend.unit_of_work)] == [
        Outcome.APPLIED]
    issued = by_quantity("q1", 2, 1)
    together.clear()

    results = await apply_batch([issued, void("v1", note_of(issued), 2)], backend.unit_of_work)

    assert [r.outcome for r in results] == [Outcome.APPLIED, Outcome.APPLIED]
    assert together == [2]  # one transaction for both
    assert await backend.credit_note_status(note_of(issued)) == "void"
    assert await backend.figures("in_1") == ("open", 0, 0, 1)


async def test_issued_by_lines_voided_and_issued_again_in_one_batch_credits_only_the_last(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """One batch credits il_1 (10 units) by 2, voids that note, credits it by 3: it commits,
    and what is left to credit of il_1 is 7, no more, no less."""
    ten = Message(FinalizeInvoice(
        Trigger("/tests", "fin-in_1", "invoice.finalized"), "in_1", "ACME-in_1", "cus_1", "usd",
        "open", (DraftLine("il_1", "Widget", 10, 1_000),)), Delivery("invoices", 0, 1))
    assert [r.outcome for r in await apply_batch([ten], backend.unit_of_work)] == [
        Outcome.APPLIED]
    two, three = by_quantity("q1", 2, 1), by_quantity("q2", 3, 3)
    together = count_together(monkeypatch)

    results = await apply_batch([two, void("v1", note_of(two), 2), three], backend.unit_of_work)

    assert [r.outcome for r in results] == [Outcome.APPLIED] * 3
    assert together == [3]  # one transaction for all three
    assert await backend.credit_note_status(note_of(two)) == "void"
    assert await backend.credit_note_status(note_of(three)) == "issued"
    assert await backend.figures("in_1") == ("open", 0, 3_000, 2)
    [over] = await apply_batch([by_quantity("q3", 8, 4)], backend.unit_of_work)
    assert over.outcome is not Outcome.APPLIED
    [rest] = await apply_batch([by_quantity("q4", 7, 5)], backend.unit_of_work)
    assert rest.outcome is Outcome.APPLIED
    assert await backend.figures("in_1") == ("paid", 0, 10_000, 3)  # all credited


async def test_a_voided_credit_note_reads_back_who_voided_it(backend: Backend) -> None:
    await add_invoice(backend, "in_1")
    issue = credit("c1", "in_1", 1_000, offset=1)
    voiding = void("v1", note_of(issue), 2)
    for message in (issue, voiding):
        [result] = await apply_batch([message], backend.unit_of_work)
        assert result.outcome is Outcome.APPLIED
    uow = backend.unit_of_work()
    async with uow.transaction():
        note = (await uow.lock((), [note_of(issue)])).credit_notes[note_of(issue)]
    assert note is not None
    assert (note.status.value, note.voided_by) == ("void", voiding.command.trigger)
    # and, read back so, an update of the void note edits it (it is not voided again)
    update = Message(UpdateCreditNote(Trigger("/tests", "u1", "credit_note.update"),
                                      note_of(issue), memo="after the void", memo_set=True),
                     Delivery("commands", 0, 3))
    [updated] = await apply_batch([update], backend.unit_of_work)
    assert updated.outcome is Outcome.APPLIED, updated.error
    assert await backend.credit_note_status(note_of(issue)) == "void"
    assert await backend.outcome(key(update)) == "applied"


async def test_a_credit_method_switched_with_no_void_to_free_it_is_refused(
        backend: Backend) -> None:
    """What ``invoice_lines_fixed`` refuses (a method switched while credited, no void of
    the line in the transaction) fails the commit on both, as 23000."""
    await add_invoice(backend, "in_1")
    by_quantity = Message(IssueCreditNote(
        Trigger("/tests", "q1", "credit_note.issue"), "in_1", "other",
        lines=(InvoiceLineByQuantity("il_1", 1),)), Delivery("commands", 0, 1))
    [issued] = await apply_batch([by_quantity], backend.unit_of_work)
    assert issued.outcome is Outcome.APPLIED
    uow = backend.unit_of_work()

    async def switched() -> None:
        async with uow.transaction():
            invoice = (await uow.lock(["in_1"])).invoices["in_1"]
            assert invoice is not None
            assert invoice.lines[0].credit_method is CreditMethod.QUANTITY
            invoice.lines[0].credit_method = CreditMethod.AMOUNT  # no void freed it
            await uow.save(invoice)

    with pytest.raises(errors.RefusedByDatabase) as refused:
        await switched()
    assert "23000" in str(refused.value)
