"""Migration 0008 and ``creditnotes verify`` guard the money rules even against a buggy writer.

Plain SQL on the migrated database (as in test_database_constraints.py): a
policy's cap is checked at commit over all the non-void credit notes of its
trigger type on the invoice; time-based coverage stays inside the service
period; and verify names a line whose coverage disagrees with its credit
notes, and an invoice whose status disagrees with its amounts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from asyncpg.exceptions import CheckViolationError

from service.adapters.invariants import check_invariants
from tests.integration.test_database_constraints import (
    INVOICE,
    TOTAL,
    add_credit_note,
    add_invoice,
    credited,
)

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
    await db.execute("UPDATE invoice_lines SET time_credits = $1 WHERE invoice_id = 'in_1002'",
                     [datetime(2026, 11, 1, tzinfo=UTC)])  # at the end: covers nothing, allowed


async def test_verify_names_coverage_and_status_that_disagree(
        db: asyncpg.Connection, database_url: str) -> None:
    await add_october_invoice(db, "in_1002")
    # a line that says it was credited from 16 Oct, with no time-based credit note on it
    await db.execute("UPDATE invoice_lines SET time_credits = $1 WHERE invoice_id = 'in_1002'",
                     [datetime(2026, 10, 16, tzinfo=UTC)])
    # an open invoice with nothing left to pay
    await db.execute("UPDATE invoices SET amount_paid = total WHERE id = $1", INVOICE)

    found = {(v.invariant, v.subject) for v in await check_invariants(database_url)
             if v.invariant in ("line_coverage_disagrees", "status_disagrees_with_amounts")}

    assert found == {("line_coverage_disagrees", "invoice line in_1002/il_1"),
                     ("status_disagrees_with_amounts", f"invoice {INVOICE}")}
