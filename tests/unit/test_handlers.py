"""``apply_batch`` through the in-memory unit of work: the batch rules, no servers.

Together in one transaction when it can; one message at a time when it
cannot, the failing one isolated, retried, then dead-lettered; duplicates
have no second effect; a dead letter is decided in the ledger, once.
"""

from __future__ import annotations

from typing import Any

import pytest

from service import handlers
from service.domain import errors
from service.domain.commands import (
    DraftLine,
    FinalizeInvoice,
    IssueCreditNote,
    Trigger,
    VoidCreditNote,
)
from service.domain.credit_note import derived_id
from service.handlers import Delivery, Message, Outcome, Result, apply_batch, decide_dead_letter
from tests.fakes import FakeStore


def finalized(invoice_id: str = "in_1", total: int = 10_000) -> Message:
    return Message(FinalizeInvoice(
        Trigger("/tests", f"fin-{invoice_id}", "invoice.finalized"), invoice_id,
        f"ACME-{invoice_id}", "cus_1", "usd", "open",
        (DraftLine("il_1", "Widget", 1, total),)), Delivery("invoices", 0, 0))


_offsets = iter(range(1, 1_000_000))


def credit(id_: str, amount: int = 1_000, invoice_id: str = "in_1", *,
           memo: str | None = None, offset: int | None = None) -> Message:
    return Message(IssueCreditNote(Trigger("/tests", id_, "credit_note.issue"), invoice_id,
                                   "other", amount=amount, memo=memo),
                   Delivery("commands", 0, next(_offsets) if offset is None else offset))


def void(id_: str, of: str) -> Message:
    return Message(VoidCreditNote(Trigger("/tests", id_, "credit_note.void"),
                                  derived_id("cn", Trigger("/tests", of, "credit_note.issue"))),
                   Delivery("commands", 0, next(_offsets)))


def outcomes(results: list[Result]) -> list[tuple[str, str]]:
    return [(str(r.outcome) if r.outcome else f"dead:{r.decided}",
             r.reason or (r.error.code if r.error else "")) for r in results]


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


async def test_a_batch_is_applied_in_one_transaction_in_order(store: FakeStore) -> None:
    results = await apply_batch(
        [finalized(), credit("c1", 6_000), credit("c2", 6_000), credit("c1", 1)],
        store.unit_of_work)

    assert outcomes(results) == [("applied", ""), ("applied", ""),
                                 ("rejected", "exceeds_creditable_amount"), ("duplicate", "")]
    assert store.commits == 1
    assert store.invoices["in_1"].pre_payment_credited == 6_000
    assert [row[3] for row in store.outbox] == ["credit_note.issued", "credit_note.rejected"]
    assert store.outcome(("/tests", "c2")) == "rejected:exceeds_creditable_amount"


async def test_a_redelivered_message_has_no_second_effect(store: FakeStore) -> None:
    await apply_batch([finalized(), credit("c1")], store.unit_of_work)
    [again] = await apply_batch([credit("c1")], store.unit_of_work)
    assert again.outcome is Outcome.DUPLICATE
    assert len(store.credit_notes) == 1
    assert len(store.outbox) == 1


async def test_a_void_and_its_credit_note_in_one_batch(store: FakeStore) -> None:
    results = await apply_batch([finalized(), credit("c1", 2_000), void("v1", of="c1")],
                                store.unit_of_work)
    assert outcomes(results) == [("applied", "")] * 3
    assert store.invoices["in_1"].pre_payment_credited == 0
    assert [row[3] for row in store.outbox] == ["credit_note.issued", "credit_note.voided"]


async def test_a_rejected_void_is_keyed_with_its_credit_notes_invoice(store: FakeStore) -> None:
    await apply_batch([finalized(), credit("c1", 2_000), void("v1", of="c1")],
                      store.unit_of_work)
    [again] = await apply_batch([void("v2", of="c1")], store.unit_of_work)
    assert (again.outcome, again.reason) == (Outcome.REJECTED, "already_void")
    assert store.outbox[-1][2:4] == ("in_1", "credit_note.rejected")


async def test_a_refused_message_is_isolated_and_the_others_applied_one_by_one(
        store: FakeStore) -> None:
    await apply_batch([finalized()], store.unit_of_work)
    results = await apply_batch(
        [credit("c1"), credit("bad", memo="nul \x00"), credit("c2")], store.unit_of_work,
        attempts=3, pause=_never_called)

    assert outcomes(results) == [("applied", ""), ("dead:True", "refused_by_database"),
                                 ("applied", "")]
    assert results[1].attempts == 1  # a refused value (SQLSTATE 22) is not tried again
    assert store.commits == 1 + 3  # finalize; then c1, the decision and c2, each alone
    assert store.outcome(("/tests", "bad")) == "dead_lettered:refused_by_database"
    assert store.invoices["in_1"].credit_note_count == 2


async def _never_called(message: Message, error: errors.Undeliverable, attempt: int) -> bool:
    raise AssertionError("a deterministic refusal is not retried")


async def test_a_failing_message_is_tried_alone_attempts_times_before_the_next_one(
        store: FakeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real = handlers._HANDLERS[IssueCreditNote]
    tried: list[str] = []

    async def flaky(command: Any, uow: Any) -> None:
        tried.append(command.trigger.id)
        if command.trigger.id == "bug":
            raise KeyError("jane@example.com")
        await real(command, uow)

    monkeypatch.setitem(handlers._HANDLERS, IssueCreditNote, flaky)
    paused: list[int] = []

    async def pause(message: Message, error: errors.Undeliverable, attempt: int) -> bool:
        paused.append(attempt)
        return True

    await apply_batch([finalized()], store.unit_of_work)
    results = await apply_batch([credit("c1"), credit("bug"), credit("c2")],
                                store.unit_of_work, attempts=3, pause=pause)

    assert outcomes(results) == [("applied", ""), ("dead:True", "processing_failed"),
                                 ("applied", "")]
    assert results[1].attempts == 3 and paused == [1, 2]
    assert results[1].error is not None
    assert "jane" not in str(results[1].error)
    # together once, then alone: c1, bug three times, c2 (after bug: order kept)
    assert tried == ["c1", "bug", "c1", "bug", "bug", "bug", "c2"]
    assert store.outcome(("/tests", "bug")) == "dead_lettered:processing_failed"


async def test_a_message_waiting_for_its_invoice_gives_its_key_back(store: FakeStore) -> None:
    [waiting] = await apply_batch([credit("c1", invoice_id="in_late")], store.unit_of_work)
    assert waiting.error is not None and waiting.error.code == "invoice_not_found"
    assert not waiting.decided
    assert store.outcome(("/tests", "c1")) == "released:invoice_not_found"

    await apply_batch([finalized("in_late")], store.unit_of_work)
    [later] = await apply_batch([credit("c1", invoice_id="in_late")], store.unit_of_work)
    assert later.outcome is Outcome.APPLIED


async def test_an_invalid_message_is_dead_lettered_in_its_own_transaction(
        store: FakeStore) -> None:
    bad = Message(FinalizeInvoice(Trigger("/tests", "fin-x", "invoice.finalized"), "in_x",
                                  "ACME-x", "cus_1", "usd", "open", ()), Delivery("invoices"))
    [result] = await apply_batch([bad], store.unit_of_work)
    assert (result.decided, result.error and result.error.code) == (True, "invalid_message")
    assert store.outcome(("/tests", "fin-x")) == "dead_lettered:invalid_message"
    assert store.commits == 1


async def test_a_redelivered_dead_letter_is_sent_again_not_reevaluated(
        store: FakeStore) -> None:
    await apply_batch([finalized()], store.unit_of_work)
    bad = credit("bad", memo="\x00", offset=500)
    [first] = await apply_batch([bad], store.unit_of_work)
    assert first.decided
    [again] = await apply_batch([bad], store.unit_of_work)
    assert again.decided and again.error is not None
    assert again.error.code == "refused_by_database"
    assert isinstance(again.error, errors.RefusedByDatabase)
    assert "earlier delivery" in str(again.error)

    replay = credit("bad", offset=501)  # the same key from another record: evaluated
    [replayed] = await apply_batch([replay], store.unit_of_work)
    assert replayed.outcome is Outcome.APPLIED


async def test_a_dead_letter_is_not_decided_for_a_key_applied_meanwhile(
        store: FakeStore) -> None:
    await apply_batch([finalized()], store.unit_of_work)
    message = credit("c1")
    await apply_batch([message], store.unit_of_work)  # another replica applied it
    result = await decide_dead_letter(message, errors.InvoiceNotFound("waited"),
                                      store.unit_of_work, 3)
    assert (result.outcome, result.decided, result.attempts) == (Outcome.DUPLICATE, False, 3)
    assert store.outcome(("/tests", "c1")) == "applied"


async def test_an_outage_propagates_after_telling_what_was_committed(
        store: FakeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    await apply_batch([finalized()], store.unit_of_work)
    real = handlers._HANDLERS[IssueCreditNote]

    async def handler(command: Any, uow: Any) -> None:
        if command.trigger.id == "poison":
            raise KeyError("x")
        await real(command, uow)

    monkeypatch.setitem(handlers._HANDLERS, IssueCreditNote, handler)

    def outage_at_c2(uow: Any) -> None:
        if ("/tests", "c2") in uow.claimed:
            raise errors.Unavailable("PostgreSQL: connection reset")

    store.before_commit = outage_at_c2
    told: list[list[str]] = []
    with pytest.raises(errors.Unavailable):
        await apply_batch([credit("poison"), credit("c1"), credit("c2")], store.unit_of_work,
                          committed=lambda results: told.append(
                              [r.message.command.trigger.id for r in results]))
    assert told == [["poison", "c1"]]
    assert store.outcome(("/tests", "c1")) == "applied"
    assert store.outcome(("/tests", "c2")) is None
