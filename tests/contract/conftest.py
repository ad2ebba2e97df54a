"""One contract, two units of work: each test here runs on the fake and on PostgreSQL.

The pattern of pyeventsourcing's recorder test cases: the tests are written
once against :class:`Backend` (make a unit of work, read back what was
committed), and the ``backend`` fixture is parametrized over the in-memory
fake (``tests/fakes.py``, no servers) and the PostgreSQL unit of work (a fresh
database per test; marked ``integration``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import asyncpg
import pytest

from service.adapters.unit_of_work import PostgresUnitOfWork
from service.ports import Key, UnitOfWork
from service.settings import Topics
from tests.fakes import FakeStore

#: (type, key, traceparent) of each outbox row, in order
OutboxEntry = tuple[str, str | None, str | None]


class Backend(Protocol):
    def unit_of_work(self) -> UnitOfWork: ...
    async def outcome(self, key: Key) -> str | None: ...
    async def outbox(self) -> list[OutboxEntry]: ...
    async def figures(self, invoice_id: str) -> tuple[str, int, int, int] | None:
        """(status, amount paid, pre-payment credited, credit note count) as stored."""
        ...
    async def credit_note_status(self, note_id: str) -> str | None: ...
    async def refunds(self, invoice_id: str) -> list[tuple[str, int, str]]:
        """(refund id, payment sequence, status) of the invoice's refunds, by id, as stored."""
        ...
    async def forget(self, key: Key) -> None:
        """Prune a ledger row, as retention does after a day."""
        ...


class FakeBackend:
    def __init__(self) -> None:
        self.store = FakeStore()

    def unit_of_work(self) -> UnitOfWork:
        return self.store.unit_of_work()

    async def outcome(self, key: Key) -> str | None:
        return self.store.outcome(key)

    async def outbox(self) -> list[OutboxEntry]:
        return [(type_, key, traceparent)
                for _, _, key, type_, _, traceparent in self.store.outbox]

    async def figures(self, invoice_id: str) -> tuple[str, int, int, int] | None:
        invoice = self.store.invoices.get(invoice_id)
        if invoice is None:
            return None
        return (invoice.status.value, invoice.amount_paid, invoice.pre_payment_credited,
                invoice.credit_note_count)

    async def credit_note_status(self, note_id: str) -> str | None:
        note = self.store.credit_notes.get(note_id)
        return note.status.value if note else None

    async def refunds(self, invoice_id: str) -> list[tuple[str, int, str]]:
        invoice = self.store.invoices.get(invoice_id)
        return sorted((refund.refund_id, refund.payment_sequence, refund.state.value)
                      for refund in (invoice.refunds if invoice else ()))

    async def forget(self, key: Key) -> None:
        del self.store.ledger[key]


class PostgresBackend:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def unit_of_work(self) -> UnitOfWork:
        return PostgresUnitOfWork(self.pool, Topics())

    async def outcome(self, key: Key) -> str | None:
        value: str | None = await self.pool.fetchval(
            "SELECT outcome FROM processed_messages WHERE source = $1 AND id = $2", *key)
        return value

    async def outbox(self) -> list[OutboxEntry]:
        rows = await self.pool.fetch("SELECT type, key, traceparent FROM outbox ORDER BY seq")
        return [(row["type"], row["key"], row["traceparent"]) for row in rows]

    async def figures(self, invoice_id: str) -> tuple[str, int, int, int] | None:
        row = await self.pool.fetchrow(
            "SELECT status, amount_paid, pre_payment_credited, credit_note_count"
            " FROM invoices WHERE id = $1", invoice_id)
        return None if row is None else (row[0], row[1], row[2], row[3])

    async def credit_note_status(self, note_id: str) -> str | None:
        value: str | None = await self.pool.fetchval(
            "SELECT status FROM credit_notes WHERE id = $1", note_id)
        return value

    async def refunds(self, invoice_id: str) -> list[tuple[str, int, str]]:
        rows = await self.pool.fetch(
            "SELECT refund_id, payment_sequence, status FROM refunds WHERE invoice_id = $1"
            " ORDER BY refund_id", invoice_id)
        return [(row[0], row[1], row[2]) for row in rows]

    async def forget(self, key: Key) -> None:
        # the superuser may delete any ledger row (retention's guard, 0009)
        await self.pool.execute(
            "DELETE FROM processed_messages WHERE source = $1 AND id = $2", *key)


@pytest.fixture(params=["fake", pytest.param("postgres", marks=pytest.mark.integration)])
def backend_database(request: pytest.FixtureRequest) -> str | None:
    """None for the fake; for PostgreSQL a fresh, migrated database (servers started)."""
    if request.param == "fake":
        return None
    url: str = request.getfixturevalue("database_url")
    return url


@pytest.fixture
async def backend(backend_database: str | None) -> AsyncIterator[Backend]:
    if backend_database is None:
        yield FakeBackend()
        return
    database_url = backend_database
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        yield PostgresBackend(pool)
    finally:
        await pool.close()
