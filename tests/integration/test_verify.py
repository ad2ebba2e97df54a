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
    RecordPayment,
    RecordRefundOutcome,
    Settlement,
    SettlementSplit,
    Trigger,
    VoidCreditNote,
)
from service.domain.credit_note import derived_id
from service.domain.refunds import (
    FailureSettlement,
    LinkedRefund,
    PaymentCash,
    RefundState,
    refund_id_for,
)
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
    # the money loop: a payment with an id on an open invoice, one on a paid invoice (all of it
    # an overpayment), and the outcomes of both refunds: one fails (to the customer balance)
    await kafka.publish(topics.invoices, cloudevent("invoice.payment_succeeded", {
        "invoice_id": "in_1001", "amount": 1_000, "currency": "usd", "payment_id": "pay_1"}))
    await kafka.publish(topics.invoices, cloudevent("invoice.payment_succeeded", {
        "invoice_id": "in_2002", "amount": 300, "currency": "usd", "payment_id": "pay_2"}))
    outcomes = iter(("refund.failed", "refund.succeeded"))
    for refund in sorted(refunds, key=lambda r: r.event["data"]["amount"]):
        data = refund.event["data"]
        await kafka.publish(topics.refund_results, cloudevent(next(outcomes), {
            "refund_id": data["id"], "invoice_id": data["invoice_id"]}, source="/payments/refunds"))
    await kafka.expect(topics.credit_note_events, "credit_note.refund_failed")
    await kafka.expect(topics.credit_note_events, "credit_note.refund_succeeded")
    credited = await kafka.expect(topics.customer_balance_events, "customer_balance.credited",
                                  count=4)  # in_2002's credit, in_3003's, the failure, pay_2
    assert sorted(r.event["data"]["reason"] for r in credited) == [
        "credit_note", "credit_note", "overpayment", "refund_failed"]
    await _wait_until_outbox_published(settings)

    assert await check_invariants(settings.database_url) == []
    statuses = await fetch(settings, "SELECT status, count(*) FROM credit_notes GROUP BY status")
    assert {row["status"]: row["count"] for row in statuses} == {"issued": 4, "void": 1}
    paid = await fetch(settings, "SELECT id, amount_paid FROM invoices ORDER BY id")
    assert [(row["id"], row["amount_paid"]) for row in paid] == [
        ("in_1001", 1_000), ("in_2002", 500), ("in_3003", 5_000)]


async def _wait_until_outbox_published(settings: Settings, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await fetch(settings, "SELECT 1 FROM outbox WHERE published_at IS NULL"):
        assert time.monotonic() < deadline, "the relay did not publish the outbox in time"
        await asyncio.sleep(0.1)


# --------------------------------------------------- a ledger written by the service's handlers

A, B, C, D, E = "in_1001", "in_2002", "in_3003", "in_4004", "in_5005"
A1, A2, A3, B1, C1 = ("ACME-1001-CN-01", "ACME-1001-CN-02", "ACME-1001-CN-03", "ACME-2002-CN-01",
                      "ACME-3003-CN-01")
D1, D2, D3, E1 = "ACME-4004-CN-01", "ACME-4004-CN-02", "ACME-4004-CN-03", "ACME-5005-CN-01"
REJECTED = _trigger("cmd-a4")


def _note_id(command_id: str) -> str:
    return derived_id("cn", _trigger(command_id))


def _refund_id(command_id: str, sequence: int, payment_id: str | None) -> str:
    return refund_id_for(_note_id(command_id), PaymentCash(sequence, payment_id, 0))


#: D (docs/rules.md examples 15 and 16): pay_1 (#1) 60.00 and pay_2 (#2) 40.00; D1 refunds 40.00 on
#: pay_2 (fails, to the balance) and 30.00 on pay_1 (succeeds); D2's 20.00 on pay_2 fails and
#: stays payable (settlement none); D3's 10.00 on pay_2 is pending.
D1_PAY_2, D1_PAY_1 = _refund_id("cmd-d1", 2, "pay_2"), _refund_id("cmd-d1", 1, "pay_1")
D2_PAY_2, D3_PAY_2 = _refund_id("cmd-d2", 2, "pay_2"), _refund_id("cmd-d3", 2, "pay_2")
B1_REFUND, C1_REFUND = _refund_id("cmd-b1", 0, None), _refund_id("cmd-c1", 0, None)


def _ledger_commands() -> list[Command]:
    """Five invoices; on A a quantity credit, a line-less credit (voided), an amount credit and
    a rejection; on paid B a refund split; on C (mostly paid by balance) a refund of the cash;
    on D two payments, refunds over them and their outcomes; on paid E a linked refund and two
    overpayments (one without payment id)."""
    def invoice(invoice_id: str, status: str, lines: tuple[DraftLine, ...],
                **extra: Any) -> FinalizeInvoice:
        return FinalizeInvoice(_trigger(f"fin-{invoice_id}", "invoice.finalized"), invoice_id,
                               f"ACME-{invoice_id[-4:]}", "cus_42", "usd", status, lines, **extra)

    def payment(id_: str, invoice_id: str, amount: int, payment_id: str | None) -> RecordPayment:
        return RecordPayment(_trigger(id_, "invoice.payment_succeeded"), invoice_id, amount,
                             "usd", payment_id)

    def outcome(id_: str, refund_id: str, state: RefundState,
                settlement: FailureSettlement = FailureSettlement.CUSTOMER_BALANCE,
                ) -> RecordRefundOutcome:
        return RecordRefundOutcome(_trigger(id_, f"refund.{state}"), D, refund_id, state,
                                   "card expired" if state is RefundState.FAILED else None,
                                   settlement)

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
        VoidCreditNote(_trigger("cmd-a5", "credit_note.void"), _note_id("cmd-a2")),
        IssueCreditNote(_trigger("cmd-b1"), B, "product_unsatisfactory", amount=500,
                        settlement=SettlementSplit(refund_amount=200, credit_amount=100,
                                                   out_of_band_amount=200)),
        IssueCreditNote(_trigger("cmd-c1"), C, "order_change", amount=8_000,
                        settlement=Settlement.REFUND),
        invoice(D, "open", (DraftLine("il_1", "Plan", 1, 10_000),)),
        payment("pay-d1", D, 6_000, "pay_1"),
        payment("pay-d2", D, 4_000, "pay_2"),
        IssueCreditNote(_trigger("cmd-d1"), D, "order_change", amount=7_000,
                        settlement=Settlement.REFUND),
        outcome("out-d1", D1_PAY_2, RefundState.FAILED),
        outcome("out-d2", D1_PAY_1, RefundState.SUCCEEDED),
        IssueCreditNote(_trigger("cmd-d2"), D, "order_change", amount=2_000,
                        settlement=Settlement.REFUND),
        outcome("out-d3", D2_PAY_2, RefundState.FAILED, FailureSettlement.NONE),
        IssueCreditNote(_trigger("cmd-d3"), D, "order_change", amount=1_000,
                        settlement=Settlement.REFUND),
        invoice(E, "paid", (DraftLine("il_1", "Plan", 1, 5_000),), amount_paid=5_000),
        IssueCreditNote(_trigger("cmd-e1"), E, "order_change", amount=2_000,
                        linked_refunds=(LinkedRefund("re_1", 2_000),)),
        payment("pay-e1", E, 1_000, "pay_3"),
        payment("pay-e2", E, 500, None),
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
        assert outcomes == [Outcome.APPLIED] * 6 + [Outcome.REJECTED] + [Outcome.APPLIED] * 16
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
        refunds = await connection.fetch(
            "SELECT refund_id, payment_sequence, amount, status, linked, resettled_to "
            "FROM refunds ORDER BY refund_id")
        payments = await connection.fetch(
            "SELECT invoice_id, sequence, payment_id, amount, applied FROM payments "
            "ORDER BY invoice_id, sequence")
    finally:
        await connection.close()
    assert [(n["number"], n["status"]) for n in notes] == [
        (A1, "issued"), (A2, "void"), (A3, "issued"), (B1, "issued"), (C1, "issued"),
        (D1, "issued"), (D2, "issued"), (D3, "issued"), (E1, "issued")]
    assert [(n["refund_amount"], n["credit_amount"]) for n in notes][3:] == [
        (200, 100), (5_000, 3_000), (7_000, 0), (2_000, 0), (1_000, 0), (2_000, 0)]
    assert sorted(tuple(r) for r in refunds) == sorted([
        (B1_REFUND, 0, 200, "pending", False, None), (C1_REFUND, 0, 5_000, "pending", False, None),
        (D1_PAY_2, 2, 4_000, "failed", False, "customer_balance"),
        (D1_PAY_1, 1, 3_000, "succeeded", False, None),
        (D2_PAY_2, 2, 2_000, "failed", False, "none"), (D3_PAY_2, 2, 1_000, "pending", False, None),
        ("re_1", 0, 2_000, "succeeded", True, None)])
    assert [tuple(p) for p in payments] == [
        (B, 0, None, 500, 500), (C, 0, None, 5_000, 5_000), (D, 1, "pay_1", 6_000, 6_000),
        (D, 2, "pay_2", 4_000, 4_000), (E, 0, None, 5_000, 5_000), (E, 1, "pay_3", 1_000, 0),
        (E, 2, None, 500, 0)]
    assert {t["type"]: t["count"] for t in types} == {
        "credit_note.issued": 9, "credit_note.voided": 1, "credit_note.rejected": 1,
        "refund.requested": 6, "credit_note.refund_succeeded": 1, "credit_note.refund_failed": 2,
        "customer_balance.credited": 5}
    assert await check_invariants(ledger.database_url) == []


def _note(number: str) -> str:
    return f"(SELECT id FROM credit_notes WHERE number = '{number}')"


def _event(type_: str, number: str) -> str:
    """A WHERE condition selecting the outbox rows of ``type_`` for credit note ``number``."""
    return f"type = '{type_}' AND payload -> 'data' ->> 'id' = {_note(number)}"


def _refund_event(refund_id: str) -> str:
    """A WHERE condition selecting the refund.requested rows of ``refund_id``."""
    return f"type = 'refund.requested' AND payload -> 'data' ->> 'id' = '{refund_id}'"


def _outcome_event(refund_id: str) -> str:
    """A WHERE condition selecting the refund outcome rows of ``refund_id``."""
    return ("type IN ('credit_note.refund_succeeded', 'credit_note.refund_failed') "
            f"AND payload -> 'data' ->> 'refund_id' = '{refund_id}'")


def _balance_event(field: str, value: str) -> str:
    """A WHERE condition selecting the customer_balance.credited rows whose ``data.field``
    is ``value`` (an SQL expression)."""
    return f"type = 'customer_balance.credited' AND payload -> 'data' ->> '{field}' = {value}"


def _set_data(field: str, value: str) -> str:
    """``payload`` with ``data.field`` set to ``value`` (a JSON literal)."""
    return f"jsonb_set(payload::jsonb, '{{data,{field}}}', '{value}')::json"


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


# an update of a note's memo and metadata recorded as they stand, and its event
_UPDATE_ROW = ("INSERT INTO credit_note_updates (credit_note_id, trigger_source, trigger_id, memo,"
               " metadata) SELECT id, '/tests', 'upd-x', memo, metadata FROM credit_notes"
               " WHERE number = '{number}'")
_UPDATED_EVENT = (
    "INSERT INTO outbox (event_id, topic, key, type, payload, published_at)"
    " SELECT 'evt-upd-{copy}', o.topic, o.key, 'credit_note.updated', json_build_object("
    "'data', json_build_object('id', n.id, 'memo', n.memo, 'metadata', n.metadata,"
    " 'trigger', json_build_object('source', '/tests', 'id', 'upd-x'))), now()"
    " FROM credit_notes AS n JOIN outbox AS o ON o.type = 'credit_note.issued'"
    " AND o.payload -> 'data' ->> 'id' = n.id WHERE n.number = '{number}'")


@dataclass(frozen=True)
class Corruption:
    name: str
    sql: str
    invariant: str
    subject: str
    replica: bool = False
    #: the other violations the same corruption is, necessarily (invariant, subject)
    also: tuple[tuple[str, str], ...] = ()


CORRUPTIONS = [
    # 1. a restated invoice: total and payment lowered under a full credit
    Corruption("invoice-total-lowered-under-its-credits",
               "ALTER TABLE invoices DROP CONSTRAINT credits_within_total; "
               f"UPDATE invoices SET subtotal = 400, total = 400, amount_paid = 400 WHERE id = '{B}';"
               f"UPDATE payments SET amount = 400, applied = 400 WHERE invoice_id = '{B}'",
               "credits_exceed_total", f"invoice {B}", replica=True,
               also=(("totals_disagree", f"invoice_totals {B}"),)),
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
               "refunds_exceed_cash", f"invoice {B}", replica=True),
    Corruption("refunds-failed-lowered",
               f"UPDATE invoices SET refunds_failed = refunds_failed - 1 WHERE id = '{D}'",
               "refunds_exceed_cash", f"invoice {D}", replica=True),
    Corruption("cash-paid-below-refunded",
               _drop_checks_on("invoices", "refunded") + _drop_checks_on("invoices", "amount_paid")
               + f"UPDATE invoices SET amount_paid = 100, status = 'uncollectible' WHERE id = '{B}'",
               "refunds_exceed_cash", f"invoice {B}", replica=True,
               also=(("payments_disagree", f"invoice {B}"),)),
    # payments and refunds
    Corruption("payment-applied-lowered",
               "UPDATE payments SET amount = amount - 1, applied = applied - 1 "
               f"WHERE invoice_id = '{D}' AND sequence = 1",
               "payments_disagree", f"invoice {D}", replica=True,
               also=(("totals_disagree", f"invoice_totals {D}"),)),
    Corruption("payment-at-finalization-given-an-id",
               "ALTER TABLE payments DROP CONSTRAINT finalization_payment; "
               f"UPDATE payments SET payment_id = 'pay_x' WHERE invoice_id = '{E}' AND sequence = 0",
               "payments_disagree", f"invoice {E}", replica=True),
    Corruption("payment-holding-less-than-its-refunds",  # cash moved from pay_1 to pay_2
               "UPDATE payments SET amount = amount + CASE sequence WHEN 1 THEN -4000 ELSE 4000 END,"
               " applied = applied + CASE sequence WHEN 1 THEN -4000 ELSE 4000 END"
               f" WHERE invoice_id = '{D}'",
               "refunds_exceed_payment", f"payment {D}#1", replica=True),
    Corruption("legacy-refund-id-naming-another-notes-refund",
               f"UPDATE credit_notes SET refund_id = '{D1_PAY_1}' WHERE number = '{B1}'",
               "refund_id_reused", f"refund {D1_PAY_1}", replica=True),
    Corruption("refund-moved-to-another-credit-note",
               f"UPDATE refunds SET credit_note_id = {_note(D2)} WHERE refund_id = '{D3_PAY_2}'",
               "refunds_disagree", f"credit note {D2}", replica=True,
               also=(("refunds_disagree", f"credit note {D3}"),
                     ("refund_event_mismatched", f"refund {D3_PAY_2}"))),
    Corruption("refund-amount-bumped",
               f"UPDATE refunds SET amount = amount + 1 WHERE refund_id = '{B1_REFUND}'",
               "refunds_disagree", f"credit note {B1}", replica=True,
               also=(("refunds_payable_open", f"invoice {B}"),
                     ("refund_event_mismatched", f"refund {B1_REFUND}"),
                     ("totals_disagree", f"invoice_totals {B}"),
                     ("totals_disagree", f"payment_refund_totals {B}/0"))),
    Corruption("refunds-payable-credit-moved-to-the-balance",
               "UPDATE journal_lines SET credit = credit + CASE account WHEN 'refunds_payable' "
               "THEN -1 ELSE 1 END WHERE account IN ('refunds_payable', 'customer_credit_balance') "
               f"AND credit_note_id = {_note(B1)} AND entry = 'issue'",
               "refunds_payable_open", f"invoice {B}", replica=True),
    Corruption("failed-refund-settled-as-none-marked-to-the-balance",
               "UPDATE refunds SET resettled_to = 'customer_balance' "
               f"WHERE refund_id = '{D2_PAY_2}'",
               "refunds_payable_open", f"invoice {D}", replica=True,
               also=(("refund_journal_unbalanced", f"refund {D2_PAY_2}"),
                     ("refund_outcome_event_mismatched", f"refund {D2_PAY_2}"),
                     ("balance_event_missing", f"refund {D2_PAY_2}"))),
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
    Corruption("refund-journal-crediting-the-wrong-account",
               "UPDATE refund_journal_lines SET account = 'customer_credit_balance' "
               f"WHERE refund_id = '{D1_PAY_1}' AND account = 'cash'",
               "refund_journal_unbalanced", f"refund {D1_PAY_1}", replica=True),
    Corruption("linked-refund-journal-unbalanced",
               "UPDATE refund_journal_lines SET credit = credit + 1 "
               "WHERE refund_id = 're_1' AND account = 'cash'",
               "refund_journal_unbalanced", "refund re_1", replica=True),
    Corruption("refund-journal-on-a-pending-refund",
               "INSERT INTO refund_journal_lines (refund_id, position, account, debit, credit,"
               f" effective_at) VALUES ('{D3_PAY_2}', 0, 'cash', 5, 0, now()),"
               f" ('{D3_PAY_2}', 1, 'cash', 0, 5, now())",
               "refund_journal_unbalanced", f"refund {D3_PAY_2}", replica=True),
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
               "note_parts_disagree", f"credit note {B1}", replica=True,
               # its customer_balance.credited no longer states its credit_amount
               also=(("balance_event_mismatched", f"credit note {B1}"),)),
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
               f"DELETE FROM outbox WHERE {_refund_event(C1_REFUND)}",
               "refund_event_missing", f"refund {C1_REFUND}"),
    Corruption("refund-event-of-one-payment-deleted",
               f"DELETE FROM outbox WHERE {_refund_event(D1_PAY_1)}",
               "refund_event_missing", f"refund {D1_PAY_1}"),
    Corruption("refund-event-unpublished",
               f"UPDATE outbox SET published_at = NULL WHERE {_refund_event(C1_REFUND)}",
               "refund_event_unpublished", f"refund {C1_REFUND}", replica=True),
    Corruption("refund-event-written-twice",
               _copy_outbox_row(_refund_event(D3_PAY_2)),
               "refund_event_duplicated", f"refund {D3_PAY_2}"),
    Corruption("refund-event-amount-changed",
               f"UPDATE outbox SET payload = {_set_data('amount', '199')} "
               f"WHERE {_refund_event(B1_REFUND)}",
               "refund_event_mismatched", f"refund {B1_REFUND}", replica=True),
    Corruption("refund-event-on-another-payment",
               "UPDATE outbox SET payload = " + _set_data("payment_id", '"pay_1"')
               + f" WHERE {_refund_event(D3_PAY_2)}",
               "refund_event_mismatched", f"refund {D3_PAY_2}", replica=True),
    Corruption("issued-event-for-a-credit-note-that-does-not-exist",
               _copy_outbox_row(_event("credit_note.issued", A1), event_id="'evt_ghost'",
                                payload="""jsonb_set(payload::jsonb, '{data,id}', '"cn_ghost"')::json"""),
               "event_orphaned", "outbox event evt_ghost"),
    Corruption("voided-event-for-an-issued-credit-note",
               _copy_outbox_row(_event("credit_note.issued", A1), event_id="'evt_ghost'",
                                type_="'credit_note.voided'"),
               "event_orphaned", "outbox event evt_ghost"),
    Corruption("refund-event-for-a-refund-that-does-not-exist",
               _copy_outbox_row(_refund_event(B1_REFUND), event_id="'evt_ghost'",
                                payload=_set_data("id", '"rf_ghost"')),
               "event_orphaned", "outbox event evt_ghost"),
    Corruption("refund-event-for-a-linked-refund",
               _copy_outbox_row(_refund_event(B1_REFUND), event_id="'evt_ghost'",
                                payload=_set_data("id", '"re_1"')),
               "event_orphaned", "outbox event evt_ghost"),
    # refund outcomes
    Corruption("refund-outcome-event-deleted",
               f"DELETE FROM outbox WHERE {_outcome_event(D1_PAY_1)}",
               "refund_outcome_event_missing", f"refund {D1_PAY_1}"),
    Corruption("refund-outcome-event-written-twice",
               _copy_outbox_row(_outcome_event(D1_PAY_2)),
               "refund_outcome_event_duplicated", f"refund {D1_PAY_2}"),
    Corruption("refund-outcome-event-says-succeeded-for-a-failed-refund",
               f"UPDATE outbox SET type = 'credit_note.refund_succeeded' "
               f"WHERE {_outcome_event(D2_PAY_2)}",
               "refund_outcome_event_mismatched", f"refund {D2_PAY_2}", replica=True),
    Corruption("refund-outcome-event-for-a-pending-refund",
               _copy_outbox_row(_outcome_event(D1_PAY_1), event_id="'evt_ghost'",
                                payload=_set_data("refund_id", f'"{D3_PAY_2}"')),
               "event_orphaned", "outbox event evt_ghost"),
    # the customer balance
    Corruption("balance-event-of-a-credit-note-deleted",
               f"DELETE FROM outbox WHERE {_balance_event('credit_note_id', _note(C1))}",
               "balance_event_missing", f"credit note {C1}"),
    Corruption("balance-event-of-a-payment-without-id-deleted",
               "DELETE FROM outbox WHERE type = 'customer_balance.credited' "
               "AND payload -> 'data' ->> 'reason' = 'overpayment' "
               "AND payload -> 'data' ->> 'payment_id' IS NULL",
               "balance_event_missing", f"payment {E}#2"),
    Corruption("balance-event-of-an-overpayment-written-twice",
               _copy_outbox_row(_balance_event("payment_id", "'pay_3'")),
               "balance_event_duplicated", f"payment {E}#1"),
    Corruption("balance-event-of-a-failed-refund-amount-changed",
               f"UPDATE outbox SET payload = {_set_data('amount', '3999')} "
               f"WHERE {_balance_event('refund_id', repr(D1_PAY_2))}",
               "balance_event_mismatched", f"refund {D1_PAY_2}", replica=True),
    Corruption("balance-event-for-a-payment-that-does-not-exist",
               _copy_outbox_row(_balance_event("payment_id", "'pay_3'"), event_id="'evt_ghost'",
                                payload=_set_data("payment_id", '"pay_ghost"')),
               "balance_event_orphaned", "outbox event evt_ghost"),
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
               "INSERT INTO payments (invoice_id, sequence, payment_id, amount, applied, "
               "trigger_source, trigger_id) SELECT id, 1, 'pay_x', "
               "total - customer_balance_applied - pre_payment_credited, "
               "total - customer_balance_applied - pre_payment_credited, 'x', 'x' "
               f"FROM invoices WHERE id = '{A}'; "
               "UPDATE invoices SET amount_paid = total - customer_balance_applied"
               f" - pre_payment_credited WHERE id = '{A}'",
               "status_disagrees_with_amounts", f"invoice {A}", replica=True,
               also=(("totals_disagree", f"invoice_totals {A}"),)),
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
    # 15. a memo edited past credit_notes_edited_with_update (no update row, no event)
    Corruption("memo-edited-without-its-update",
               f"UPDATE credit_notes SET memo = 'edited by hand' WHERE number = '{A1}'",
               "note_edit_unrecorded", f"credit note {A1}", replica=True),
    Corruption("update-recorded-without-its-event",
               _UPDATE_ROW.format(number=A1),
               "updated_event_missing", f"credit note {A1}"),
    Corruption("update-event-written-twice",
               _UPDATE_ROW.format(number=A1) + "; " + _UPDATED_EVENT.format(number=A1, copy=1)
               + "; " + _UPDATED_EVENT.format(number=A1, copy=2),
               "updated_event_duplicated", f"credit note {A1}"),
    Corruption("issue-journal-dated-otherwise",
               "UPDATE journal_lines SET effective_at = effective_at - interval '1 day'"
               f" WHERE credit_note_id = {_note(A1)} AND entry = 'issue'",
               "journal_dated_otherwise", f"credit note {A1}", replica=True),
    Corruption("linked-refund-journal-dated-otherwise",
               "UPDATE refund_journal_lines SET effective_at = '2020-01-01T00:00:00Z'"
               " WHERE refund_id = 're_1'",
               "journal_dated_otherwise", "refund re_1", replica=True),
    Corruption("outcome-journal-dated-otherwise",
               "UPDATE refund_journal_lines SET effective_at = '2020-01-01T00:00:00Z'"
               f" WHERE refund_id = '{D1_PAY_1}'",
               "journal_dated_otherwise", f"refund {D1_PAY_1}", replica=True),
    # 16. a running total (0018) moved by hand, triggers off: only its history says so
    Corruption("running-total-moved-by-hand",
               f"UPDATE invoice_totals SET paid = paid + 1 WHERE invoice_id = '{A}'",
               "totals_disagree", f"invoice_totals {A}", replica=True),
]


def test_every_invariant_has_a_corruption_that_breaks_it() -> None:
    assert {corruption.invariant for corruption in CORRUPTIONS} == {i.code for i in INVARIANTS}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=[c.name for c in CORRUPTIONS])
async def test_a_corruption_is_reported_as_exactly_its_invariant_on_its_subject(
        ledger: Ledger, corruption: Corruption) -> None:
    await ledger.corrupt(corruption.sql, replica=corruption.replica)

    order = {invariant.code: position for position, invariant in enumerate(INVARIANTS)}
    expected = sorted([(corruption.invariant, corruption.subject), *corruption.also],
                      key=lambda found: (order[found[0]], found[1]))
    assert await ledger.violations() == expected


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

    violations = await check_invariants(ledger.database_url)
    assert "Jane" not in repr(violations) and "vip" not in repr(violations)
    # (the memo edited by hand is note_edit_unrecorded on every note, said without it)
    [violation] = [v for v in violations if v.invariant != "note_edit_unrecorded"]
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
