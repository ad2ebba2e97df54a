"""Lighter commits (issue 13): a batch writes many credit notes of one invoice in one
transaction, its deferred checks read the running totals (migration 0018), and no rule
gives way for it.

An attacker with the application role's (or the migrator's, or a superuser's)
direct SQL writes credit notes on one invoice several times in one transaction:
with the deferred checks forced to run early (SET CONSTRAINTS ... IMMEDIATE)
between the writes, or ending in a script whose last statement is COMMIT. A
transaction commits exactly when its final rows keep the invoice's total and its
policy cap.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.adapters.unit_of_work import PooledConnection, PostgresUnitOfWork
from service.domain.commands import IssueCreditNote, Trigger
from service.handlers import Delivery, Message, Outcome, apply_batch
from service.settings import Topics
from tests.integration.test_database_attacks import (  # noqa: F401  (fixtures)
    A,
    Roles,
    ledger,
    roles,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def book(ledger: Roles) -> Roles:  # noqa: F811
    """test_database_attacks.py's ledger: invoice A (10,000) with 1,000 credited, and roles."""
    return ledger

TOTAL = 10_000  # invoice A's total
CAP_BPS = 5_000  # the capped trigger's policy: half of the total
CAPPED = "sla.breached"


@dataclass(frozen=True)
class Note:
    amount: int
    capped: bool
    #: moved with the note: the invoice's counters (else only the deferred checks refuse it)
    counters: bool = True


@dataclass(frozen=True)
class Immediate:
    """SET CONSTRAINTS ALL IMMEDIATE: the pending checks run now, and after each statement."""


@dataclass(frozen=True)
class Deferred:
    """SET CONSTRAINTS ALL DEFERRED: back to checking at COMMIT."""


Step = Note | Immediate | Deferred


async def _credited(connection: asyncpg.Connection, invoice: str = A) -> tuple[int, int, int]:
    """What an invoice's issued notes add up to, those of the capped trigger, and its next
    sequence."""
    row = await connection.fetchrow(
        "SELECT coalesce(sum(total) FILTER (WHERE status = 'issued'), 0)::bigint AS all_,"
        " coalesce(sum(total) FILTER (WHERE status = 'issued' AND trigger_type = $2), 0)"
        "::bigint AS capped, coalesce(max(sequence), 0) + 1 AS next"
        " FROM credit_notes WHERE invoice_id = $1", invoice, CAPPED)
    assert row is not None
    return row["all_"], row["capped"], row["next"]


def _note_sql(invoice: str, sequence: int, note: Note) -> str:
    """One statement: a credit note on an invoice with its counters moved to match (so a
    check run after it sees consistent counters), a pre-payment credit with no lines."""
    number = f"{invoice}-CN-{sequence:03d}"
    trigger_type, policy = ((CAPPED, f"'{CAPPED}:max_credit_bps={CAP_BPS}'") if note.capped
                            else ("credit_note.issue", "NULL"))
    insert = (
        "INSERT INTO public.credit_notes (id, invoice_id, sequence, number,"
        " customer_id, currency, status, reason, subtotal, tax, total, pre_payment_amount,"
        " refund_amount, credit_amount, out_of_band_amount, trigger_source, trigger_id,"
        " trigger_type, policy)"
        f" VALUES ('cn_{uuid.uuid4().hex}', '{invoice}', {sequence}, '{number}', 'cus_42', 'usd',"
        f" 'issued', 'other', {note.amount}, 0, {note.amount}, {note.amount}, 0, 0, 0,"
        f" '/attacker', '{uuid.uuid4().hex}', '{trigger_type}', {policy})")
    if not note.counters:
        return insert
    return (
        f"WITH note AS ({insert} RETURNING total)"
        " UPDATE public.invoices SET pre_payment_credited = pre_payment_credited + note.total,"
        f" credit_note_count = greatest(credit_note_count, {sequence})"
        f" FROM note WHERE id = '{invoice}'")


async def _run(url: str, steps: list[Step], *, script: bool = False,
               invoice: str = A) -> str | None:
    """The steps in one transaction ended by a bare COMMIT (or, with ``script``, sent as one
    script ending in COMMIT); the error it was refused with, or None when it committed."""
    connection = await asyncpg.connect(url)
    try:
        _, _, sequence = await _credited(connection, invoice)
        statements = []
        for step in steps:
            if isinstance(step, Note):
                statements.append(_note_sql(invoice, sequence, step))
                sequence += 1
            elif isinstance(step, Immediate):
                statements.append("SET CONSTRAINTS ALL IMMEDIATE")
            else:
                statements.append("SET CONSTRAINTS ALL DEFERRED")
        try:
            if script:
                await connection.execute("BEGIN; " + "; ".join(statements) + "; COMMIT")
            else:
                transaction = connection.transaction()
                await transaction.start()
                try:
                    for statement in statements:
                        await connection.execute(statement)
                except BaseException:
                    await transaction.rollback()
                    raise
                await transaction.commit()  # asyncpg sends a bare "COMMIT;"
        except asyncpg.PostgresError as error:
            return str(error)
        return None
    finally:
        await connection.close()


def _allowed(steps: list[Step]) -> bool:
    notes = [step for step in steps if isinstance(step, Note)]
    return (all(n.counters for n in notes) and sum(n.amount for n in notes) <= TOTAL
            and sum(n.amount for n in notes if n.capped) <= TOTAL * CAP_BPS // 10_000)


#: What PostgreSQL says refusing a note past a cap: the deferred checks, or the invoice's
#: own CHECK when its counters (moved with each note) pass its total
#: (or, for a note written without them, that the counters disagree with the notes)
REFUSALS = ("exceed its total", "exceed their policy cap", "amount_remaining_not_negative",
            "disagrees with its credit notes", "disagree with its credit notes")


steps_strategy = st.lists(
    st.one_of(st.builds(Note, st.sampled_from([100, 1_500, 4_000, 9_000]), st.booleans(),
                        st.booleans()),
              st.just(Immediate()), st.just(Deferred())),
    min_size=1, max_size=8).filter(lambda steps: any(isinstance(s, Note) for s in steps))


@hypothesis_settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps_strategy, script=st.booleans())
async def test_a_transaction_commits_exactly_when_its_final_notes_keep_the_caps(
        book: Roles, steps: list[Step], script: bool) -> None:
    invoice = f"in_{uuid.uuid4().hex[:10]}"  # a fresh open invoice of 10,000, nothing credited
    admin = await asyncpg.connect(book.superuser)
    try:
        await admin.execute(
            "INSERT INTO invoices (id, number, customer_id, currency, status, subtotal,"
            " discount, tax, total, customer_balance_applied, amount_paid)"
            " VALUES ($1, $1, 'cus_42', 'usd', 'open', $2, 0, 0, $2, 0, 0)", invoice, TOTAL)
    finally:
        await admin.close()

    error = await _run(book.app, steps, script=script, invoice=invoice)

    if _allowed(steps):
        assert error is None
    else:
        assert error is not None
        assert any(refusal in error for refusal in REFUSALS), error


@pytest.mark.parametrize("role", ["app", "migrator", "superuser"])
async def test_a_cap_broken_by_the_second_note_of_an_invoice_is_refused(
        book: Roles, role: str) -> None:
    """The same invoice twice in one transaction, a note over the total after a note within
    it: with the checks forced to run after the first note (they passed for A), and not."""
    admin = await asyncpg.connect(book.superuser)
    try:
        credited, _, _ = await _credited(admin)
    finally:
        await admin.close()
    within, beyond = Note(100, capped=False), Note(TOTAL - credited, False, counters=False)

    early = await _run(book.url(role), [within, Immediate(), Deferred(), beyond])
    late = await _run(book.url(role), [within, beyond])
    capped = await _run(book.url(role), [Note(2_000, capped=True), Immediate(), Deferred(),
                                           Note(3_500, capped=True)])

    assert early is not None and "credit notes of invoice in_1001 exceed its total" in early
    assert late is not None and "credit notes of invoice in_1001 exceed its total" in late
    assert capped is not None and "exceed their policy cap" in capped


async def test_a_batch_crediting_one_invoice_many_times_commits_and_a_cap_still_binds(
        book: Roles) -> None:
    """Through the unit of work: 30 notes on one invoice in one batch, the last ones past its
    cap (refused one by one by the domain), and the database agrees with every counter."""
    pool = await asyncpg.create_pool(book.app, min_size=1, max_size=2,
                                     connection_class=PooledConnection)
    try:
        admin = await asyncpg.connect(book.superuser)
        try:
            credited, _, _ = await _credited(admin)
        finally:
            await admin.close()
        batch = [Message(IssueCreditNote(Trigger("/tests", f"many-{n}", "credit_note.issue"), A,
                                         "other", amount=500),
                         Delivery("credit-note-commands", 0, n)) for n in range(30)]
        woken = asyncio.Event()

        results = await apply_batch(batch, lambda: PostgresUnitOfWork(
            pool, Topics(), on_commit=woken.set))

        fits = (TOTAL - credited) // 500
        assert [r.outcome for r in results][:fits] == [Outcome.APPLIED] * fits
        assert all(r.outcome is not Outcome.APPLIED for r in results[fits:])
        assert woken.is_set(), "the relay is woken once the batch committed its events"
        row = await pool.fetchrow(
            "SELECT i.pre_payment_credited + i.post_payment_credited AS counters,"
            " (SELECT sum(total) FROM credit_notes WHERE invoice_id = i.id"
            "  AND status = 'issued')::bigint AS notes FROM invoices AS i WHERE id = $1", A)
        assert row is not None and row["counters"] == row["notes"] == credited + 500 * fits
    finally:
        await pool.close()


async def test_a_connection_back_in_the_pool_after_a_unit_of_work_has_no_session_state(
        book: Roles) -> None:
    """The reset query is skipped after a unit of work: nothing of it may outlive it."""
    statements: list[str] = []

    async def init(connection: asyncpg.Connection) -> None:
        connection.add_query_logger(lambda record: statements.append(record.query))
    pool = await asyncpg.create_pool(book.app, min_size=1, max_size=1, init=init,
                                     connection_class=PooledConnection)
    try:
        batch = [Message(IssueCreditNote(Trigger("/tests", f"state-{n}", "credit_note.issue"),
                                         A, "other", amount=10),
                         Delivery("credit-note-commands", 0, n)) for n in range(3)]
        await apply_batch(batch, lambda: PostgresUnitOfWork(pool, Topics()))
        await asyncio.sleep(0.05)
        assert not any("RESET ALL" in statement for statement in statements)
        async with pool.acquire() as connection:
            state = await connection.fetchrow(
                "SELECT current_setting('synchronous_commit') AS sync,"
                " (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()"
                "   AND locktype = 'advisory') AS advisory,"
                " (SELECT count(*) FROM pg_cursors WHERE name <> '') AS cursors,"
                " (SELECT count(*) FROM pg_listening_channels()) AS listening")
        assert state is not None
        assert state["sync"] == "on"
        assert (state["advisory"], state["cursors"], state["listening"]) == (0, 0, 0)
    finally:
        await pool.close()
