"""The migrated database itself refuses what the code must never do.

Each test sets up minimal valid rows with plain SQL (an invoice of 100.00 net
plus 20.00 tax, its one line, and where needed a credit note), then tries one
forbidden change and checks that PostgreSQL refuses it. No service runs: this
is the last line of defence should the code ever have a bug.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

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


async def test_amount_remaining_cannot_go_negative(db: asyncpg.Connection) -> None:
    await db.execute("UPDATE invoices SET amount_paid = 5000 WHERE id = $1", INVOICE)

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
    # numbers are unique per invoice (RULES.md): invoice numbers need not be unique
    await add_invoice(db, "in_2002")
    await add_credit_note(db, sequence=1, total=1_000)

    await add_credit_note(db, invoice_id="in_2002", sequence=1, number="ACME-1001-CN-01")

    assert await credited(db, "in_2002") == (1_200, 0)


async def test_settlement_parts_must_add_up_to_the_post_payment_part(
        db: asyncpg.Connection) -> None:
    await db.execute("UPDATE invoices SET amount_paid = $2, status = 'paid' WHERE id = $1",
                     INVOICE, TOTAL)

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

    await db.execute("""UPDATE credit_notes SET memo = 'fixed typo', metadata = '{"a": "b"}'""")

    row = await db.fetchrow("SELECT memo, metadata FROM credit_notes")
    assert row is not None and (row["memo"], json.loads(row["metadata"])) == (
        "fixed typo", {"a": "b"})


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
