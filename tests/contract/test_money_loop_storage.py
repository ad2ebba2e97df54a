"""The unit of work's contract for the money loop (issue 12), on the fake and on PostgreSQL.

Payments, refunds and their outcomes, linked refund ids and credit-note edits
are written with the invoice that recorded them and read back with it under
its lock; an upstream event that had one of these effects is a duplicate even
once retention pruned its ledger row; a refund id is taken once, anywhere.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from service.domain import errors
from service.domain.commands import (
    DraftLine,
    FinalizeInvoice,
    IssueCreditNote,
    RecordPayment,
    RecordRefundOutcome,
    Settlement,
    Trigger,
    UpdateCreditNote,
)
from service.domain.invoice import finalize_invoice
from service.domain.issuing import price_credit_note
from service.domain.payments import Payment
from service.domain.refunds import FailureSettlement, LinkedRefund, RefundState
from service.ports import Delivery, Message, UnitOfWork, key_of
from tests.contract.conftest import Backend

EFFECTIVE = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def message(command: object, offset: int = 1) -> Message:
    return Message(command, Delivery("tests", 0, offset))  # type: ignore[arg-type]


async def add_invoice(backend: Backend, invoice_id: str, *, total: int = 10_000,
                      paid: int = 0, customer_id: str = "cus_1") -> None:
    command = FinalizeInvoice(Trigger("/tests", f"fin-{invoice_id}", "invoice.finalized"),
                              invoice_id, f"ACME-{invoice_id}", customer_id, "usd", "open",
                              (DraftLine("il_1", "Widget", 1, total),), amount_paid=paid)
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message(command)])
        await uow.add(finalize_invoice(command))


def payment(id_: str, invoice_id: str, amount: int, payment_id: str | None) -> RecordPayment:
    return RecordPayment(Trigger("/payments", id_, "invoice.payment_succeeded"), invoice_id,
                         amount, "usd", payment_id)


async def pay(backend: Backend, command: RecordPayment) -> None:
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message(command)])
        invoice = (await uow.lock([command.invoice_id])).invoices[command.invoice_id]
        assert invoice is not None
        invoice.receive_payment(command.payment_id, command.amount, command.currency,
                                command.trigger)
        await uow.save(invoice)


def refund_credit(id_: str, invoice_id: str, amount: int, *,
                  linked: tuple[LinkedRefund, ...] = ()) -> IssueCreditNote:
    return IssueCreditNote(Trigger("/tests", id_, "credit_note.issue"), invoice_id, "other",
                           amount=amount, settlement=Settlement.REFUND, linked_refunds=linked,
                           effective_at=EFFECTIVE)


async def issue(uow: UnitOfWork, command: IssueCreditNote) -> str:
    """What the issuing handler does, with the linked ids the lock reports as taken."""
    locked = await uow.lock([command.invoice_id],
                            refund_ids=[refund.refund_id for refund in command.linked_refunds])
    invoice = locked.invoices[command.invoice_id]
    assert invoice is not None
    note = invoice.issue(price_credit_note(invoice, command, now=NOW,
                                           taken_refund_ids=locked.taken_refund_ids))
    await uow.add(note)
    await uow.save(invoice)
    return note.id


async def issued(backend: Backend, command: IssueCreditNote) -> str:
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message(command)])
        return await issue(uow, command)


# ------------------------------------------------------------------------- payments


async def test_payments_are_read_back_with_their_invoice_oldest_first(backend: Backend) -> None:
    await add_invoice(backend, "in_1", paid=4_000)
    await pay(backend, payment("p1", "in_1", 3_000, "pay_1"))
    await pay(backend, payment("p2", "in_1", 5_000, None))  # 3,000 applied, 2,000 over

    uow = backend.unit_of_work()
    async with uow.transaction():
        invoice = (await uow.lock(["in_1"])).invoices["in_1"]
    assert invoice is not None
    assert invoice.payments == [Payment(0, None, 4_000, 4_000), Payment(1, "pay_1", 3_000, 3_000),
                                Payment(2, None, 5_000, 3_000)]
    assert [p.trigger and key_of(p.trigger) for p in invoice.payments] == [
        None, ("/payments", "p1"), ("/payments", "p2")]
    assert await backend.figures("in_1") == ("paid", 10_000, 0, 0)
    assert [entry[:2] for entry in await backend.outbox()] == [
        ("customer_balance.credited", "cus_1")]  # keyed by the customer


async def test_a_payment_event_is_a_duplicate_even_after_retention_pruned_its_key(
        backend: Backend) -> None:
    await add_invoice(backend, "in_1")
    command = payment("p1", "in_1", 3_000, None)
    await pay(backend, command)
    await backend.forget(key_of(command.trigger))

    uow = backend.unit_of_work()
    async with uow.transaction():
        claims = await uow.claim([message(command, offset=9)])
    assert claims.claimed == frozenset()


# -------------------------------------------------------------------------- refunds


async def test_refunds_are_written_per_payment_and_read_back_with_invoice_and_note(
        backend: Backend) -> None:
    await add_invoice(backend, "in_1")
    await pay(backend, payment("p1", "in_1", 6_000, "pay_1"))
    await pay(backend, payment("p2", "in_1", 4_000, "pay_2"))
    note_id = await issued(backend, refund_credit("c1", "in_1", 7_000))

    uow = backend.unit_of_work()
    async with uow.transaction():
        locked = await uow.lock([], [note_id])
    invoice, note = locked.invoices["in_1"], locked.credit_notes[note_id]
    assert invoice is not None and note is not None
    assert [(r.payment_id, r.amount, r.state) for r in note.refunds] == [
        ("pay_2", 4_000, RefundState.PENDING), ("pay_1", 3_000, RefundState.PENDING)]
    assert invoice.refunds == list(note.refunds)
    assert (invoice.refunded, invoice.refunds_failed) == (7_000, 0)
    assert note.effective_at == EFFECTIVE
    assert sorted(await backend.refunds("in_1")) == sorted(
        (r.refund_id, r.payment_sequence, "pending") for r in note.refunds)
    requested = [entry for entry in await backend.outbox() if entry[0] == "refund.requested"]
    assert len(requested) == 2


async def test_an_outcome_is_written_with_its_invoice_and_its_event_is_then_a_duplicate(
        backend: Backend) -> None:
    await add_invoice(backend, "in_1", paid=10_000)
    note_id = await issued(backend, refund_credit("c1", "in_1", 2_500))
    [(refund_id, _, _)] = await backend.refunds("in_1")
    outcome = RecordRefundOutcome(Trigger("/payments/refunds", "o1", "refund.failed"), "in_1",
                                  refund_id, RefundState.FAILED, failure_reason="card expired")

    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message(outcome)])
        invoice = (await uow.lock(["in_1"])).invoices["in_1"]
        assert invoice is not None
        invoice.settle_refund(refund_id, outcome.outcome, outcome.trigger,
                              failure_reason=outcome.failure_reason,
                              settlement=FailureSettlement.CUSTOMER_BALANCE, now=NOW)
        await uow.save(invoice)

    assert await backend.refunds("in_1") == [(refund_id, 0, "failed")]
    uow = backend.unit_of_work()
    async with uow.transaction():
        locked = await uow.lock([], [note_id])
    invoice, note = locked.invoices["in_1"], locked.credit_notes[note_id]
    assert invoice is not None and note is not None
    [refund] = invoice.refunds
    assert (refund.state, refund.failure_reason, refund.resettled_to) == (
        RefundState.FAILED, "card expired", FailureSettlement.CUSTOMER_BALANCE)
    assert refund.settled_by is not None and key_of(refund.settled_by) == key_of(outcome.trigger)
    assert (invoice.refunded, invoice.refunds_failed) == (2_500, 2_500)
    assert note.refunds == (refund,)
    types = [(type_, key) for type_, key, _ in await backend.outbox()]
    assert types[-2:] == [("credit_note.refund_failed", "in_1"),
                          ("customer_balance.credited", "cus_1")]

    await backend.forget(key_of(outcome.trigger))
    uow = backend.unit_of_work()
    async with uow.transaction():
        assert (await uow.claim([message(outcome, offset=5)])).claimed == frozenset()


async def test_a_refund_id_is_taken_once_committed_or_recorded_in_the_same_batch(
        backend: Backend) -> None:
    for invoice_id in ("in_a", "in_b", "in_c"):
        await add_invoice(backend, invoice_id, paid=10_000)
    await issued(backend, refund_credit("c1", "in_a", 2_000,
                                        linked=(LinkedRefund("re_1", 2_000),)))

    uow = backend.unit_of_work()
    async with uow.transaction():
        locked = await uow.lock(["in_b"], refund_ids=["re_1", "re_2"])
        assert locked.taken_refund_ids == {"re_1"}
        await uow.claim([message(refund_credit("c2", "in_b", 1_000,
                                               linked=(LinkedRefund("re_2", 1_000),)))])
        await issue(uow, refund_credit("c2", "in_b", 1_000, linked=(LinkedRefund("re_2", 1_000),)))
        again = await uow.lock(["in_c"], refund_ids=["re_2", "re_3"])
        assert again.taken_refund_ids == {"re_2"}
    assert await backend.refunds("in_b") == [("re_2", 0, "succeeded")]


async def test_the_same_refund_id_linked_twice_in_one_commit_is_refused(
        backend: Backend) -> None:
    for invoice_id in ("in_a", "in_b"):
        await add_invoice(backend, invoice_id, paid=10_000)
    first = refund_credit("c1", "in_a", 1_000, linked=(LinkedRefund("re_9", 1_000),))
    second = refund_credit("c2", "in_b", 1_000, linked=(LinkedRefund("re_9", 1_000),))
    uow = backend.unit_of_work()

    async def both() -> None:  # as two concurrent batches would, neither seeing the other
        async with uow.transaction():
            await uow.claim([message(first), message(second)])
            for command in (first, second):
                invoice = (await uow.lock([command.invoice_id])).invoices[command.invoice_id]
                assert invoice is not None
                await uow.add(invoice.issue(price_credit_note(invoice, command, now=NOW)))
                await uow.save(invoice)

    with pytest.raises(errors.RefusedByDatabase):
        await both()
    assert await backend.refunds("in_a") == []
    assert await backend.refunds("in_b") == []


# ---------------------------------------------------------------------------- edits


async def test_a_credit_note_update_is_written_and_read_back_and_is_then_a_duplicate(
        backend: Backend) -> None:
    await add_invoice(backend, "in_1")
    note_id = await issued(backend, IssueCreditNote(
        Trigger("/tests", "c1", "credit_note.issue"), "in_1", "other", amount=1_000,
        memo="first", metadata={"a": "1", "b": "2"}))
    update = UpdateCreditNote(Trigger("/tests", "u1", "credit_note.update"), note_id,
                              memo=None, memo_set=True, metadata_patch={"a": None, "c": "3"})

    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message(update)])
        locked = await uow.lock([], [note_id])
        note, invoice = locked.credit_notes[note_id], locked.invoices["in_1"]
        assert note is not None and invoice is not None
        updated = invoice.update_credit_note(note, update.trigger, memo=update.memo,
                                             memo_set=update.memo_set,
                                             metadata_patch=update.metadata_patch)
        await uow.save(updated)
        await uow.save(invoice)

    uow = backend.unit_of_work()
    async with uow.transaction():
        note = (await uow.lock([], [note_id])).credit_notes[note_id]
    assert note is not None and (note.memo, note.metadata) == (None, {"b": "2", "c": "3"})
    assert (await backend.outbox())[-1][:2] == ("credit_note.updated", "in_1")

    await backend.forget(key_of(update.trigger))
    uow = backend.unit_of_work()
    async with uow.transaction():
        assert (await uow.claim([message(update, offset=3)])).claimed == frozenset()


async def test_a_credit_note_changes_only_by_a_void_or_in_memo_and_metadata(
        backend: Backend) -> None:
    await add_invoice(backend, "in_1")
    note_id = await issued(backend, IssueCreditNote(
        Trigger("/tests", "c1", "credit_note.issue"), "in_1", "other", amount=1_000))
    uow = backend.unit_of_work()
    async with uow.transaction():
        note = (await uow.lock([], [note_id])).credit_notes[note_id]
        assert note is not None
        with pytest.raises(ValueError, match="only by being voided"):
            await uow.save(dataclasses.replace(note, refund_amount=1))


async def test_a_key_recorded_as_a_duplicate_is_never_claimed_again(backend: Backend) -> None:
    # a payment or an outcome seen before (same payment id, same outcome) is recorded
    # "duplicate:<what>": an outcome of its own, like applied or rejected
    command = payment("p9", "in_9", 100, "pay_9")
    uow = backend.unit_of_work()
    async with uow.transaction():
        assert (await uow.claim([message(command)])).claimed == {key_of(command.trigger)}
        assert await uow.record(message(command), "duplicate:payment")
    assert await backend.outcome(key_of(command.trigger)) == "duplicate:payment"

    uow = backend.unit_of_work()
    async with uow.transaction():
        assert (await uow.claim([message(command, offset=2)])).claimed == frozenset()
    assert await backend.outcome(key_of(command.trigger)) == "duplicate:payment"


async def test_a_refund_requested_and_settled_in_one_batch_commits_together(
        backend: Backend) -> None:
    # PostgreSQL inserts a requested refund pending only (refunds_written_with_their_note):
    # one settled in the batch that requested it is inserted pending, then settled
    await add_invoice(backend, "in_1", paid=10_000)
    command = refund_credit("c1", "in_1", 2_500)
    uow = backend.unit_of_work()
    async with uow.transaction():
        await uow.claim([message(command)])
        invoice = (await uow.lock(["in_1"])).invoices["in_1"]
        assert invoice is not None
        await uow.add(invoice.issue(price_credit_note(invoice, command, now=NOW)))
        [refund] = invoice.refunds
        invoice.settle_refund(refund.refund_id, RefundState.SUCCEEDED,
                              Trigger("/payments/refunds", "o1", "refund.succeeded"), now=NOW)
        await uow.save(invoice)

    assert await backend.refunds("in_1") == [(refund.refund_id, 0, "succeeded")]
    types = [type_ for type_, _, _ in await backend.outbox()]
    assert types[-2:] == ["refund.requested", "credit_note.refund_succeeded"]
