"""Migration 0008 and ``creditnotes verify`` guard the money rules even against a buggy writer.

Plain SQL on the migrated database (as in test_database_constraints.py): a
policy's cap is checked at commit over all the non-void credit notes of its
trigger type on the invoice; time-based coverage stays inside the service
period; and verify names a line whose coverage disagrees with its credit
notes, and an invoice whose status disagrees with its amounts.

Then the service's own unit of work (``apply_batch`` + ``PostgresUnitOfWork``,
the consumer's path) writes what the domain decided: times in UTC whatever
their offset, the figures of an invoice finalized in the same batch, and a
void's credit note read only under its invoice's lock.

Last, migration 0016 on a database that predates it: the cash already
received becomes payment 0, each earlier refund a pending refund on it, and
an outcome arriving after the upgrade settles it like any other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from asyncpg.exceptions import CheckViolationError

from service.adapters.invariants import check_invariants
from service.adapters.migrations import migrate
from service.adapters.unit_of_work import PostgresUnitOfWork
from service.domain.commands import (
    DraftLine,
    FinalizeInvoice,
    IssueCreditNote,
    OnExcess,
    RecordPayment,
    RecordRefundOutcome,
    ServicePeriod,
    Settlement,
    Trigger,
    UnusedTime,
    VoidCreditNote,
)
from service.domain.credit_note import derived_id
from service.domain.refunds import RefundState
from service.handlers import Delivery, Message, Outcome, Result, apply_batch
from service.settings import MIGRATIONS_DIR, Topics
from tests.integration.test_database_constraints import (
    INVOICE,
    TOTAL,
    add_credit_note,
    add_invoice,
    credited,
)
from tests.servers import Servers, create_database, drop_database

pytestmark = pytest.mark.integration
SLA = {"trigger_type": "sla.breached", "policy": "sla.breached:max_credit_bps=5000"}


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    try:
        await add_invoice(connection)
        yield connection
    finally:
        await connection.close()


async def test_credit_notes_of_one_policy_add_up_to_at_most_its_cap_at_commit(
        db: asyncpg.Connection) -> None:
    await add_credit_note(db, sequence=1, total=TOTAL // 2, **SLA)  # exactly 50%

    with pytest.raises(CheckViolationError, match="policy cap"):
        await add_credit_note(db, sequence=2, total=1_200, **SLA)

    assert await credited(db) == (TOTAL // 2, 0)
    # another trigger type is not counted against the SLA policy
    await add_credit_note(db, sequence=2, total=1_200, trigger_type="return.received",
                          policy="return.received:max_credit_bps=10000")


async def add_october_invoice(db: asyncpg.Connection, invoice_id: str) -> None:
    """An open invoice of one 100.00 line (no tax) whose service period is October."""
    await db.execute(
        "INSERT INTO invoices (id, number, customer_id, currency, status, subtotal, discount,"
        " tax, total, customer_balance_applied, amount_paid)"
        " VALUES ($1, $1, 'cus_42', 'usd', 'open', 10000, 0, 0, 10000, 0, 0)", invoice_id)
    await db.execute(
        "INSERT INTO invoice_lines (invoice_id, line_id, position, description, quantity,"
        " unit_amount, tax_rate_bps, period_start, period_end, discount, tax)"
        " VALUES ($1, 'il_1', 0, 'Plan', 1, 10000, 0, $2, $3, 0, 0)",
        invoice_id, datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))


async def test_time_based_coverage_stays_inside_the_service_period(
        db: asyncpg.Connection) -> None:
    with pytest.raises(CheckViolationError):  # this line has no service period
        await db.execute("UPDATE invoice_lines SET time_credits = ARRAY[now()]"
                         " WHERE invoice_id = $1", INVOICE)
    await add_october_invoice(db, "in_1002")
    with pytest.raises(CheckViolationError):
        await db.execute("UPDATE invoice_lines SET time_credits = $1 WHERE invoice_id = 'in_1002'",
                         [datetime(2026, 11, 2, tzinfo=UTC)])
    # at the end: covers nothing, the CHECK allows it (0013's guard would then refuse it at
    # commit, as no credit note covers it: rolled back here)
    transaction = db.transaction()
    await transaction.start()
    await db.execute("UPDATE invoice_lines SET time_credits = $1 WHERE invoice_id = 'in_1002'",
                     [datetime(2026, 11, 1, tzinfo=UTC)])
    await transaction.rollback()


async def test_verify_names_coverage_and_status_that_disagree(
        db: asyncpg.Connection, database_url: str) -> None:
    await add_october_invoice(db, "in_1002")
    # a writer past the guards (a superuser without triggers; 0013 refuses this at commit)
    await db.execute("SET session_replication_role = replica")
    # a line that says it was credited from 16 Oct, with no time-based credit note on it
    await db.execute("UPDATE invoice_lines SET time_credits = $1 WHERE invoice_id = 'in_1002'",
                     [datetime(2026, 10, 16, tzinfo=UTC)])
    # an open invoice with nothing left to pay
    await db.execute("UPDATE invoices SET amount_paid = total WHERE id = $1", INVOICE)

    found = {(v.invariant, v.subject) for v in await check_invariants(database_url)
             if v.invariant in ("line_coverage_disagrees", "status_disagrees_with_amounts")}

    assert found == {("line_coverage_disagrees", "invoice line in_1002/il_1"),
                     ("status_disagrees_with_amounts", f"invoice {INVOICE}")}


# --- the unit of work writes what the domain decided -----------------------------------

OCT1, NOV1 = datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as created:
        yield created


def units(pool: asyncpg.Pool, kind: type[PostgresUnitOfWork] = PostgresUnitOfWork,
          ) -> Callable[[], PostgresUnitOfWork]:
    return lambda: kind(pool, Topics())


def finalized(invoice_id: str) -> Message:
    """An open invoice of one 100.00 line (10 x 10.00, no tax) over October."""
    return Message(FinalizeInvoice(
        Trigger("/tests", f"fin-{invoice_id}", "invoice.finalized"), invoice_id, invoice_id,
        "cus_42", "usd", "open", (DraftLine("il_1", "Plan", 10, 1_000, 0, ServicePeriod(
            OCT1, NOV1)),)), Delivery("invoices"))


def canceled(event_id: str, invoice_id: str, at: datetime) -> Message:
    return Message(IssueCreditNote(
        Trigger("/tests", event_id, "subscription.canceled"), invoice_id,
        "subscription_cancellation", lines=(UnusedTime("il_1", at),), max_credit_bps=10_000,
        settlement=Settlement.CUSTOMER_BALANCE, on_excess=OnExcess.CAP,
        policy="subscription.canceled:max_credit_bps=10000"), Delivery("cancellations"))


def voided(event_id: str, of_event: str) -> Message:
    note_id = derived_id("cn", Trigger("/tests", of_event, "subscription.canceled"))
    return Message(VoidCreditNote(Trigger("/tests", event_id, "credit_note.void"), note_id),
                   Delivery("credit-note-commands"))


def outcomes(results: list[Result]) -> list[tuple[Outcome | None, str, Any]]:
    return [(r.outcome, r.reason, r.error and r.error.code) for r in results]


async def money_invariants(database_url: str) -> list[Any]:
    # no relay runs here: only the events' publication is behind
    return [v for v in await check_invariants(database_url)
            if not v.invariant.endswith("_unpublished")]


async def test_a_time_with_any_rfc_3339_offset_is_written_in_utc(
        pool: asyncpg.Pool, database_url: str) -> None:
    # 16 Oct 00:00 UTC written with -23:59 (RFC 3339 allows it; PostgreSQL's text form stops
    # at +-15:59 and refused it, SQLSTATE 22009): credited, stored as the same instant
    far = datetime(2026, 10, 15, 0, 1, tzinfo=timezone(-timedelta(hours=23, minutes=59)))
    assert far == datetime(2026, 10, 16, tzinfo=UTC)
    assert outcomes(await apply_batch([finalized("in_7001")], units(pool))) == [
        (Outcome.APPLIED, "", None)]
    results = await apply_batch([canceled("c-far", "in_7001", far)], units(pool))
    assert outcomes(results) == [(Outcome.APPLIED, "", None)]
    row = await pool.fetchrow("SELECT l.time_credits, n.total, nl.covers_from"
                              " FROM invoice_lines l JOIN credit_notes n USING (invoice_id)"
                              " JOIN credit_note_lines nl ON nl.credit_note_id = n.id"
                              " WHERE l.invoice_id = 'in_7001'")
    assert (row["time_credits"], row["covers_from"], row["total"]) == ([far], far, 5_161)
    assert await money_invariants(database_url) == []


async def test_a_batch_finalizing_crediting_and_voiding_an_invoice_keeps_its_numbering(
        pool: asyncpg.Pool, database_url: str) -> None:
    # the invoice new in the batch was inserted without what the batch credited on it:
    # credit_note_count 0 beside CN-01, and every later credit collided on CN-01 for ever
    batch = [finalized("in_7002"), canceled("c1", "in_7002", OCT1 + timedelta(days=15)),
             voided("v1", of_event="c1")]
    assert outcomes(await apply_batch(batch, units(pool))) == [(Outcome.APPLIED, "", None)] * 3
    assert await pool.fetchval(
        "SELECT credit_note_count FROM invoices WHERE id = 'in_7002'") == 1
    later = await apply_batch([canceled("c2", "in_7002", OCT1 + timedelta(days=20))],
                              units(pool))
    assert outcomes(later) == [(Outcome.APPLIED, "", None)]
    numbers = await pool.fetch("SELECT number, status FROM credit_notes ORDER BY sequence")
    assert [tuple(row) for row in numbers] == [("in_7002-CN-01", "void"),
                                               ("in_7002-CN-02", "issued")]
    assert await money_invariants(database_url) == []


async def test_a_batch_finalizing_and_crediting_an_invoice_commits_at_once(
        pool: asyncpg.Pool, database_url: str) -> None:
    # not refused at commit (counters left at 0) and re-applied one message at a time
    opened: list[PostgresUnitOfWork] = []

    def counted() -> PostgresUnitOfWork:
        opened.append(PostgresUnitOfWork(pool, Topics()))
        return opened[-1]

    batch = [finalized("in_7003"), canceled("c1", "in_7003", OCT1 + timedelta(days=15))]
    assert outcomes(await apply_batch(batch, counted)) == [(Outcome.APPLIED, "", None)] * 2
    assert len(opened) == 1  # one transaction for the batch
    row = await pool.fetchrow("SELECT pre_payment_credited, credit_note_count FROM invoices")
    line = await pool.fetchrow("SELECT credited_net, time_credits FROM invoice_lines")
    assert tuple(row) == (5_161, 1)
    assert tuple(line) == (5_161, [OCT1 + timedelta(days=15)])
    assert await money_invariants(database_url) == []


async def test_a_void_reads_its_credit_note_only_under_its_invoices_lock(
        pool: asyncpg.Pool, database_url: str) -> None:
    """Replica A's void finds no note when it looks; another replica then issues the note,
    and voids it just before A locks the invoice. A must see the void: already_void."""
    await apply_batch([finalized("in_7004")], units(pool))

    class Interleaved(PostgresUnitOfWork):
        """Replica A: another replica runs before each of its first two lock rounds."""

        rounds = 0

        async def _load_invoices(self, invoice_ids: Any) -> None:
            Interleaved.rounds += 1
            if Interleaved.rounds == 1:  # A looked for the note: none yet; B issues it
                await apply_batch([canceled("c1", "in_7004", OCT1 + timedelta(days=15))],
                                  units(pool))
            elif Interleaved.rounds == 2:  # A has seen the note; B voids it before A locks
                [b] = await apply_batch([voided("void-b", of_event="c1")], units(pool))
                assert b.outcome is Outcome.APPLIED
            await super()._load_invoices(invoice_ids)

    [a] = await apply_batch([voided("void-a", of_event="c1")], units(pool, Interleaved))

    # before: A voided the note a second time in memory (given back twice), refused at commit
    assert outcomes([a]) == [(Outcome.REJECTED, "already_void", None)]
    row = await pool.fetchrow("SELECT pre_payment_credited, credit_note_count FROM invoices")
    assert tuple(row) == (0, 1)
    assert await money_invariants(database_url) == []


async def test_journals_are_dated_by_the_credit_note_the_void_and_the_refund_outcome(
        pool: asyncpg.Pool, database_url: str) -> None:
    issued_on, voided_on, refunded_on = (datetime(2026, 11, day, 9, tzinfo=UTC)
                                         for day in (2, 3, 4))
    pre = IssueCreditNote(Trigger("/tests", "c-pre", "credit_note.issue", time=voided_on),
                          "in_7101", "other", amount=1_000, effective_at=issued_on)
    void = VoidCreditNote(Trigger("/tests", "v-pre", "credit_note.void", time=voided_on),
                          derived_id("cn", pre.trigger))
    paid = RecordPayment(Trigger("/tests", "p-1", "invoice.payment_succeeded"), "in_7101",
                         9_000, "usd", "pay_1")
    refund = IssueCreditNote(Trigger("/tests", "c-ref", "credit_note.issue", time=issued_on),
                             "in_7101", "other", amount=2_000, settlement=Settlement.REFUND)
    results = await apply_batch([finalized("in_7101")] + [
        Message(command, Delivery("tests")) for command in (pre, void, paid, refund)],
        units(pool))
    assert outcomes(results) == [(Outcome.APPLIED, "", None)] * 5
    refund_id = await pool.fetchval("SELECT refund_id FROM refunds")
    outcome = RecordRefundOutcome(
        Trigger("/payments/refunds", "o-1", "refund.succeeded", time=refunded_on), "in_7101",
        refund_id, RefundState.SUCCEEDED)
    assert outcomes(await apply_batch([Message(outcome, Delivery("refund-results"))],
                                      units(pool))) == [(Outcome.APPLIED, "", None)]

    dates = {(row["number"], row["entry"]): row["dates"] for row in await pool.fetch(
        "SELECT n.number, j.entry, array_agg(DISTINCT j.effective_at) AS dates"
        " FROM journal_lines AS j JOIN credit_notes AS n ON n.id = j.credit_note_id"
        " GROUP BY n.number, j.entry")}
    assert dates == {("in_7101-CN-01", "issue"): [issued_on],
                     ("in_7101-CN-01", "void"): [voided_on],
                     ("in_7101-CN-02", "issue"): [issued_on]}
    assert await pool.fetchval("SELECT array_agg(DISTINCT effective_at) FROM"
                               " refund_journal_lines") == [refunded_on]
    assert await pool.fetchval("SELECT outcome_at FROM refunds") == refunded_on
    assert await money_invariants(database_url) == []


# ------------------------------------------------------- migration 0016 on a live database


@pytest.fixture
async def legacy_url(servers: Servers, tmp_path: Path) -> AsyncIterator[str]:
    """A database migrated up to 0015 only (before the money loop), as one in production was."""
    for path in MIGRATIONS_DIR.glob("00*.sql"):
        if int(path.name[:4]) <= 15:
            (tmp_path / path.name).write_text(path.read_text())
    url = await create_database(servers.database_url)
    await migrate(url, tmp_path)
    yield url
    await drop_database(servers.database_url, url.rsplit("/", 1)[1])


async def test_0016_backfills_cash_as_payment_0_and_legacy_refunds_whose_outcome_then_applies(
        legacy_url: str) -> None:
    connection = await asyncpg.connect(legacy_url)
    try:
        # before 0016: a paid invoice (120.00) with a post-payment note refunded as one
        # legacy refund id, and an open invoice with a pre-payment note
        await add_invoice(connection)
        await add_invoice(connection, "in_2002")
        await add_credit_note(connection, invoice_id="in_2002", total=1_200)
        async with connection.transaction():
            await connection.execute("UPDATE invoices SET amount_paid = $2, status = 'paid'"
                                     " WHERE id = $1", INVOICE, TOTAL)
            await add_credit_note(connection, total=1_200, pre_payment_amount=0,
                                  refund_amount=1_200, refund_id="rf_legacy",
                                  book_on_invoice=False, journal=[
                                      (0, "contra_revenue", 1_000, 0),
                                      (1, "sales_tax_payable", 200, 0),
                                      (2, "refunds_payable", 0, 1_200)])
            await connection.execute(
                "UPDATE invoices SET post_payment_credited = 1200, refunded = 1200,"
                " credit_note_count = 1 WHERE id = $1", INVOICE)
            await connection.execute(
                "UPDATE invoice_lines SET credited_net = 1000, credited_tax = 200,"
                " credit_method = 'amount' WHERE invoice_id = $1", INVOICE)

        assert (await migrate(legacy_url, MIGRATIONS_DIR))[0] == "0016_money_loop.sql"

        payments = await connection.fetch(
            "SELECT invoice_id, sequence, payment_id, amount, applied FROM payments")
        assert [tuple(row) for row in payments] == [(INVOICE, 0, None, TOTAL, TOTAL)]
        refunds = await connection.fetch(
            "SELECT refund_id, invoice_id, payment_sequence, amount, status, linked FROM refunds")
        assert [tuple(row) for row in refunds] == [
            ("rf_legacy", INVOICE, 0, 1_200, "pending", False)]
        assert await connection.fetchval(
            "SELECT count(*) FROM credit_notes WHERE effective_at IS DISTINCT FROM issued_at") == 0
        assert await connection.fetchval(
            "SELECT count(*) FROM journal_lines AS j JOIN credit_notes AS n"
            " ON n.id = j.credit_note_id WHERE j.effective_at IS DISTINCT FROM n.issued_at") == 0
    finally:
        await connection.close()

    # the legacy refund's outcome, arriving after the upgrade, applies like any other
    outcome = RecordRefundOutcome(Trigger("/payments/refunds", "out-1", "refund.succeeded"),
                                  INVOICE, "rf_legacy", RefundState.SUCCEEDED)
    [result] = await _apply_all(legacy_url, [outcome])
    assert result.outcome is Outcome.APPLIED
    connection = await asyncpg.connect(legacy_url)
    try:
        assert await connection.fetchval(
            "SELECT status FROM refunds WHERE refund_id = 'rf_legacy'") == "succeeded"
        lines = await connection.fetch("SELECT account, debit, credit FROM refund_journal_lines"
                                       " WHERE refund_id = 'rf_legacy' ORDER BY position")
        assert [tuple(line) for line in lines] == [("refunds_payable", 1_200, 0),
                                                   ("cash", 0, 1_200)]
    finally:
        await connection.close()


async def _apply_all(url: str, commands: list[Any]) -> list[Result]:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        return [result for command in commands
                for result in await apply_batch([Message(command, Delivery("tests"))],
                                                lambda: PostgresUnitOfWork(pool, Topics()))]
    finally:
        await pool.close()
