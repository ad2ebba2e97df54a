"""Migration 0018: the running totals the deferred checks read equal the sums of history.

The checks of 0001, 0004, 0008, 0013 and 0016 no longer add up an invoice's history
at every commit: they read totals that triggers keep as credit notes, their lines,
payments and refunds are written. Here the service's own path (``apply_batch`` +
``PostgresUnitOfWork``) writes Hypothesis-generated sequences of issues (by amount,
by quantity, for unused time, under a policy cap, refunded), voids, payments and
refund outcomes, and after every batch each totals table must equal the sums of the
history it stands for. Nobody writes the totals directly: the application role has no
privilege, the migrator and a superuser are refused by a trigger. A database already
at 0016, with history, gets its totals backfilled. Last, a batch's time at 0 and at
2,000 notes on one invoice is printed (a figure for the record, not an assertion).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.adapters.invariants import TOTALS_DISAGREE, check_invariants
from service.adapters.migrations import migrate
from service.adapters.unit_of_work import PostgresUnitOfWork
from service.domain.commands import (
    Command,
    DraftLine,
    FinalizeInvoice,
    InvoiceLineByQuantity,
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
from tests.integration.test_database_attacks import (  # noqa: F401  (fixtures)
    A1,
    A2,
    A,
    Roles,
    _attempt,
    _forged_note,
    _journal,
    ledger,
    roles,
)
from tests.servers import Servers, create_database, drop_database

pytestmark = pytest.mark.integration

OCT1, NOV1 = datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)
TOTALS = ("invoice_totals", "invoice_trigger_credit_totals", "invoice_line_credit_totals",
          "payment_refund_totals")

# ------------------------------------------------------------------ totals against history

async def drift(connection: asyncpg.Connection | asyncpg.Pool) -> list[tuple[str, str]]:
    """(subject, detail) of each totals row that disagrees with its history: what
    `creditnotes verify` reports as totals_disagree (its query)."""
    return sorted((row["subject"], row["detail"])
                  for row in await connection.fetch(TOTALS_DISAGREE))


# ---------------------------------------------------------------------------- the commands


def _finalize(invoice_id: str) -> FinalizeInvoice:
    return FinalizeInvoice(
        Trigger("/tests", f"fin-{invoice_id}", "invoice.finalized"), invoice_id,
        f"N-{invoice_id}", "cus_42", "usd", "open",
        (DraftLine("il_1", "Widget", 10, 1_000, tax_rate_bps=2_000),
         DraftLine("il_2", "Plan", 1, 3_100, period=ServicePeriod(OCT1, NOV1))))


#: one generated step: (kind, invoice 0/1, a number); resolved to a command per batch
Step = tuple[str, int, int]
steps = st.tuples(
    st.sampled_from(["amount", "capped", "quantity", "unused", "refund", "void", "pay",
                     "succeeded", "failed"]),
    st.integers(min_value=0, max_value=1),
    st.integers(min_value=1, max_value=16_000))


class Story:
    """Commands of one example on its own two invoices (the database is shared)."""

    def __init__(self) -> None:
        run = uuid.uuid4().hex[:10]
        self.invoices = (f"in_{run}_a", f"in_{run}_b")
        self.issued: list[str] = []
        self.count = 0

    def trigger(self, type_: str) -> Trigger:
        self.count += 1
        return Trigger("/tests", f"{self.invoices[0]}-{self.count}", type_,
                       time=datetime(2026, 10, 20, tzinfo=UTC))

    async def command(self, step: Step, pool: asyncpg.Pool) -> Command:
        kind, which, number = step
        invoice = self.invoices[which]
        command: Command
        if kind in ("succeeded", "failed"):
            pending = await pool.fetch("SELECT refund_id FROM refunds WHERE invoice_id = $1"
                                       " AND status = 'pending' ORDER BY refund_id", invoice)
            refund = pending[number % len(pending)]["refund_id"] if pending else "rf_none"
            return RecordRefundOutcome(self.trigger(f"refund.{kind}"), invoice, refund,
                                       RefundState(kind))
        if kind == "pay":
            return RecordPayment(self.trigger("invoice.payment_succeeded"), invoice, number,
                                 "usd", f"pay_{self.count}")
        if kind == "void":
            note = self.issued[number % len(self.issued)] if self.issued else "cn_none"
            return VoidCreditNote(self.trigger("credit_note.void"), note)
        trigger = self.trigger("sla.breached" if kind == "capped" else "credit_note.issue")
        if kind == "amount":
            command = IssueCreditNote(trigger, invoice, "other", amount=number % 1_500 + 1)
        elif kind == "capped":
            command = IssueCreditNote(trigger, invoice, "service_credit",
                                      amount=number % 1_500 + 1, on_excess=OnExcess.CAP,
                                      max_credit_bps=2_500,
                                      policy="sla.breached:max_credit_bps=2500")
        elif kind == "quantity":
            command = IssueCreditNote(trigger, invoice, "order_change",
                                      lines=(InvoiceLineByQuantity("il_1", number % 3 + 1),))
        elif kind == "unused":
            command = IssueCreditNote(trigger, invoice, "subscription_cancellation",
                                      lines=(UnusedTime("il_2", OCT1 + timedelta(
                                          days=number % 30 + 1)),))
        else:
            command = IssueCreditNote(trigger, invoice, "other", amount=number % 1_500 + 1,
                                      settlement=Settlement.REFUND)
        self.issued.append(derived_id("cn", trigger))
        return command


def _units(pool: asyncpg.Pool) -> Callable[[], PostgresUnitOfWork]:
    return lambda: PostgresUnitOfWork(pool, Topics())


async def _apply(pool: asyncpg.Pool, commands: Sequence[Command]) -> list[Result]:
    return await apply_batch([Message(command, Delivery("tests")) for command in commands],
                             _units(pool))


def _run(example: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = asyncio.new_event_loop()  # its own loop: the session's is not running here
    try:
        loop.run_until_complete(example())
    finally:
        loop.close()


@hypothesis_settings(max_examples=40, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])
@given(batches=st.lists(st.lists(steps, min_size=1, max_size=8), min_size=1, max_size=5))
def test_the_totals_equal_the_sums_of_history_after_every_batch(
        roles: Roles, batches: list[list[Step]]) -> None:  # noqa: F811
    async def example() -> None:
        pool = await asyncpg.create_pool(roles.app, min_size=1, max_size=2)
        try:
            story = Story()
            results = await _apply(pool, [_finalize(invoice) for invoice in story.invoices])
            assert [(result.outcome, result.error) for result in results] == [(Outcome.APPLIED, None)] * 2
            for batch in batches:
                commands = [await story.command(step, pool) for step in batch]
                await _apply(pool, commands)
                assert await drift(pool) == []
        finally:
            await pool.close()

    _run(example)


async def test_the_generated_stories_reach_every_total(roles: Roles) -> None:  # noqa: F811
    """The story's commands are applied, not just refused: each kind moves its totals."""
    pool = await asyncpg.create_pool(roles.app, min_size=1, max_size=2)
    try:
        story = Story()
        a = story.invoices[0]
        await _apply(pool, [_finalize(invoice) for invoice in story.invoices])
        first = [("pay", 0, 15_100), ("quantity", 0, 1), ("unused", 0, 14), ("capped", 0, 500),
                 ("refund", 0, 700), ("amount", 1, 100), ("amount", 1, 200)]
        results = await _apply(pool, [await story.command(step, pool) for step in first])
        assert [result.outcome for result in results] == [Outcome.APPLIED] * len(first)
        second = [("failed", 0, 0), ("void", 0, 4)]  # the note of ("amount", 1, 100)
        results = await _apply(pool, [await story.command(step, pool) for step in second])
        assert [(result.outcome, result.error) for result in results] == [(Outcome.APPLIED, None)] * 2

        row = await pool.fetchrow("SELECT * FROM invoice_totals WHERE invoice_id = $1", a)
        assert row is not None
        assert (row["paid"], row["refunded"], row["refunds_failed"]) == (15_100, 701, 701)
        line = await pool.fetchrow("SELECT * FROM invoice_line_credit_totals"
                                   " WHERE invoice_id = $1 AND line_id = 'il_1'", a)
        assert line is not None
        assert (line["quantity"], line["quantity_lines"]) == (2, 1)
        times = await pool.fetchval("SELECT time_credits FROM invoice_line_credit_totals"
                                    " WHERE invoice_id = $1 AND line_id = 'il_2'", a)
        assert times == [OCT1 + timedelta(days=15)]
        b = await pool.fetchrow("SELECT * FROM invoice_totals WHERE invoice_id = $1",
                                story.invoices[1])
        assert b is not None
        assert b["pre_payment"] + b["post_payment"] == 201
        assert await pool.fetchval("SELECT total FROM invoice_trigger_credit_totals WHERE"
                                   " invoice_id = $1 AND trigger_type = 'sla.breached'", a) > 0
        assert await drift(pool) == []
    finally:
        await pool.close()


# ------------------------------------------------------------------------- nobody writes them


_WRITES = {
    "invoice_totals": ("INSERT INTO invoice_totals (invoice_id, pre_payment) VALUES ('x', 1)",
                       "UPDATE invoice_totals SET pre_payment = pre_payment + 1",
                       "DELETE FROM invoice_totals", "TRUNCATE invoice_totals"),
    "invoice_trigger_credit_totals": (
        "INSERT INTO invoice_trigger_credit_totals VALUES ('x', 'y', 1)",
        "UPDATE invoice_trigger_credit_totals SET total = 0",
        "DELETE FROM invoice_trigger_credit_totals", "TRUNCATE invoice_trigger_credit_totals"),
    "invoice_line_credit_totals": (
        "INSERT INTO invoice_line_credit_totals (invoice_id, line_id) VALUES ('x', 'y')",
        "UPDATE invoice_line_credit_totals SET net = 0",
        "DELETE FROM invoice_line_credit_totals", "TRUNCATE invoice_line_credit_totals"),
    "payment_refund_totals": (
        "INSERT INTO payment_refund_totals VALUES ('x', 1, 1)",
        "UPDATE payment_refund_totals SET open = 0",
        "DELETE FROM payment_refund_totals", "TRUNCATE payment_refund_totals"),
}


async def _error(url: str, statement: str) -> str | None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
        return None
    except asyncpg.PostgresError as error:
        return str(error)
    finally:
        await connection.close()


@pytest.mark.parametrize("role", ["app", "migrator", "superuser"])
async def test_nobody_writes_the_totals_directly(roles: Roles, role: str) -> None:  # noqa: F811
    pool = await asyncpg.create_pool(roles.app, min_size=1, max_size=2)
    try:  # rows in every table, so UPDATE and DELETE have something to hit
        story = Story()
        await _apply(pool, [_finalize(story.invoices[0])])
        await _apply(pool, [await story.command(step, pool) for step in
                            (("pay", 0, 15_100), ("refund", 0, 700), ("quantity", 0, 1))])
    finally:
        await pool.close()
    superuser = await asyncpg.connect(roles.superuser)
    try:
        before = {table: await superuser.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")
                  for table in TOTALS}
        assert all(before.values())
        expected = ("permission denied" if role == "app"
                    else "kept by triggers from history: they are never written directly")
        wrong = {}
        for statements in _WRITES.values():
            for statement in statements:
                error = await _error(roles.url(role), statement)
                if error is None or expected not in error:
                    wrong[statement] = error or "committed"
        assert wrong == {}
        assert {table: await superuser.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")
                for table in TOTALS} == before
        # and the application role reads them
        assert all([await _error(roles.app, f"SELECT * FROM {table}") is None
                    for table in TOTALS])
    finally:
        await superuser.close()


async def test_the_checks_still_refuse_what_the_totals_make_them_compare(
        roles: Roles) -> None:  # noqa: F811
    """The totals are what the checks read: a counter moved without its history is still refused,
    as the application role, the same messages as before."""
    pool = await asyncpg.create_pool(roles.app, min_size=1, max_size=2)
    try:
        story = Story()
        a = story.invoices[0]
        await _apply(pool, [_finalize(a)])
        await _apply(pool, [await story.command(step, pool) for step in
                            (("pay", 0, 15_100), ("refund", 0, 700), ("quantity", 0, 1))])
    finally:
        await pool.close()
    attacks = {
        f"UPDATE invoices SET post_payment_credited = post_payment_credited + 1 WHERE id = '{a}'":
            f"credited amounts of invoice {a} disagree with its credit notes",
        f"UPDATE invoice_lines SET credited_quantity = 0 WHERE invoice_id = '{a}'"
        " AND line_id = 'il_1'":
            f"what invoice line {a}/il_1 records as credited disagrees with its credit notes",
        f"UPDATE invoices SET refunds_failed = 1 WHERE id = '{a}'":
            f"refunded amounts of invoice {a} disagree with its refunds",
    }
    for statement, message in attacks.items():
        error = await _error(roles.app, statement)
        assert error is not None and message in error, statement


async def test_the_audit_names_totals_that_drifted_from_history(database_url: str) -> None:
    """What only a superuser can do (triggers off): totals moved or lost are reported."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        story = Story()
        a = story.invoices[0]
        await _apply(pool, [_finalize(a)])
        await _apply(pool, [await story.command(step, pool) for step in
                            (("pay", 0, 15_100), ("refund", 0, 700), ("quantity", 0, 1))])
        assert await drift(pool) == []
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute("SET LOCAL session_replication_role = replica")
            await connection.execute("UPDATE invoice_totals SET paid = paid + 1")
            await connection.execute("DELETE FROM invoice_line_credit_totals")

        found = dict(await drift(pool))
        assert found.keys() == {f"invoice_line_credit_totals {a}/il_1",
                                f"invoice_line_credit_totals {a}/il_2", f"invoice_totals {a}"}
        assert found[f"invoice_line_credit_totals {a}/il_1"].startswith("kept no row;")
        assert found[f"invoice_totals {a}"] == (
            "kept {0,3101,15101,701,0}; its history adds up to {0,3101,15100,701,0}")
        # and `creditnotes verify` says the same
        verified = [(v.subject, v.detail) for v in await check_invariants(database_url)
                    if v.invariant == "totals_disagree"]
        assert verified == sorted(found.items())
    finally:
        await pool.close()


@pytest.mark.parametrize("role", ["app", "superuser"])
async def test_checks_made_immediate_read_totals_that_count_the_row(
        ledger: Roles, role: str) -> None:  # noqa: F811
    """SET CONSTRAINTS ... IMMEDIATE runs a check at the end of the statement, with the keeping
    triggers of that statement: they fire first (by name), so the check sees the row."""
    over = await _attempt(ledger.url(role), (
        "SET CONSTRAINTS ALL IMMEDIATE", _forged_note("ACME-1001-CN-08", 50_000)))
    counted = await _attempt(ledger.url(role), (
        "SET CONSTRAINTS ALL IMMEDIATE", _forged_note("ACME-1001-CN-08", 500),
        f"UPDATE invoices SET pre_payment_credited = pre_payment_credited + 500,"
        f" credit_note_count = 8 WHERE id = '{A}'"))

    assert over is not None and f"credit notes of invoice {A} exceed its total" in over
    # the note alone disagrees with the invoice (refused at once), as with the sums before
    assert counted is not None and f"credited amount of invoice {A} disagrees" in counted


# ------------------------------------------------- lines of a note that is not issued (0018)

N8, N9 = "ACME-1001-CN-08", "ACME-1001-CN-09"
NOT_ISSUED = "cn_ACME-1001-CN-08 is void: a line is written only while its note is issued"


def _note_line(number: str, net: int, position: int = 0) -> str:
    return ("INSERT INTO credit_note_lines (credit_note_id, position, invoice_line_id, description,"
            " quantity, unit_amount, tax_rate_bps, net, tax)"
            f" VALUES ('cn_{number}', {position}, 'il_1', 'x', NULL, {net}, 0, {net}, 0)")


_VOID_N8 = ("UPDATE credit_notes SET status = 'void', voided_at = now(),"
            f" voided_by_source = '/attacker', voided_by_id = 'v8' WHERE id = 'cn_{N8}'")


async def _history_and_totals(url: str) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    superuser = await asyncpg.connect(url)
    try:
        return await drift(superuser), {
            table: await superuser.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")
            for table in (*TOTALS, "credit_notes", "credit_note_lines", "invoice_lines")}
    finally:
        await superuser.close()


async def test_a_void_and_a_line_of_its_note_in_one_statement_are_refused(
        ledger: Roles) -> None:  # noqa: F811
    """attack-b F1: note N8 issued, then ONE statement voids it and writes a line of it. The
    void's keeping trigger took the line off, the line's found the note void and put nothing
    on: -500 on il_1, which N9's line (+500) hid from every check, so il_1 could be credited
    past its amount. Now the line of a note that is not issued is refused, whole transaction."""
    before = await _history_and_totals(ledger.superuser)
    error = await _attempt(ledger.app, (
        _forged_note(N8, 500),
        _journal(N8, "issue", (0, "contra_revenue", 500, 0), (1, "accounts_receivable", 0, 500)),
        f"WITH v AS ({_VOID_N8} RETURNING id) " + _note_line(N8, 500),
        _journal(N8, "void", (0, "contra_revenue", 0, 500), (1, "accounts_receivable", 500, 0)),
        _forged_note(N9, 500),
        _note_line(N9, 500),
        _journal(N9, "issue", (0, "contra_revenue", 500, 0), (1, "accounts_receivable", 0, 500)),
        f"UPDATE invoices SET pre_payment_credited = pre_payment_credited + 500,"
        f" credit_note_count = 9 WHERE id = '{A}'",
    ))

    assert error is not None and NOT_ISSUED in error, error
    assert before[0] == []
    assert await _history_and_totals(ledger.superuser) == before


#: Statements writing N8's void and a line of it (500 on il_1) in every order and shape; around
#: them N8 is issued with its journal before, its void journal and the invoice's count after.
_SHAPES = {
    "void in a CTE, line by the main statement":
        (f"WITH v AS ({_VOID_N8} RETURNING id) " + _note_line(N8, 500),),
    "line in a CTE, void by the main statement":
        (f"WITH l AS ({_note_line(N8, 500)} RETURNING 1) " + _VOID_N8,),
    "both in CTEs":
        (f"WITH v AS ({_VOID_N8} RETURNING id), l AS ({_note_line(N8, 500)} RETURNING 1)"
         " SELECT 1",),
    "void in a CTE, two lines by the main statement":
        (f"WITH v AS ({_VOID_N8} RETURNING id) " + _note_line(N8, 200, 0)
         + ", ('cn_ACME-1001-CN-08', 1, 'il_1', 'y', NULL, 300, 0, 300, 0)",),
    "a line after the void, by a later statement":
        (_VOID_N8, _note_line(N8, 500)),
    "a line in a CTE that reads the void's row":
        (f"WITH v AS ({_VOID_N8} RETURNING id) INSERT INTO credit_note_lines (credit_note_id,"
         " position, invoice_line_id, description, quantity, unit_amount, tax_rate_bps, net, tax)"
         " SELECT id, 0, 'il_1', 'x', NULL, 500, 0, 500, 0 FROM v",),
}


@pytest.mark.parametrize("shape", sorted(_SHAPES))
async def test_no_statement_shape_writes_a_line_of_a_note_that_is_not_issued(
        ledger: Roles, shape: str) -> None:  # noqa: F811
    """Whatever the statements (one or two, CTE first or last, one line or several), a line of a
    note voided by the same or an earlier statement is refused, and nothing moves."""
    before = await _history_and_totals(ledger.superuser)
    error = await _attempt(ledger.app, (
        _forged_note(N8, 500),
        _journal(N8, "issue", (0, "contra_revenue", 500, 0), (1, "accounts_receivable", 0, 500)),
        *_SHAPES[shape],
        _journal(N8, "void", (0, "contra_revenue", 0, 500), (1, "accounts_receivable", 500, 0)),
        f"UPDATE invoices SET credit_note_count = 8 WHERE id = '{A}'",
    ))

    assert error is not None and NOT_ISSUED in error, error
    assert await _history_and_totals(ledger.superuser) == before


_VOID_ELSEWHERE = {  # refused before 0018 by 0011 and 0004, and still so
    "a line of a note voided by an earlier transaction":
        ("INSERT INTO credit_note_lines (credit_note_id, position, invoice_line_id, description,"
         " quantity, unit_amount, tax_rate_bps, net, tax) SELECT id, 9, 'il_1', 'x', NULL, 500,"
         f" 0, 500, 0 FROM credit_notes WHERE number = '{A2}'",
         "is posted: no credit_note_lines can be added to it"),
    "a note inserted void":
        (_forged_note(N8, 500).replace("'issued'", "'void'"),
         "a credit note is inserted issued; it is voided later"),
    "a line moved to a void note":
        (f"UPDATE credit_note_lines SET credit_note_id = (SELECT id FROM credit_notes"
         f" WHERE number = '{A2}') WHERE credit_note_id = (SELECT id FROM credit_notes"
         f" WHERE number = '{A1}')", "permission denied"),
}


@pytest.mark.parametrize("case", sorted(_VOID_ELSEWHERE))
async def test_a_void_note_gets_no_line_by_any_other_way(
        ledger: Roles, case: str) -> None:  # noqa: F811
    statement, refused = _VOID_ELSEWHERE[case]
    before = await _history_and_totals(ledger.superuser)

    error = await _attempt(ledger.app, (statement,))

    assert error is not None and refused in error, error
    assert await _history_and_totals(ledger.superuser) == before


# ---------------------------------------------------------- a database already at 0016


#: The unit of work of today reads 0018's per-trigger-type totals; on a database at 0016 a view
#: of that name stands in for the table, adding up the notes as the unit of work did then.
#: Dropped before migrating (0018 creates the table).
_TRIGGER_TOTALS_AT_0016 = (
    "CREATE VIEW invoice_trigger_credit_totals AS SELECT invoice_id, trigger_type,"
    " sum(total)::bigint AS total FROM credit_notes WHERE status = 'issued'"
    " GROUP BY invoice_id, trigger_type")


@pytest.fixture
async def at_0016(servers: Servers, tmp_path: Path) -> AsyncIterator[str]:
    for path in MIGRATIONS_DIR.glob("00*.sql"):
        if int(path.name[:4]) <= 16:
            (tmp_path / path.name).write_text(path.read_text())
    url = await create_database(servers.database_url)
    await migrate(url, tmp_path)
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(_TRIGGER_TOTALS_AT_0016)
    finally:
        await connection.close()
    yield url
    await drop_database(servers.database_url, url.rsplit("/", 1)[1])


async def test_0018_backfills_the_totals_of_a_database_with_history(at_0016: str) -> None:
    pool = await asyncpg.create_pool(at_0016, min_size=1, max_size=2)
    try:
        story = Story()
        await _apply(pool, [_finalize(invoice) for invoice in story.invoices])
        plan = [[("quantity", 0, 2), ("unused", 0, 19), ("unused", 0, 8), ("pay", 0, 15_100),
                 ("refund", 0, 500), ("refund", 0, 300), ("capped", 1, 400), ("amount", 1, 300),
                 ("unused", 1, 20), ("unused", 1, 5)],
                # a refund fails; b's earliest time credit is voided; b is paid in part
                [("failed", 0, 0), ("void", 1, 8), ("quantity", 1, 1), ("pay", 1, 3_000)]]
        for batch in plan:
            results = await _apply(pool, [await story.command(step, pool) for step in batch])
            assert [(result.outcome, result.reason) for result in results] == [
                (Outcome.APPLIED, "")] * len(batch)

        await pool.execute("DROP VIEW invoice_trigger_credit_totals")
        applied = await migrate(at_0016, MIGRATIONS_DIR)

        assert applied[:2] == ["0017_outbox_wake_in_process.sql", "0018_running_totals.sql"]
        assert await pool.fetchval("SELECT count(*) FROM invoice_line_credit_totals") == 4
        assert await pool.fetchval("SELECT count(*) FROM payment_refund_totals") == 1
        assert await drift(pool) == []
        # and from there on the triggers keep them
        later = [("void", 1, 6), ("unused", 1, 2), ("succeeded", 0, 0), ("amount", 0, 50)]
        results = await _apply(pool, [await story.command(step, pool) for step in later])
        assert [result.outcome for result in results] == [Outcome.APPLIED] * len(later)
        assert await drift(pool) == []
    finally:
        await pool.close()


# -------------------------------------------------------------- a figure: one hot invoice


async def test_a_batch_on_one_invoice_costs_about_the_same_at_0_and_2000_notes(
        database_url: str) -> None:
    """Prints the time of a batch of 200 notes on one invoice with 0 notes and with 2,000.
    (A figure for the record: the machine is shared, so no timed assertion.)"""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        invoice = "in_hot"
        await _apply(pool, [FinalizeInvoice(
            Trigger("/tests", "fin-hot", "invoice.finalized"), invoice, "HOT-1", "cus_42", "usd",
            "open", (DraftLine("il_1", "Widget", 1_000_000, 1_000),
                     DraftLine("il_2", "Plan", 1, 10**12)))])
        kinds = ("amount", "quantity", "capped")
        sent = 0

        def batch() -> list[Command]:
            nonlocal sent
            commands: list[Command] = []
            for _ in range(200):
                sent += 1
                trigger = Trigger("/tests", f"hot-{sent}", "credit_note.issue")
                kind = kinds[sent % 3]
                if kind == "quantity":
                    commands.append(IssueCreditNote(trigger, invoice, "order_change", lines=(
                        InvoiceLineByQuantity("il_1", 1),)))
                elif kind == "capped":
                    commands.append(IssueCreditNote(
                        Trigger("/tests", f"hot-{sent}", "sla.breached"), invoice,
                        "service_credit", amount=100, on_excess=OnExcess.CAP,
                        max_credit_bps=5_000, policy="sla.breached:max_credit_bps=5000"))
                else:
                    commands.append(IssueCreditNote(trigger, invoice, "other", amount=100))
            return commands

        figures = {}
        for round_ in range(11):
            notes = await pool.fetchval("SELECT count(*) FROM credit_notes")
            commands = batch()
            started = time.perf_counter()
            results = await _apply(pool, commands)
            seconds = time.perf_counter() - started
            assert [result.outcome for result in results] == [Outcome.APPLIED] * 200
            if round_ in (0, 10):
                figures[notes] = seconds
        assert sorted(figures) == [0, 2_000]
        assert await drift(pool) == []
        print(f"\nbatch of 200 notes on one invoice: {figures[0] * 1000:.0f} ms at 0 notes, "
              f"{figures[2_000] * 1000:.0f} ms at 2,000 notes")
    finally:
        await pool.close()

