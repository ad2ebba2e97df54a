"""``check_invariants`` on a real PostgreSQL: clean after real traffic, and every corruption named.

The first test drives the running service over the broker and expects no
violation. The others write a small, realistic ledger through the service's
own handlers and unit of work (no broker, so they are fast), check that it is
clean, then corrupt exactly one thing with SQL, bypassing the migration's
constraints and triggers where they would refuse it, and expect exactly the
one violation that corruption is, on the right subject.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from service.adapters.invariants import INVARIANTS, check_invariants
from service.adapters.unit_of_work import PostgresUnitOfWork
from service.domain.commands import (
    Command,
    Discount,
    DraftLine,
    FinalizeInvoice,
    InvoiceLineByAmount,
    InvoiceLineByQuantity,
    IssueCreditNote,
    Settlement,
    SettlementSplit,
    Trigger,
    VoidCreditNote,
)
from service.domain.credit_note import derived_id
from service.handlers import Delivery, Message, Outcome, apply_batch
from service.settings import Settings, Topics
from tests.support import Kafka, RunningService, cloudevent, fetch, invoice_data

pytestmark = pytest.mark.integration

SOURCE = "/tests"


def _trigger(id_: str, type_: str = "credit_note.issue") -> Trigger:
    return Trigger(SOURCE, id_, type_)


# ------------------------------------------------------------- a clean run through the service


async def test_a_real_run_through_the_service_satisfies_every_invariant(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    topics = settings.topics
    await kafka.publish(topics.invoices, cloudevent("invoice.finalized", invoice_data(
        "in_1001", lines=[
            {"id": "il_1", "description": "Widget", "quantity": 3, "unit_amount": 3_333,
             "tax_rate_bps": 2_000},
            {"id": "il_2", "description": "Support", "quantity": 2, "unit_amount": 5_000}],
        discounts=[{"percent_off_bps": 1_000}])))
    await kafka.publish(topics.invoices, cloudevent("invoice.finalized", invoice_data(
        "in_2002", lines=[{"id": "il_1", "description": "Gadget", "quantity": 1,
                           "unit_amount": 500}], status="paid", amount_paid=500)))
    await kafka.publish(topics.invoices, cloudevent("invoice.finalized", invoice_data(
        "in_3003", lines=[{"id": "il_1", "description": "Plan", "quantity": 1,
                           "unit_amount": 20_000}],
        status="paid", customer_balance_applied=15_000, amount_paid=5_000)))

    commands = [
        {"invoice_id": "in_1001", "reason": "product_unsatisfactory",
         "lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 1}]},
        {"invoice_id": "in_1001", "amount": 2_000, "reason": "order_change"},
        {"invoice_id": "in_1001", "amount": 10_000_000},  # more than is left: rejected
        {"invoice_id": "in_2002", "amount": 500, "refund_amount": 200, "credit_amount": 100,
         "out_of_band_amount": 200},
    ]
    events = [cloudevent("credit_note.issue", data) for data in commands]
    to_void = events[1]
    for event in events:
        await kafka.publish(topics.credit_note_commands, event)
    await kafka.publish(topics.returns, cloudevent("return.received", {
        "invoice_id": "in_1001", "return_id": "ret-1",
        "lines": [{"invoice_line_id": "il_2", "quantity": 1}]}, source="/warehouse/returns"))
    await kafka.publish(topics.returns, cloudevent("return.received", {
        "invoice_id": "in_3003", "return_id": "ret-2", "settlement": "refund",
        "lines": [{"invoice_line_id": "il_1", "quantity": 1}]}, source="/warehouse/returns"))

    issued = await kafka.expect(topics.credit_note_events, "credit_note.issued", count=5)
    await kafka.expect(topics.credit_note_events, "credit_note.rejected")
    [voidable] = [r.event["data"] for r in issued if r.event["data"]["trigger"]["id"] == to_void["id"]]
    await kafka.publish(topics.credit_note_commands,
                        cloudevent("credit_note.void", {"credit_note_id": voidable["id"]}),
                        key="in_1001")
    await kafka.expect(topics.credit_note_events, "credit_note.voided")
    refunds = await kafka.expect(topics.refund_requests, "refund.requested", count=2)
    assert sorted(r.event["data"]["amount"] for r in refunds) == [200, 5_000]
    await _wait_until_outbox_published(settings)

    assert await check_invariants(settings.database_url) == []
    statuses = await fetch(settings, "SELECT status, count(*) FROM credit_notes GROUP BY status")
    assert {row["status"]: row["count"] for row in statuses} == {"issued": 4, "void": 1}


async def _wait_until_outbox_published(settings: Settings, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await fetch(settings, "SELECT 1 FROM outbox WHERE published_at IS NULL"):
        assert time.monotonic() < deadline, "the relay did not publish the outbox in time"
        await asyncio.sleep(0.1)


# --------------------------------------------------- a ledger written by the service's handlers

A, B, C = "in_1001", "in_2002", "in_3003"
A1, A2, A3, B1, C1 = ("ACME-1001-CN-01", "ACME-1001-CN-02", "ACME-1001-CN-03", "ACME-2002-CN-01",
                      "ACME-3003-CN-01")
REJECTED = _trigger("cmd-a4")


def _ledger_commands() -> list[Command]:
    """Three invoices; on A a quantity credit, a line-less credit (voided), an amount credit and
    a rejection; on paid B a refund split; on C (mostly paid by balance) a refund of the cash."""
    def invoice(invoice_id: str, status: str, lines: tuple[DraftLine, ...],
                **extra: Any) -> FinalizeInvoice:
        return FinalizeInvoice(_trigger(f"fin-{invoice_id}", "invoice.finalized"), invoice_id,
                               f"ACME-{invoice_id[-4:]}", "cus_42", "usd", status, lines, **extra)

    return [
        invoice(A, "open", (DraftLine("il_1", "Widget", 3, 3_333, 2_000),
                            DraftLine("il_2", "Support", 2, 5_000)),
                discounts=(Discount(percent_off_bps=1_000),)),
        invoice(B, "paid", (DraftLine("il_1", "Gadget", 1, 500),), amount_paid=500),
        invoice(C, "paid", (DraftLine("il_1", "Plan", 1, 20_000),),
                customer_balance_applied=15_000, amount_paid=5_000),
        IssueCreditNote(_trigger("cmd-a1"), A, "product_unsatisfactory",
                        lines=(InvoiceLineByQuantity("il_1", 1),)),
        IssueCreditNote(_trigger("cmd-a2"), A, "order_change", amount=2_000),
        IssueCreditNote(_trigger("cmd-a3"), A, "other", lines=(InvoiceLineByAmount("il_2", 1_000),)),
        IssueCreditNote(REJECTED, A, "other", amount=10_000_000),
        VoidCreditNote(_trigger("cmd-a5", "credit_note.void"),
                       derived_id("cn", _trigger("cmd-a2"))),
        IssueCreditNote(_trigger("cmd-b1"), B, "product_unsatisfactory", amount=500,
                        settlement=SettlementSplit(refund_amount=200, credit_amount=100,
                                                   out_of_band_amount=200)),
        IssueCreditNote(_trigger("cmd-c1"), C, "order_change", amount=8_000,
                        settlement=Settlement.REFUND),
    ]


@dataclass(frozen=True)
class Ledger:
    database_url: str

    async def corrupt(self, sql: str, *, replica: bool = False) -> None:
        """Run ``sql`` as the superuser; ``replica`` disables triggers and foreign keys first.

        A corruption the triggers refuse as it happens (migrations 0001, 0004, 0011) needs
        ``replica``: verify is for what got past them (a superuser, a restored backup).
        """
        connection = await asyncpg.connect(self.database_url)
        try:
            if replica:
                await connection.execute("SET session_replication_role = replica")
            await connection.execute(sql)
        finally:
            await connection.close()

    async def violations(self) -> list[tuple[str, str]]:
        return [(v.invariant, v.subject) for v in await check_invariants(self.database_url)]


@pytest.fixture
async def ledger(database_url: str) -> Ledger:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        outcomes = []
        for command in _ledger_commands():
            [result] = await apply_batch([Message(command, Delivery("tests"))],
                                         lambda: PostgresUnitOfWork(pool, Topics()))
            outcomes.append(result.outcome)
        assert outcomes == [Outcome.APPLIED] * 6 + [Outcome.REJECTED] + [Outcome.APPLIED] * 3
        await pool.execute("UPDATE outbox SET published_at = now()")  # as the relay would
    finally:
        await pool.close()
    return Ledger(database_url)


async def test_a_ledger_written_by_the_handlers_is_clean(ledger: Ledger) -> None:
    connection = await asyncpg.connect(ledger.database_url)
    try:
        notes = await connection.fetch(
            "SELECT number, status, pre_payment_amount, refund_amount, credit_amount "
            "FROM credit_notes ORDER BY number")
        types = await connection.fetch("SELECT type, count(*) FROM outbox GROUP BY type")
    finally:
        await connection.close()
    assert [(n["number"], n["status"]) for n in notes] == [
        (A1, "issued"), (A2, "void"), (A3, "issued"), (B1, "issued"), (C1, "issued")]
    assert [(n["refund_amount"], n["credit_amount"]) for n in notes][3:] == [(200, 100),
                                                                              (5_000, 3_000)]
    assert {t["type"]: t["count"] for t in types} == {
        "credit_note.issued": 5, "credit_note.voided": 1, "credit_note.rejected": 1,
        "refund.requested": 2}
    assert await check_invariants(ledger.database_url) == []


def _note(number: str) -> str:
    return f"(SELECT id FROM credit_notes WHERE number = '{number}')"


def _event(type_: str, number: str) -> str:
    """A WHERE condition selecting the outbox rows of ``type_`` for credit note ``number``."""
    field = "credit_note_id" if type_ == "refund.requested" else "id"
    return f"type = '{type_}' AND payload -> 'data' ->> '{field}' = {_note(number)}"


def _copy_outbox_row(where: str, event_id: str = "event_id || '-copy'",
                     type_: str = "type", payload: str = "payload") -> str:
    return (f"INSERT INTO outbox (event_id, topic, key, type, payload, published_at) "
            f"SELECT {event_id}, topic, key, {type_}, {payload}, published_at FROM outbox "
            f"WHERE {where}")


def _drop_checks_on(table: str, column: str) -> str:
    """Drop the unnamed CHECK constraints on ``table.column`` (their names are PostgreSQL's)."""
    return f"""
        DO $$
        DECLARE name text;
        BEGIN
            FOR name IN SELECT c.conname FROM pg_constraint AS c
                        JOIN pg_attribute AS a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
                        WHERE c.conrelid = '{table}'::regclass AND c.contype = 'c'
                          AND a.attname = '{column}'
            LOOP
                EXECUTE format('ALTER TABLE {table} DROP CONSTRAINT %I', name);
            END LOOP;
        END $$;
    """


@dataclass(frozen=True)
class Corruption:
    name: str
    sql: str
    invariant: str
    subject: str
    replica: bool = False


CORRUPTIONS = [
    # 1. a restated invoice: total and payment lowered under a full credit
    Corruption("invoice-total-lowered-under-its-credits",
               "ALTER TABLE invoices DROP CONSTRAINT credits_within_total; "
               f"UPDATE invoices SET subtotal = 400, total = 400, amount_paid = 400 WHERE id = '{B}'",
               "credits_exceed_total", f"invoice {B}", replica=True),
    # 2.
    Corruption("pre-payment-credited-bumped",
               f"UPDATE invoices SET pre_payment_credited = pre_payment_credited + 1 WHERE id = '{A}'",
               "credited_amount_disagrees", f"invoice {A}", replica=True),
    Corruption("credited-moved-from-pre-to-post-payment",
               "UPDATE invoices SET pre_payment_credited = pre_payment_credited - 1, "
               f"post_payment_credited = post_payment_credited + 1 WHERE id = '{A}'",
               "credited_amount_disagrees", f"invoice {A}", replica=True),
    # 3.
    Corruption("balance-applied-beyond-what-was-left",
               "ALTER TABLE invoices DROP CONSTRAINT amount_remaining_not_negative; "
               f"UPDATE invoices SET customer_balance_applied = total WHERE id = '{A}'",
               "amount_remaining_negative", f"invoice {A}", replica=True),
    # 4.
    Corruption("refunded-bumped",
               f"UPDATE invoices SET refunded = refunded + 1 WHERE id = '{B}'",
               "refunds_exceed_cash", f"invoice {B}"),
    Corruption("cash-paid-below-refunded",
               _drop_checks_on("invoices", "refunded")
               + f"UPDATE invoices SET amount_paid = 100, status = 'uncollectible' WHERE id = '{B}'",
               "refunds_exceed_cash", f"invoice {B}", replica=True),
    # 5.
    Corruption("line-tax-below-its-credited-tax",
               "ALTER TABLE invoice_lines DROP CONSTRAINT line_tax_within_line; "
               f"UPDATE invoice_lines SET tax = credited_tax - 1 "
               f"WHERE invoice_id = '{A}' AND line_id = 'il_1'",
               "line_over_credited", f"invoice line {A}/il_1", replica=True),
    Corruption("line-credited-net-lowered",
               "UPDATE invoice_lines SET credited_net = credited_net - 1 "
               f"WHERE invoice_id = '{A}' AND line_id = 'il_1'",
               "line_credits_disagree", f"invoice line {A}/il_1", replica=True),
    Corruption("line-credited-quantity-bumped",
               "UPDATE invoice_lines SET credited_quantity = credited_quantity + 1 "
               f"WHERE invoice_id = '{A}' AND line_id = 'il_1'",
               "line_credits_disagree", f"invoice line {A}/il_1", replica=True),
    # 6.
    Corruption("issue-journal-line-unbalanced",
               f"UPDATE journal_lines SET debit = debit + 1 WHERE credit_note_id = {_note(A1)} "
               "AND entry = 'issue' AND account = 'contra_revenue'",
               "journal_unbalanced", f"credit note {A1}", replica=True),
    Corruption("issue-journal-missing",
               f"DELETE FROM journal_lines WHERE credit_note_id = {_note(A3)} AND entry = 'issue'",
               "journal_unbalanced", f"credit note {A3}", replica=True),
    Corruption("void-journal-missing",
               f"DELETE FROM journal_lines WHERE credit_note_id = {_note(A2)} AND entry = 'void'",
               "journal_unbalanced", f"credit note {A2}", replica=True),
    Corruption("void-journal-not-the-reverse",
               "UPDATE journal_lines SET account = 'customer_credit_balance' "
               f"WHERE credit_note_id = {_note(A2)} AND entry = 'void' "
               "AND account = 'accounts_receivable'",
               "journal_unbalanced", f"credit note {A2}", replica=True),
    Corruption("void-journal-on-an-issued-note",
               "INSERT INTO journal_lines (credit_note_id, entry, position, account, debit, credit) "
               "SELECT credit_note_id, 'void', position, account, credit, debit "
               f"FROM journal_lines WHERE credit_note_id = {_note(A1)} AND entry = 'issue'",
               "journal_unbalanced", f"credit note {A1}", replica=True),
    # 7.
    Corruption("extra-line-on-a-credit-note",
               "INSERT INTO credit_note_lines (credit_note_id, position, description, quantity, "
               f"unit_amount, tax_rate_bps, net, tax) SELECT {_note(B1)}, 99, 'Extra', 1, 1, 0, 1, 0",
               "note_parts_disagree", f"credit note {B1}", replica=True),
    Corruption("settlement-parts-off-by-one",
               "ALTER TABLE credit_notes DROP CONSTRAINT settlement_adds_up; "
               f"UPDATE credit_notes SET credit_amount = credit_amount + 1 WHERE number = '{B1}'",
               "note_parts_disagree", f"credit note {B1}", replica=True),
    # 8.
    Corruption("issued-event-deleted",
               f"DELETE FROM outbox WHERE {_event('credit_note.issued', A1)}",
               "issued_event_missing", f"credit note {A1}"),
    Corruption("issued-event-unpublished",
               f"UPDATE outbox SET published_at = NULL WHERE {_event('credit_note.issued', A1)}",
               "issued_event_unpublished", f"credit note {A1}", replica=True),
    Corruption("issued-event-written-twice",
               _copy_outbox_row(_event("credit_note.issued", A1)),
               "issued_event_duplicated", f"credit note {A1}"),
    Corruption("voided-event-deleted",
               f"DELETE FROM outbox WHERE {_event('credit_note.voided', A2)}",
               "voided_event_missing", f"credit note {A2}"),
    Corruption("voided-event-unpublished",
               f"UPDATE outbox SET published_at = NULL WHERE {_event('credit_note.voided', A2)}",
               "voided_event_unpublished", f"credit note {A2}", replica=True),
    Corruption("voided-event-written-twice",
               _copy_outbox_row(_event("credit_note.voided", A2)),
               "voided_event_duplicated", f"credit note {A2}"),
    Corruption("refund-event-deleted",
               f"DELETE FROM outbox WHERE {_event('refund.requested', C1)}",
               "refund_event_missing", f"credit note {C1}"),
    Corruption("refund-event-unpublished",
               f"UPDATE outbox SET published_at = NULL WHERE {_event('refund.requested', C1)}",
               "refund_event_unpublished", f"credit note {C1}", replica=True),
    Corruption("refund-event-written-twice",
               _copy_outbox_row(_event("refund.requested", C1)),
               "refund_event_duplicated", f"credit note {C1}"),
    Corruption("refund-event-amount-changed",
               "UPDATE outbox SET payload = jsonb_set(payload::jsonb, '{data,amount}', '199')::json "
               f"WHERE {_event('refund.requested', B1)}",
               "refund_event_mismatched", f"credit note {B1}", replica=True),
    Corruption("issued-event-for-a-credit-note-that-does-not-exist",
               _copy_outbox_row(_event("credit_note.issued", A1), event_id="'evt_ghost'",
                                payload="""jsonb_set(payload::jsonb, '{data,id}', '"cn_ghost"')::json"""),
               "event_orphaned", "outbox event evt_ghost"),
    Corruption("voided-event-for-an-issued-credit-note",
               _copy_outbox_row(_event("credit_note.issued", A1), event_id="'evt_ghost'",
                                type_="'credit_note.voided'"),
               "event_orphaned", "outbox event evt_ghost"),
    Corruption("refund-event-for-a-credit-note-without-refund",
               _copy_outbox_row(_event("refund.requested", B1), event_id="'evt_ghost'",
                                payload="jsonb_set(payload::jsonb, '{data,credit_note_id}', "
                                        f"to_jsonb({_note(A1)}))::json"),
               "event_orphaned", "outbox event evt_ghost"),
    # 9.
    Corruption("sequence-gap",
               f"UPDATE credit_notes SET sequence = 4 WHERE number = '{A3}'",
               "numbers_not_gapless", f"invoice {A}", replica=True),
    Corruption("credit-note-count-ahead",
               f"UPDATE invoices SET credit_note_count = credit_note_count + 1 WHERE id = '{A}'",
               "numbers_not_gapless", f"invoice {A}"),
    Corruption("number-not-derived-from-the-sequence",
               f"UPDATE credit_notes SET number = 'ACME-1001-CN-3' WHERE number = '{A3}'",
               "numbers_not_gapless", f"invoice {A}", replica=True),
    # 10.
    Corruption("processed-message-recorded-twice",
               "ALTER TABLE processed_messages DROP CONSTRAINT processed_messages_pkey; "
               "INSERT INTO processed_messages SELECT * FROM processed_messages WHERE id = 'cmd-a1'",
               "duplicate_processed_message", f"processed message {SOURCE} cmd-a1"),
    Corruption("two-credit-notes-for-one-trigger",
               "ALTER TABLE credit_notes DROP CONSTRAINT credit_notes_trigger_source_trigger_id_key; "
               f"UPDATE credit_notes SET trigger_id = 'cmd-a1' WHERE number = '{A3}'",
               "duplicate_trigger", f"trigger {SOURCE} cmd-a1", replica=True),
    # 11.
    Corruption("outbox-event-id-reused",
               "ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key; "
               + _copy_outbox_row("type = 'credit_note.rejected'", event_id="event_id"),
               "outbox_event_id_reused",
               f"outbox event {derived_id('evt', REJECTED, 'credit_note.rejected')}"),
    # 12. an open invoice with nothing left to pay
    Corruption("open-invoice-paid-in-full",
               "UPDATE invoices SET amount_paid = total - customer_balance_applied"
               f" - pre_payment_credited WHERE id = '{A}'",
               "status_disagrees_with_amounts", f"invoice {A}"),
    # 13. a line covered by a time-based credit no credit note has
    Corruption("line-coverage-without-a-time-credit",
               "ALTER TABLE invoice_lines DROP CONSTRAINT time_credits_within_period; "
               f"UPDATE invoice_lines SET time_credits = ARRAY[now()] WHERE invoice_id = '{A}'"
               " AND line_id = 'il_1'",
               "line_coverage_disagrees", f"invoice line {A}/il_1", replica=True),
    # 14. a credit note over the cap of the policy it says it was issued under
    Corruption("credit-note-over-its-policy-cap",
               "UPDATE credit_notes SET policy = 'credit_note.issue:max_credit_bps=1'"
               f" WHERE number = '{A1}'",
               "policy_cap_exceeded", f"credit note {A1}", replica=True),
]


def test_every_invariant_has_a_corruption_that_breaks_it() -> None:
    assert {corruption.invariant for corruption in CORRUPTIONS} == {i.code for i in INVARIANTS}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=[c.name for c in CORRUPTIONS])
async def test_a_corruption_is_reported_as_exactly_its_invariant_on_its_subject(
        ledger: Ledger, corruption: Corruption) -> None:
    await ledger.corrupt(corruption.sql, replica=corruption.replica)

    assert await ledger.violations() == [(corruption.invariant, corruption.subject)]


async def test_a_violation_states_the_figures_without_memo_or_metadata(ledger: Ledger) -> None:
    await ledger.corrupt(
        "UPDATE credit_notes SET memo = 'call Jane at 555-0100', metadata = '{\"vip\": \"yes\"}'; "
        f"UPDATE invoices SET pre_payment_credited = pre_payment_credited + 7 WHERE id = '{A}'",
        replica=True)
    connection = await asyncpg.connect(ledger.database_url)
    try:
        credited = await connection.fetchval(
            "SELECT sum(total) FROM credit_notes WHERE invoice_id = $1 AND status = 'issued'", A)
    finally:
        await connection.close()

    [violation] = await check_invariants(ledger.database_url)
    assert violation.invariant == "credited_amount_disagrees"
    assert violation.detail == (
        f"non-void credit notes total {credited} (pre-payment {credited} + post-payment 0); "
        f"the invoice records pre-payment {credited + 7} + post-payment 0")
    assert "Jane" not in repr(violation) and "vip" not in repr(violation)


async def test_several_violations_come_in_the_order_of_the_invariants(ledger: Ledger) -> None:
    await ledger.corrupt(
        f"UPDATE outbox SET published_at = NULL WHERE {_event('credit_note.issued', B1)}; "
        f"UPDATE outbox SET published_at = NULL WHERE {_event('credit_note.issued', A1)}; "
        f"UPDATE invoices SET refunded = refunded + 1 WHERE id = '{B}'", replica=True)

    assert await ledger.violations() == [
        ("refunds_exceed_cash", f"invoice {B}"),
        ("issued_event_unpublished", f"credit note {A1}"),
        ("issued_event_unpublished", f"credit note {B1}"),
    ]
