"""The migrated database itself refuses what the code must never do.

Each test sets up minimal valid rows with plain SQL (an invoice of 100.00 net
plus 20.00 tax, its one line, and where needed a credit note), then tries one
forbidden change and checks that PostgreSQL refuses it. No service runs: this
is the last line of defence should the code ever have a bug.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from asyncpg.exceptions import (
    CheckViolationError,
    IntegrityConstraintViolationError,
    UniqueViolationError,
)

from service.adapters.migrations import migrate
from service.settings import MIGRATIONS_DIR

pytestmark = pytest.mark.integration

INVOICE = "in_1001"
NET, TAX = 10_000, 2_000
TOTAL = NET + TAX


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the freshly migrated test database, holding one open invoice."""
    connection = await asyncpg.connect(database_url)
    try:
        await add_invoice(connection)
        yield connection
    finally:
        await connection.close()


async def add_invoice(db: asyncpg.Connection, invoice_id: str = INVOICE) -> None:
    """An invoice with one line of 1 x 100.00 at 20% tax: total 120.00."""
    await db.execute(
        """
        INSERT INTO invoices (id, number, customer_id, currency, status, subtotal, discount, tax,
                              total, customer_balance_applied, amount_paid)
        VALUES ($1, $2, 'cus_42', 'usd', 'open', $3, 0, $4, $5, 0, 0)
        """,
        invoice_id, f"ACME-{invoice_id[-4:]}", NET, TAX, TOTAL)
    await db.execute(
        """
        INSERT INTO invoice_lines (invoice_id, line_id, position, description, quantity,
                                   unit_amount, tax_rate_bps, discount, tax)
        VALUES ($1, 'il_1', 0, 'Widget', 1, $2, 2000, 0, $3)
        """,
        invoice_id, NET, TAX)


async def add_credit_note(db: asyncpg.Connection, *, sequence: int = 1, total: int = 1_200,
                          invoice_id: str = INVOICE, number: str | None = None,
                          trigger_id: str | None = None, book_on_invoice: bool = True,
                          journal: list[tuple[int, str, int, int]] | None = None,
                          **columns: Any) -> str:
    """A pre-payment credit note of ``total`` (5/6 net, 1/6 tax) on line il_1, with its journal.

    With ``book_on_invoice`` the invoice's and the line's credited counters move with it, as the
    service does in the same transaction. ``journal`` overrides the issue journal's
    (position, account, debit, credit); ``columns`` override any credit_notes column.
    """
    note_id = f"cn_{invoice_id}_{sequence}"
    tax = total // 6
    row: dict[str, Any] = {
        "id": note_id, "invoice_id": invoice_id, "sequence": sequence,
        "number": number or f"ACME-{invoice_id[-4:]}-CN-{sequence:02d}", "customer_id": "cus_42",
        "currency": "usd", "status": "issued", "reason": "other", "subtotal": total - tax,
        "tax": tax, "total": total, "pre_payment_amount": total, "refund_amount": 0,
        "credit_amount": 0, "out_of_band_amount": 0, "trigger_source": "/tests",
        "trigger_id": trigger_id or f"cmd-{note_id}", "trigger_type": "credit_note.issue",
        "metadata": json.dumps({}),
        **columns,
    }
    names = ", ".join(row)
    placeholders = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    async with db.transaction():
        await db.execute(f"INSERT INTO credit_notes ({names}) VALUES ({placeholders})",
                         *row.values())
        await db.execute(
            """
            INSERT INTO credit_note_lines (credit_note_id, position, invoice_line_id, description,
                                           tax_rate_bps, net, tax)
            VALUES ($1, 0, 'il_1', 'Widget', 2000, $2, $3)
            """,
            note_id, total - tax, tax)
        await db.executemany(
            """
            INSERT INTO journal_lines (credit_note_id, entry, position, account, debit, credit)
            VALUES ($1, 'issue', $2, $3, $4, $5)
            """,
            [(note_id, *line) for line in journal or [
                (0, "contra_revenue", total - tax, 0),
                (1, "sales_tax_payable", tax, 0),
                (2, "accounts_receivable", 0, total)]])
        if book_on_invoice:
            await db.execute(
                "UPDATE invoices SET pre_payment_credited = pre_payment_credited + $2, "
                "credit_note_count = credit_note_count + 1 WHERE id = $1", invoice_id, total)
            await db.execute(
                "UPDATE invoice_lines SET credited_net = credited_net + $2, "
                "credited_tax = credited_tax + $3, credit_method = 'amount' "
                "WHERE invoice_id = $1 AND line_id = 'il_1'", invoice_id, total - tax, tax)
    return note_id


async def credited(db: asyncpg.Connection, invoice_id: str = INVOICE) -> tuple[int, int]:
    row = await db.fetchrow("SELECT pre_payment_credited, post_payment_credited FROM invoices "
                            "WHERE id = $1", invoice_id)
    assert row is not None
    return row["pre_payment_credited"], row["post_payment_credited"]


async def test_consistent_rows_are_accepted(db: asyncpg.Connection) -> None:
    await add_credit_note(db, sequence=1, total=1_200)
    await add_credit_note(db, sequence=2, total=TOTAL - 1_200)

    assert await credited(db) == (TOTAL, 0)
    numbers = [row["number"] for row in
               await db.fetch("SELECT number FROM credit_notes ORDER BY sequence")]
    assert numbers == ["ACME-1001-CN-01", "ACME-1001-CN-02"]
    line = await db.fetchrow("SELECT credited_net, credited_tax FROM invoice_lines")
    assert line is not None and tuple(line) == (NET, TAX)


async def test_crediting_more_than_the_invoice_total_is_refused(db: asyncpg.Connection) -> None:
    with pytest.raises(CheckViolationError) as refused:
        await db.execute("UPDATE invoices SET post_payment_credited = total + 1 WHERE id = $1",
                         INVOICE)

    assert refused.value.constraint_name == "credits_within_total"
    assert await credited(db) == (0, 0)


async def pay(db: asyncpg.Connection, amount: int, *, status: str = "open",
              invoice_id: str = INVOICE) -> None:
    """A payment of ``amount``, all applied, recorded as the service does: the payment and
    the invoice's amount_paid together."""
    async with db.transaction():
        sequence = await db.fetchval(
            "SELECT coalesce(max(sequence), 0) + 1 FROM payments WHERE invoice_id = $1",
            invoice_id)
        await db.execute(
            "INSERT INTO payments (invoice_id, sequence, payment_id, amount, applied,"
            " trigger_source, trigger_id) VALUES ($1, $2, $3, $4, $4, '/tests', $3)",
            invoice_id, sequence, f"pay_{sequence}", amount)
        await db.execute("UPDATE invoices SET amount_paid = amount_paid + $2, status = $3"
                         " WHERE id = $1", invoice_id, amount, status)


async def test_amount_remaining_cannot_go_negative(db: asyncpg.Connection) -> None:
    await pay(db, 5_000)

    with pytest.raises(CheckViolationError) as refused:  # 120.00 - 50.00 paid - 80.00 credited
        await db.execute("UPDATE invoices SET pre_payment_credited = 8000 WHERE id = $1", INVOICE)

    assert refused.value.constraint_name == "amount_remaining_not_negative"
    assert await credited(db) == (0, 0)


@pytest.mark.parametrize(("column", "value", "constraint"), [
    ("credited_net", NET + 1, "line_net_within_line"),
    ("credited_tax", TAX + 1, "line_tax_within_line"),
    ("credited_quantity", 2, "line_quantity_within_line"),
    ("credited_net", -1, "line_net_within_line"),
])
async def test_a_line_cannot_be_credited_beyond_itself(
        db: asyncpg.Connection, column: str, value: int, constraint: str) -> None:
    with pytest.raises(CheckViolationError) as refused:
        await db.execute(f"UPDATE invoice_lines SET {column} = $2 WHERE invoice_id = $1",
                         INVOICE, value)

    assert refused.value.constraint_name == constraint
    row = await db.fetchrow("SELECT credited_net, credited_tax, credited_quantity "
                            "FROM invoice_lines WHERE invoice_id = $1", INVOICE)
    assert row is not None and tuple(row) == (0, 0, 0)


@pytest.mark.parametrize("duplicate", [
    pytest.param({"sequence": 1, "number": "ACME-1001-CN-99"}, id="same-invoice-and-sequence"),
    pytest.param({"sequence": 2, "number": "ACME-1001-CN-01"}, id="same-number"),
    pytest.param({"sequence": 2, "trigger_id": "cmd-first"}, id="same-trigger"),
])
async def test_a_credit_note_number_or_trigger_is_never_used_twice(
        db: asyncpg.Connection, duplicate: dict[str, Any]) -> None:
    await add_credit_note(db, sequence=1, total=1_000, trigger_id="cmd-first")

    with pytest.raises(UniqueViolationError):
        await add_credit_note(db, total=1_000, **duplicate)

    assert await db.fetchval("SELECT count(*) FROM credit_notes") == 1
    assert await credited(db) == (1_000, 0)


async def test_the_same_number_on_another_invoice_is_allowed(db: asyncpg.Connection) -> None:
    # numbers are unique per invoice (docs/rules.md): invoice numbers need not be unique
    await add_invoice(db, "in_2002")
    await add_credit_note(db, sequence=1, total=1_000)

    await add_credit_note(db, invoice_id="in_2002", sequence=1, number="ACME-1001-CN-01")

    assert await credited(db, "in_2002") == (1_200, 0)


async def test_settlement_parts_must_add_up_to_the_post_payment_part(
        db: asyncpg.Connection) -> None:
    await pay(db, TOTAL, status="paid")

    with pytest.raises(CheckViolationError) as refused:
        await add_credit_note(db, total=1_200, pre_payment_amount=0, refund_amount=0,
                              credit_amount=600, out_of_band_amount=0, book_on_invoice=False)

    assert refused.value.constraint_name == "settlement_adds_up"
    assert await db.fetchval("SELECT count(*) FROM credit_notes") == 0


async def test_an_unbalanced_journal_is_refused_at_commit(db: asyncpg.Connection) -> None:
    with pytest.raises(CheckViolationError, match="does not balance"):
        await add_credit_note(db, total=1_200, journal=[
            (0, "contra_revenue", 1_000, 0),
            (1, "sales_tax_payable", 200, 0),
            (2, "accounts_receivable", 0, 1_100)])  # 1,200 debit vs 1,100 credit

    assert await db.fetchval("SELECT count(*) FROM journal_lines") == 0


@pytest.mark.parametrize("change", [
    pytest.param("UPDATE credit_notes SET subtotal = subtotal + 1, total = total + 1", id="total"),
    pytest.param("UPDATE credit_notes SET reason = 'fraudulent'", id="reason"),
    pytest.param("UPDATE credit_notes SET number = 'ACME-1001-CN-07'", id="number"),
])
async def test_an_issued_credit_note_cannot_change(db: asyncpg.Connection, change: str) -> None:
    await add_credit_note(db, total=1_200)

    with pytest.raises(IntegrityConstraintViolationError, match="cannot change"):
        await db.execute(change)

    row = await db.fetchrow("SELECT number, reason, total FROM credit_notes")
    assert row is not None and tuple(row) == ("ACME-1001-CN-01", "other", 1_200)


async def test_memo_and_metadata_of_an_issued_credit_note_may_change(
        db: asyncpg.Connection) -> None:
    await add_credit_note(db, total=1_200)

    async with db.transaction():  # with the row that records the edit (migration 0016)
        await db.execute(_UPDATE_ROW, "upd-1", "fixed typo", '{"a": "b"}')
        await db.execute("""UPDATE credit_notes SET memo = 'fixed typo', metadata = '{"a": "b"}'""")

    row = await db.fetchrow("SELECT memo, metadata, updated_at FROM credit_notes")
    assert row is not None and (row["memo"], json.loads(row["metadata"])) == (
        "fixed typo", {"a": "b"})
    assert row["updated_at"] is not None  # set by the database


_UPDATE_ROW = ("INSERT INTO credit_note_updates (credit_note_id, trigger_source, trigger_id, memo,"
               " metadata) SELECT id, '/tests', $1, $2, $3::jsonb FROM credit_notes")


async def test_memo_and_metadata_change_only_with_the_update_row_that_records_them(
        db: asyncpg.Connection) -> None:
    await add_credit_note(db, total=1_200)
    edit = """UPDATE credit_notes SET memo = 'fixed typo', metadata = '{"a": "b"}'"""

    with pytest.raises(IntegrityConstraintViolationError, match="change only with"):
        await db.execute(edit)  # no update row
    error = await _attempt(db, (  # with an update row of other values
        _UPDATE_ROW.replace("$1, $2, $3", "'upd-1', 'other', '{\"a\": \"b\"}'"), edit))
    assert error is not None and "change only with" in error, error
    await db.execute(_UPDATE_ROW, "upd-2", "fixed typo", '{"a": "b"}')
    with pytest.raises(IntegrityConstraintViolationError, match="change only with"):
        await db.execute(edit)  # an update row of an earlier transaction
    await db.execute("UPDATE credit_notes SET updated_at = now()")  # kept as it was

    row = await db.fetchrow("SELECT memo, updated_at FROM credit_notes")
    assert row is not None and (row["memo"], row["updated_at"]) == (None, None)


async def test_a_credit_note_is_never_deleted(db: asyncpg.Connection) -> None:
    await add_credit_note(db, total=1_200)

    with pytest.raises(IntegrityConstraintViolationError, match="never deleted"):
        await db.execute("DELETE FROM credit_notes")
    with pytest.raises(IntegrityConstraintViolationError, match="append-only"):
        await db.execute("DELETE FROM credit_note_lines")

    assert await db.fetchval("SELECT count(*) FROM credit_notes") == 1


async def test_a_void_credit_note_stays_void(db: asyncpg.Connection) -> None:
    await add_credit_note(db, total=1_200)
    async with db.transaction():
        await db.execute("UPDATE credit_notes SET status = 'void', voided_at = now(), "
                         "voided_by_source = '/tests', voided_by_id = 'void-1'")
        await db.execute("UPDATE invoices SET pre_payment_credited = 0")
        await db.execute("UPDATE invoice_lines SET credited_net = 0, credited_tax = 0, "
                         "credit_method = NULL")  # what the note credited, taken back
        await db.execute(  # the reversal of the issue journal
            "INSERT INTO journal_lines (credit_note_id, entry, position, account, debit, credit) "
            "SELECT credit_note_id, 'void', position, account, credit, debit FROM journal_lines")

    with pytest.raises(IntegrityConstraintViolationError, match="stays void"):
        await db.execute("UPDATE credit_notes SET status = 'issued', voided_at = NULL")

    assert await db.fetchval("SELECT status FROM credit_notes") == "void"


async def test_a_processed_message_is_recorded_once(db: asyncpg.Connection) -> None:
    insert = ("INSERT INTO processed_messages (source, id, type, topic, outcome) "
              "VALUES ('/tests', 'ev-1', 'credit_note.issue', 'credit-note-commands', 'applied')")
    await db.execute(insert)

    with pytest.raises(UniqueViolationError):
        await db.execute(insert)

    assert await db.fetchval("SELECT count(*) FROM processed_messages") == 1


async def test_credit_notes_beyond_the_invoice_total_are_refused_at_commit(
        db: asyncpg.Connection) -> None:
    # Each note on its own is well formed and the invoice counters are left alone,
    # so only the deferred check of the notes against the invoice can catch it.
    transaction = db.transaction()
    await transaction.start()
    await add_credit_note(db, sequence=1, total=7_200, book_on_invoice=False)
    await add_credit_note(db, sequence=2, total=6_000, book_on_invoice=False)

    with pytest.raises(CheckViolationError, match="exceed its total"):
        await transaction.commit()

    assert await db.fetchval("SELECT count(*) FROM credit_notes") == 0


async def test_credit_notes_that_disagree_with_the_invoice_counters_are_refused_at_commit(
        db: asyncpg.Connection) -> None:
    with pytest.raises(CheckViolationError, match="disagrees with its credit notes"):
        await add_credit_note(db, total=1_200, book_on_invoice=False)

    assert await db.fetchval("SELECT count(*) FROM credit_notes") == 0


async def test_migrating_an_up_to_date_database_applies_nothing(database_url: str) -> None:
    applied = await migrate(database_url, MIGRATIONS_DIR)

    assert applied == []
    connection = await asyncpg.connect(database_url)
    try:
        versions = [row["name"] for row in
                    await connection.fetch("SELECT name FROM schema_migrations ORDER BY version")]
    finally:
        await connection.close()
    assert versions == sorted(path.name for path in MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


@pytest.mark.parametrize("change", [
    pytest.param("UPDATE journal_lines SET debit = debit + 1 WHERE account = 'contra_revenue'",
                 id="a-line-amount-changed"),
    pytest.param("DELETE FROM journal_lines WHERE account = 'sales_tax_payable'",
                 id="a-line-deleted"),
])
async def test_a_posted_journal_cannot_be_unbalanced_afterwards(
        db: asyncpg.Connection, change: str) -> None:
    # The balance is checked when lines are inserted; a posted journal is as immutable
    # as its credit note, so a later UPDATE or DELETE must not slip past that check.
    await add_credit_note(db, total=1_200)

    with pytest.raises(asyncpg.PostgresError):
        await db.execute(change)

    totals = await db.fetchrow("SELECT sum(debit) AS debit, sum(credit) AS credit FROM journal_lines")
    assert totals is not None and totals["debit"] == totals["credit"] == 1_200


async def test_the_invoice_counters_cannot_drift_from_its_credit_notes(
        db: asyncpg.Connection) -> None:
    # The invoice says nothing was credited while an issued note of 12.00 exists: the
    # customer could then be credited twice. The agreement is checked when credit notes
    # change; an UPDATE of the invoice alone must not escape it.
    await add_credit_note(db, total=1_200)

    with pytest.raises(CheckViolationError):
        await db.execute("UPDATE invoices SET pre_payment_credited = 0 WHERE id = $1", INVOICE)

    assert await credited(db) == (1_200, 0)


# ------------------------------------------------------------------ the money loop (0016)
#
# As the application role, in plain SQL: a paid invoice (PAID: 120.00 = 70.00 at finalization,
# payment 0, + pay_1 50.00, payment 1) and a post-payment credit note of 12.00 refunded as
# REFUND_1 (10.00 on pay_1) and REFUND_0 (2.00 on payment 0), both pending. Each attempt below
# breaks one invariant in one transaction, and PostgreSQL must refuse it.

PAID = "in_2002"
NOTE = "cn_in_2002_1"
REFUND_1, REFUND_0 = "rf_pay1", "rf_pay0"


@pytest.fixture
async def app_db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as a login user of creditnotes_app, holding PAID with its refunded note."""
    admin = await asyncpg.connect(database_url)
    user = f"cn_app_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE ROLE "{user}" LOGIN IN ROLE creditnotes_app')
    parts = urlsplit(database_url)
    connection = await asyncpg.connect(urlunsplit(
        parts._replace(netloc=f"{user}@{parts.netloc.rsplit('@', 1)[-1]}")))
    try:
        async with connection.transaction():
            await connection.execute(
                "INSERT INTO invoices (id, number, customer_id, currency, status, subtotal,"
                " discount, tax, total, customer_balance_applied, amount_paid)"
                " VALUES ($1, 'ACME-2002', 'cus_42', 'usd', 'paid', $2, 0, $3, $4, 0, $4)",
                PAID, NET, TAX, TOTAL)
            await connection.execute(
                "INSERT INTO invoice_lines (invoice_id, line_id, position, description, quantity,"
                " unit_amount, tax_rate_bps, discount, tax)"
                " VALUES ($1, 'il_1', 0, 'Widget', 1, $2, 2000, 0, $3)", PAID, NET, TAX)
            await connection.execute(
                "INSERT INTO payments (invoice_id, sequence, payment_id, amount, applied,"
                " trigger_source, trigger_id) VALUES ($1, 0, NULL, 7000, 7000, NULL, NULL),"
                " ($1, 1, 'pay_1', 5000, 5000, '/payments', 'ev-pay-1')", PAID)
        await add_refunded_note(connection, NOTE, 1, {REFUND_1: (1, 1_000), REFUND_0: (0, 200)})
        yield connection
    finally:
        await connection.close()
        await admin.execute(f'DROP OWNED BY "{user}"')
        await admin.execute(f'DROP ROLE "{user}"')
        await admin.close()


async def add_refunded_note(db: asyncpg.Connection, note_id: str, sequence: int,
                            refunds: dict[str, tuple[int, int]], *, refund_amount: int | None = None,
                            invoice_id: str = PAID, linked: bool = False) -> None:
    """A post-payment credit note of PAID refunded by ``refunds`` ({id: (payment, amount)}),
    booked on the invoice and its line as the service does; ``refund_amount`` defaults to
    their sum. ``linked``: the refunds were made already (succeeded, with their journal)."""
    total = sum(amount for _, amount in refunds.values())
    refund_amount = total if refund_amount is None else refund_amount
    tax = total // 6
    async with db.transaction():
        await db.execute(
            "INSERT INTO credit_notes (id, invoice_id, sequence, number, customer_id, currency,"
            " status, reason, subtotal, tax, total, pre_payment_amount, refund_amount,"
            " credit_amount, out_of_band_amount, trigger_source, trigger_id, trigger_type)"
            " VALUES ($1, $2, $3, $4, 'cus_42', 'usd', 'issued', 'other', $5, $6, $7, 0, $8,"
            " $7::bigint - $8::bigint, 0, '/tests', $1, 'credit_note.issue')",
            note_id, invoice_id, sequence, f"ACME-2002-CN-{sequence:02d}", total - tax, tax,
            total, refund_amount)
        await db.execute(
            "INSERT INTO credit_note_lines (credit_note_id, position, invoice_line_id,"
            " description, tax_rate_bps, net, tax) VALUES ($1, 0, 'il_1', 'Widget', 2000, $2, $3)",
            note_id, total - tax, tax)
        await db.executemany(
            "INSERT INTO journal_lines (credit_note_id, entry, position, account, debit, credit)"
            " VALUES ($1, 'issue', $2, $3, $4, $5)",
            [(note_id, 0, "contra_revenue", total - tax, 0),
             (note_id, 1, "sales_tax_payable", tax, 0),
             (note_id, 2, "refunds_payable", 0, refund_amount)]
            + ([(note_id, 3, "customer_credit_balance", 0, total - refund_amount)]
               if total > refund_amount else []))
        await db.executemany(
            "INSERT INTO refunds (refund_id, invoice_id, payment_sequence, credit_note_id,"
            " amount, status, linked) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [(refund_id, invoice_id, payment, note_id, amount,
              "succeeded" if linked else "pending", linked)
             for refund_id, (payment, amount) in refunds.items()])
        if linked:
            await db.executemany(
                "INSERT INTO refund_journal_lines (refund_id, position, account, debit, credit,"
                " effective_at) VALUES ($1, 0, 'refunds_payable', $2, 0, now()),"
                " ($1, 1, 'cash', 0, $2, now())",
                [(refund_id, amount) for refund_id, (_, amount) in refunds.items()])
        await db.execute(
            "UPDATE invoices SET post_payment_credited = post_payment_credited + $2,"
            " refunded = refunded + $3, credit_note_count = $4 WHERE id = $1",
            invoice_id, total, sum(amount for _, amount in refunds.values()), sequence)
        await db.execute(
            "UPDATE invoice_lines SET credited_net = credited_net + $2,"
            " credited_tax = credited_tax + $3, credit_method = 'amount'"
            " WHERE invoice_id = $1 AND line_id = 'il_1'", invoice_id, total - tax, tax)


def _settle(refund_id: str, status: str, *lines: tuple[str, int, int],
            resettled_to: str | None = None, outcome_id: str = "ev-out-1") -> tuple[str, ...]:
    """A refund's outcome with the given journal lines (account, debit, credit)."""
    outcome = ("UPDATE refunds SET status = '{status}', outcome_source = '/payments',"
               " outcome_id = '{outcome_id}', outcome_type = 'refund.{status}',"
               " outcome_at = now(), resettled_to = {resettled}"
               " WHERE refund_id = '{refund_id}'").format(
        status=status, outcome_id=outcome_id, refund_id=refund_id,
        resettled=f"'{resettled_to}'" if resettled_to else "NULL")
    journal = tuple(
        "INSERT INTO refund_journal_lines (refund_id, position, account, debit, credit,"
        f" effective_at) VALUES ('{refund_id}', {position}, '{account}', {debit}, {credit}, now())"
        for position, (account, debit, credit) in enumerate(lines))
    return (outcome, *journal)


SUCCEEDED_1 = _settle(REFUND_1, "succeeded", ("refunds_payable", 1_000, 0),
                      ("cash", 0, 1_000))
FAILED_1 = (*_settle(REFUND_1, "failed", ("refunds_payable", 1_000, 0),
                     ("customer_credit_balance", 0, 1_000), resettled_to="customer_balance"),
            f"UPDATE invoices SET refunds_failed = refunds_failed + 1000 WHERE id = '{PAID}'")


async def _attempt(db: asyncpg.Connection, statements: tuple[str, ...]) -> str | None:
    """Run ``statements`` in one transaction; the error PostgreSQL refused them with, or None."""
    try:
        async with db.transaction():
            for statement in statements:
                await db.execute(statement)
    except asyncpg.PostgresError as error:
        return str(error)
    return None


async def _money(db: asyncpg.Connection) -> list[str]:
    return [row[0] for table in ("invoices", "payments", "refunds", "refund_journal_lines",
                                 "credit_notes")
            for row in await db.fetch(f"SELECT to_jsonb(t)::text FROM {table} AS t ORDER BY 1")]


_NEW_NOTE = ("INSERT INTO credit_notes (id, invoice_id, sequence, number, customer_id, currency,"
             " status, reason, subtotal, tax, total, pre_payment_amount, refund_amount,"
             " credit_amount, out_of_band_amount, trigger_source, trigger_id, trigger_type)"
             f" VALUES ('cn_x', '{PAID}', 2, 'ACME-2002-CN-02', 'cus_42', 'usd', 'issued',"
             " 'other', {net}, {tax}, {total}, 0, {refund}, {credit}, 0, '/tests', 'cmd-x',"
             " 'credit_note.issue')")


def _new_note_with_refunds(refunds: str, refund: int = 600, total: int = 600) -> tuple[str, ...]:
    """Statements of a second note of ``total`` refunding ``refund`` with the given refunds
    rows (a VALUES list of (refund_id, invoice_id, payment_sequence, amount)), booked."""
    tax = total // 6
    return (
        _NEW_NOTE.format(net=total - tax, tax=tax, total=total, refund=refund,
                         credit=total - refund),
        "INSERT INTO refunds (refund_id, invoice_id, payment_sequence, credit_note_id, amount,"
        f" status) SELECT r, i, p, 'cn_x', a, 'pending' FROM (VALUES {refunds}) AS v(r, i, p, a)",
        f"UPDATE invoices SET post_payment_credited = post_payment_credited + {total},"
        f" refunded = refunded + {refund}, credit_note_count = 2 WHERE id = '{PAID}'",
    )


_OPEN_INVOICE = ("INSERT INTO invoices (id, number, customer_id, currency, status, subtotal,"
                 " discount, tax, total, customer_balance_applied, amount_paid) VALUES"
                 " ('in_3003', 'ACME-3003', 'cus_42', 'usd', 'open', 1000, 0, 0, 1000, 0, {paid})")

MONEY_ATTACKS = [
    # per payment, refunds pending or succeeded never exceed its applied part
    pytest.param(_new_note_with_refunds(f"('rf_x', '{PAID}', 1, 4001)", 4_001, 4_001),
                 "refunds of payment in_2002/1 exceed", id="refunds-beyond-a-payment"),
    pytest.param((*SUCCEEDED_1, *_new_note_with_refunds(f"('rf_x', '{PAID}', 1, 4001)",
                                                        4_001, 4_001)),
                 "refunds of payment in_2002/1 exceed", id="succeeded-refund-still-holds-cash"),
    # a refund id appears once, ever
    pytest.param(_new_note_with_refunds(f"('{REFUND_1}', '{PAID}', 1, 600)"),
                 "duplicate key value violates unique constraint \"refunds_pkey\"",
                 id="refund-id-reused"),
    # per credit note, its refunds add up to its refund_amount, on its invoice
    pytest.param(_new_note_with_refunds(f"('rf_x', '{PAID}', 1, 500)"),
                 "refunds of credit note cn_x disagree with its refund_amount",
                 id="refunds-short-of-the-refund-amount"),
    pytest.param(_new_note_with_refunds("", 600)[::2],
                 "refunds of credit note cn_x disagree with its refund_amount",
                 id="refund-amount-without-refunds"),
    pytest.param((f"INSERT INTO refunds (refund_id, invoice_id, payment_sequence, credit_note_id,"
                  f" amount, status) VALUES ('rf_x', '{PAID}', 1, '{NOTE}', 1, 'pending')",
                  f"UPDATE invoices SET refunded = refunded + 1 WHERE id = '{PAID}'"),
                 "is posted: no refund can be added", id="refund-added-to-a-posted-note"),
    # a refund moves only pending -> succeeded | failed, once
    pytest.param((*SUCCEEDED_1, f"UPDATE refunds SET status = 'failed', resettled_to = 'none'"
                                f" WHERE refund_id = '{REFUND_1}'"),
                 "an outcome is final", id="succeeded-then-failed-in-one-transaction"),
    pytest.param((f"UPDATE refunds SET status = 'pending' WHERE refund_id = '{REFUND_1}'",
                  ), None, id="pending-to-pending-is-no-change"),
    pytest.param((f"UPDATE refunds SET amount = 900 WHERE refund_id = '{REFUND_1}'",),
                 "permission denied|never change", id="refund-amount-changed"),
    pytest.param((f"UPDATE refunds SET failure_reason = 'x' WHERE refund_id = '{REFUND_1}'",),
                 "written once, with its status", id="outcome-column-without-an-outcome"),
    pytest.param((f"DELETE FROM refunds WHERE refund_id = '{REFUND_1}'",),
                 "permission denied", id="refund-deleted"),
    # each outcome carries exactly its balanced journal
    pytest.param(SUCCEEDED_1[:1], "without exactly its journal", id="succeeded-without-journal"),
    pytest.param(_settle(REFUND_1, "succeeded", ("refunds_payable", 1_000, 0),
                         ("cash", 0, 900)),
                 "does not balance|without exactly its journal", id="unbalanced-outcome-journal"),
    pytest.param(_settle(REFUND_1, "succeeded", ("refunds_payable", 1_000, 0),
                         ("customer_credit_balance", 0, 1_000)),
                 "without exactly its journal", id="succeeded-credited-to-the-balance"),
    pytest.param(_settle(REFUND_1, "failed", resettled_to="none"),
                 "refunded amounts of invoice in_2002 disagree", id="failed-not-counted"),
    pytest.param((*_settle(REFUND_1, "failed", ("refunds_payable", 1_000, 0),
                           ("cash", 0, 1_000), resettled_to="customer_balance"),
                  f"UPDATE invoices SET refunds_failed = 1000 WHERE id = '{PAID}'"),
                 "without exactly its journal", id="failed-paid-out-in-cash"),
    pytest.param(SUCCEEDED_1[1:], "written only by the outcome of refund",
                 id="journal-without-an-outcome"),
    # amount_paid is the sum of the payments applied; a payment id once per invoice
    pytest.param((_OPEN_INVOICE.format(paid=0),
                  "UPDATE invoices SET amount_paid = 100 WHERE id = 'in_3003'"),
                 "amount_paid of invoice in_3003 disagrees with its payments",
                 id="amount-paid-without-a-payment"),
    pytest.param((_OPEN_INVOICE.format(paid=100),),
                 "amount_paid of invoice in_3003 disagrees with its payments",
                 id="invoice-inserted-paid-without-its-payment"),
    pytest.param(("INSERT INTO payments (invoice_id, sequence, payment_id, amount, applied,"
                  f" trigger_source, trigger_id) VALUES ('{PAID}', 2, 'pay_2', 100, 0, '/p', 'e2')",
                  "INSERT INTO payments (invoice_id, sequence, payment_id, amount, applied,"
                  f" trigger_source, trigger_id) VALUES ('{PAID}', 3, 'pay_3', 100, 100, '/p',"
                  " 'e3')"),
                 "amount_paid of invoice in_2002 disagrees with its payments",
                 id="payment-applied-without-amount-paid"),
    pytest.param(("INSERT INTO payments (invoice_id, sequence, payment_id, amount, applied,"
                  f" trigger_source, trigger_id) VALUES ('{PAID}', 2, 'pay_1', 100, 0, '/p',"
                  " 'e2')",),
                 "payments_payment_id", id="payment-id-twice-on-an-invoice"),
    pytest.param(("INSERT INTO payments (invoice_id, sequence, payment_id, amount, applied,"
                  f" trigger_source, trigger_id) VALUES ('{PAID}', 2, 'pay_2', 100, 0,"
                  " '/payments', 'ev-pay-1')",),
                 "payments_trigger", id="one-upstream-event-two-payments"),
    pytest.param((f"UPDATE payments SET applied = 4000 WHERE invoice_id = '{PAID}'"
                  " AND sequence = 1",), "permission denied|append-only",
                 id="payment-applied-rewritten"),
    # the invoice's refund counters follow its refunds
    pytest.param((f"UPDATE invoices SET refunded = refunded + 1 WHERE id = '{PAID}'",),
                 "refunded amounts of invoice in_2002 disagree", id="refunded-bumped"),
    pytest.param((f"UPDATE invoices SET refunds_failed = 1 WHERE id = '{PAID}'",),
                 "refunded amounts of invoice in_2002 disagree", id="refunds-failed-bumped"),
    pytest.param((*FAILED_1, f"UPDATE invoices SET refunds_failed = 0 WHERE id = '{PAID}'"),
                 "never decrease", id="refunds-failed-set-back"),
    # a credit note with refunds is never voided
    pytest.param((f"UPDATE credit_notes SET status = 'void', voided_at = now(),"
                  f" voided_by_source = '/t', voided_by_id = 'v' WHERE id = '{NOTE}'",),
                 "has refunds: it cannot be voided", id="refunded-note-voided"),
    # its accounting date never changes
    pytest.param((f"UPDATE credit_notes SET effective_at = effective_at - interval '1 day'"
                  f" WHERE id = '{NOTE}'",), "permission denied|cannot change",
                 id="effective-at-rewritten"),
    # memo and metadata change only with their credit_note_updates row; updated_at is the
    # database's
    pytest.param((f"UPDATE credit_notes SET memo = 'x' WHERE id = '{NOTE}'",),
                 "change only with a credit_note_updates row", id="memo-edited-unrecorded"),
    pytest.param((f"UPDATE credit_notes SET updated_at = now() - interval '1 day'"
                  f" WHERE id = '{NOTE}'",), "permission denied", id="updated-at-rewritten"),
    # journals are dated by their note and outcome
    pytest.param((*_new_note_with_refunds("", 0)[::2],
                  "INSERT INTO journal_lines (credit_note_id, entry, position, account, debit,"
                  " credit, effective_at) VALUES ('cn_x', 'issue', 0, 'contra_revenue', 500, 0,"
                  " '2020-01-01T00:00:00Z')"),
                 "dated by its effective_at", id="issue-journal-dated-otherwise"),
    pytest.param((SUCCEEDED_1[0],
                  *(line.replace("now())", "'2020-01-01T00:00:00Z')")
                    for line in SUCCEEDED_1[1:])),
                 "dated by its outcome", id="outcome-journal-dated-otherwise"),
    # the payment at finalization is written with its invoice only
    pytest.param(("INSERT INTO payments (invoice_id, sequence, payment_id, amount, applied)"
                  f" VALUES ('{PAID}', 0, NULL, 100, 100)",),
                 "written with the invoice", id="finalization-payment-added-later"),
]


@pytest.mark.parametrize(("statements", "refused"), MONEY_ATTACKS)
async def test_the_money_loop_invariants_hold_in_the_database(
        app_db: asyncpg.Connection, statements: tuple[str, ...], refused: str | None) -> None:
    before = await _money(app_db)

    error = await _attempt(app_db, statements)

    if refused is None:
        assert error is None
    else:
        assert error is not None and re.search(refused, error), error
    assert await _money(app_db) == before


async def test_a_payment_at_finalization_is_written_only_with_its_invoice(
        app_db: asyncpg.Connection) -> None:
    payment_0 = ("INSERT INTO payments (invoice_id, sequence, payment_id, amount, applied)"
                 " VALUES ('in_3003', 0, NULL, 100, 100)")
    assert await _attempt(app_db, (_OPEN_INVOICE.format(paid=0),)) is None

    error = await _attempt(app_db, (
        payment_0, "UPDATE invoices SET amount_paid = 100 WHERE id = 'in_3003'"))

    assert error is not None and "written with the invoice" in error, error
    assert await _attempt(app_db, (_OPEN_INVOICE.format(paid=100).replace("in_3003", "in_3004")
                                   .replace("ACME-3003", "ACME-3004"),
                                   payment_0.replace("in_3003", "in_3004"))) is None


async def test_outcomes_with_their_journals_commit_and_a_failure_gives_cash_back(
        app_db: asyncpg.Connection) -> None:
    assert await _attempt(app_db, SUCCEEDED_1[:1] + SUCCEEDED_1[1:]) is None
    assert await _attempt(app_db, (*_settle(REFUND_0, "failed", resettled_to="none",
                                            outcome_id="ev-out-2"),
                                   f"UPDATE invoices SET refunds_failed = 200 WHERE id = '{PAID}'"
                                   )) is None
    # payment 0's 200 is refundable again: a new note may take all of its 70.00
    await add_refunded_note(app_db, "cn_2", 2, {"rf_2": (0, 7_000)})

    rows = await app_db.fetch("SELECT refund_id, status, resettled_to FROM refunds"
                              " ORDER BY refund_id")
    assert [tuple(row) for row in rows] == [
        ("rf_2", "pending", None), (REFUND_0, "failed", "none"), (REFUND_1, "succeeded", None)]
    figures = await app_db.fetchrow("SELECT refunded, refunds_failed FROM invoices WHERE id = $1",
                                    PAID)
    assert figures is not None and tuple(figures) == (8_200, 200)
    with pytest.raises(asyncpg.PostgresError, match="outcome is final"):
        await app_db.execute(f"UPDATE refunds SET status = 'succeeded' WHERE refund_id = '{REFUND_0}'")


async def test_a_linked_refund_is_recorded_succeeded_with_its_journal(
        app_db: asyncpg.Connection) -> None:
    await add_refunded_note(app_db, "cn_2", 2, {"re_1": (1, 2_000)}, linked=True)

    with pytest.raises(asyncpg.PostgresError, match="duplicate key"):
        await add_refunded_note(app_db, "cn_3", 3, {"re_1": (0, 100)}, linked=True)
    lines = await app_db.fetch("SELECT account, debit, credit FROM refund_journal_lines"
                               " WHERE refund_id = 're_1' ORDER BY position")
    assert [tuple(line) for line in lines] == [("refunds_payable", 2_000, 0), ("cash", 0, 2_000)]
