"""Batches on the real PostgreSQL: one transaction for many messages, each with its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from service.adapters.unit_of_work import PostgresUnitOfWork
from service.domain import errors
from service.domain.commands import (
    DraftLine,
    FinalizeInvoice,
    IssueCreditNote,
    Trigger,
    VoidCreditNote,
)
from service.domain.credit_note import derived_id
from service.handlers import Delivery, Message, Outcome, UnitOfWork, apply_batch
from service.settings import Topics

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield created
    await created.close()


def units(pool: asyncpg.Pool) -> Callable[[], UnitOfWork]:
    return lambda: PostgresUnitOfWork(pool, Topics())


def trigger(id_: str, type_: str = "credit_note.issue") -> Trigger:
    return Trigger("/tests", id_, type_)


def finalize(invoice_id: str, total: int = 10_000) -> Message:
    return Message(FinalizeInvoice(
        trigger(f"fin-{invoice_id}", "invoice.finalized"), invoice_id, f"ACME-{invoice_id}",
        "cus_1", "usd", "open", (DraftLine("il_1", "Widget", 1, total),)), Delivery("invoices"))


def credit(id_: str, invoice_id: str, amount: int, memo: str | None = None) -> Message:
    return Message(IssueCreditNote(trigger(id_), invoice_id, "other", amount=amount, memo=memo),
                   Delivery("credit-note-commands"))


async def test_a_batch_applies_many_messages_on_one_invoice_in_order_once_each(
        pool: asyncpg.Pool) -> None:
    batch = [finalize("in_1"), *(credit(f"c{n}", "in_1", 1_000) for n in range(5)),
             Message(VoidCreditNote(trigger("v1", "credit_note.void"),
                                    derived_id("cn", trigger("c1"))), Delivery("commands")),
             credit("c0", "in_1", 1_000)]  # the same trigger again, in the same batch

    results = await apply_batch(batch, units(pool))

    assert [r.outcome for r in results] == [Outcome.APPLIED] * 7 + [Outcome.DUPLICATE]
    rows = await pool.fetch("SELECT number, status FROM credit_notes ORDER BY sequence")
    assert [(r["number"], r["status"]) for r in rows] == [
        ("ACME-in_1-CN-01", "issued"), ("ACME-in_1-CN-02", "void"),
        ("ACME-in_1-CN-03", "issued"), ("ACME-in_1-CN-04", "issued"),
        ("ACME-in_1-CN-05", "issued")]
    invoice = await pool.fetchrow("SELECT pre_payment_credited FROM invoices")
    assert invoice is not None and invoice["pre_payment_credited"] == 4_000
    types = [r["type"] for r in await pool.fetch("SELECT type FROM outbox ORDER BY seq")]
    assert types == ["credit_note.issued"] * 5 + ["credit_note.voided"]
    assert await pool.fetchval("SELECT count(*) FROM processed_messages") == 7


async def test_a_message_the_database_refuses_is_isolated_and_the_others_applied(
        pool: asyncpg.Pool) -> None:
    batch = [finalize("in_1"), credit("ok-1", "in_1", 1_000),
             credit("bad", "in_1", 1_000, memo="nul \x00 inside"), credit("ok-2", "in_1", 2_000)]

    results = await apply_batch(batch, units(pool))

    assert [r.outcome for r in results] == [Outcome.APPLIED, Outcome.APPLIED, None,
                                            Outcome.APPLIED]
    assert isinstance(results[2].error, errors.RefusedByDatabase)
    totals = [r["total"] for r in await pool.fetch(
        "SELECT total FROM credit_notes ORDER BY sequence")]
    assert totals == [1_000, 2_000]
    # its effect never committed; its dead-letter decision did (a redelivery resends it)
    assert await pool.fetchval(
        "SELECT outcome FROM processed_messages WHERE id = 'bad'") == (
        "dead_lettered:refused_by_database")


async def test_an_undeliverable_message_gives_back_its_key_and_leaves_the_batch_alone(
        pool: asyncpg.Pool) -> None:
    batch = [finalize("in_1"), credit("early", "in_unknown", 500), credit("ok", "in_1", 700)]

    results = await apply_batch(batch, units(pool))

    assert isinstance(results[1].error, errors.InvoiceNotFound)
    assert [results[0].outcome, results[2].outcome] == [Outcome.APPLIED, Outcome.APPLIED]
    assert await pool.fetchval(
        "SELECT outcome FROM processed_messages WHERE id = 'early'") == (
        "released:invoice_not_found")
    # once the invoice exists, the same message applies (its key was given back)
    await apply_batch([finalize("in_unknown")], units(pool))
    [again] = await apply_batch([credit("early", "in_unknown", 500)], units(pool))
    assert again.outcome is Outcome.APPLIED


async def test_concurrent_batches_on_the_same_invoices_neither_deadlock_nor_over_credit(
        pool: asyncpg.Pool) -> None:
    await apply_batch([finalize("in_a"), finalize("in_b")], units(pool))
    first = [credit(f"a{n}", "in_a" if n % 2 else "in_b", 1_000) for n in range(12)]
    second = [credit(f"b{n}", "in_b" if n % 2 else "in_a", 1_000) for n in range(12)]

    done = await asyncio.wait_for(asyncio.gather(apply_batch(first, units(pool)),
                                                 apply_batch(second, units(pool))), 30)

    outcomes = [r.outcome for results in done for r in results]
    assert outcomes.count(Outcome.APPLIED) == 20  # 10 of 10.00 fit on each 100.00 invoice
    assert outcomes.count(Outcome.REJECTED) == 4
    for invoice_id in ("in_a", "in_b"):
        row = await pool.fetchrow("SELECT pre_payment_credited, status FROM invoices"
                                  " WHERE id = $1", invoice_id)
        assert row is not None and (row["pre_payment_credited"], row["status"]) == (10_000,
                                                                                    "paid")
