"""The fake unit of work serialises on an invoice as PostgreSQL's row lock does.

Two units of work on one invoice at once: the second waits in ``lock`` until
the first's transaction ends, then reads what it committed. (Before: both
worked on copies and the last commit won: two notes numbered CN-01, the
invoice counting one.)
"""

from __future__ import annotations

import asyncio

from service.domain.commands import IssueCreditNote
from service.domain.issuing import price_credit_note
from service.handlers import Outcome, apply_batch
from service.ports import Message
from tests.fakes import FakeStore, FakeUnitOfWork
from tests.unit.test_handlers import credit, finalized


async def _issue(uow: FakeUnitOfWork, message: Message, entered: asyncio.Event,
                 go: asyncio.Event) -> None:
    command = message.command
    assert isinstance(command, IssueCreditNote)
    async with uow.transaction():
        await uow.claim([message])
        entered.set()
        await go.wait()  # the other unit of work tries its lock meanwhile
        invoice = (await uow.lock([command.invoice_id])).invoices[command.invoice_id]
        assert invoice is not None
        await asyncio.sleep(0)
        await uow.add(invoice.issue(price_credit_note(invoice, command)))
        await uow.save(invoice)


async def test_two_units_of_work_on_one_invoice_take_turns() -> None:
    store = FakeStore()
    [applied] = await apply_batch([finalized(total=10_000)], store.unit_of_work)
    assert applied.outcome is Outcome.APPLIED
    go = asyncio.Event()
    entered = [asyncio.Event(), asyncio.Event()]
    both = [asyncio.create_task(_issue(store.unit_of_work(), message, started, go))
            for message, started in zip([credit("c1", 1_000), credit("c2", 1_000)], entered,
                                        strict=True)]
    await asyncio.gather(*(started.wait() for started in entered))
    go.set()
    await asyncio.wait_for(asyncio.gather(*both), 5)

    invoice = store.invoices["in_1"]
    notes = sorted(note.number for note in store.credit_notes.values())
    assert (invoice.credit_note_count, invoice.pre_payment_credited) == (2, 2_000)
    assert len(set(notes)) == 2, notes


async def test_a_lock_is_released_when_the_transaction_fails() -> None:
    store = FakeStore()
    await apply_batch([finalized()], store.unit_of_work)
    uow = store.unit_of_work()
    try:
        async with uow.transaction():
            await uow.lock(["in_1"])
            raise RuntimeError("the batch failed")
    except RuntimeError:
        pass
    [result] = await asyncio.wait_for(apply_batch([credit("c1")], store.unit_of_work), 5)
    assert result.outcome is Outcome.APPLIED
