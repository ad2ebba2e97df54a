"""The database refuses to rewrite history: each attack of issue 15 (findings 3 and 5), performed.

A small ledger is written through the service's own handlers and unit of work
as the application role (so the real code paths, the void and the re-claim of
a released key included, run under the triggers of migration 0011). Then each
attack is tried as the application role, as the migrator role and as a
superuser; PostgreSQL must refuse it, for the expected reason, and every table
that holds history must read exactly as before.

What a superuser (or the tables' owner) can still do, drop or disable the
triggers, is not attacked here: docs/security.md says so.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import product
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.adapters.invariants import check_invariants
from service.adapters.unit_of_work import PostgresUnitOfWork
from service.domain.commands import (
    Command,
    DraftLine,
    FinalizeInvoice,
    InvoiceLineByQuantity,
    IssueCreditNote,
    OnExcess,
    RecordPayment,
    ServicePeriod,
    Settlement,
    Trigger,
    UnusedTime,
    UpdateCreditNote,
    VoidCreditNote,
)
from service.domain.credit_note import derived_id
from service.domain.refunds import LinkedRefund
from service.handlers import Delivery, Message, Outcome, Result, apply_batch
from service.settings import Topics

pytestmark = pytest.mark.integration

SOURCE = "/tests"
A, B, C = "in_1001", "in_2002", "in_3003"  # A open (10,000), B paid (500), C open, no notes
A1, A2 = "ACME-1001-CN-01", "ACME-1001-CN-02"  # A1 issued (1,000), A2 void (2,000)
# D: a line with a service period, credited by quantity (D1: 2 of 10) and for unused time (D2)
D, D1, D2 = "in_4004", "ACME-4004-CN-01", "ACME-4004-CN-02"
OCT1, NOV1, OCT16 = (datetime(2026, month, day, tzinfo=UTC) for month, day in
                     ((10, 1), (11, 1), (10, 16)))
HISTORY = ("invoices", "invoice_lines", "credit_notes", "credit_note_lines", "journal_lines",
           "processed_messages", "outbox", "dlq_replays", "retention_horizons", "payments",
           "refunds", "refund_journal_lines", "credit_note_updates")
# the money loop (0016): on B a refund requested (pending, on its finalization payment) and
# one linked (re_b, succeeded with its journal); a payment on C; A1's memo updated
B1, B2 = "ACME-2002-CN-01", "ACME-2002-CN-02"
ROLES = ("app", "migrator", "superuser")
PERMISSION = "permission denied"


def _trigger(id_: str, type_: str = "credit_note.issue") -> Trigger:
    return Trigger(SOURCE, id_, type_)


def _invoice(invoice_id: str, status: str, unit_amount: int,
             amount_paid: int | None = None) -> FinalizeInvoice:
    return FinalizeInvoice(_trigger(f"fin-{invoice_id}", "invoice.finalized"), invoice_id,
                           f"ACME-{invoice_id[-4:]}", "cus_42", "usd", status,
                           (DraftLine("il_1", "Widget", 1, unit_amount),),
                           amount_paid=amount_paid)


# ------------------------------------------------------------------------------ the roles


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rsplit('@', 1)[-1]}"))


@dataclass(frozen=True)
class Roles:
    superuser: str
    app: str
    migrator: str
    nobody: str  # a login in no group role: what PUBLIC may do

    def url(self, role: str) -> str:
        return {"superuser": self.superuser, "app": self.app, "migrator": self.migrator,
                "nobody": self.nobody}[role]


@pytest.fixture
async def roles(database_url: str) -> AsyncIterator[Roles]:
    """Login users that are members of creditnotes_app, of creditnotes_migrator, of nothing."""
    suffix = uuid.uuid4().hex[:8]
    users = {"app": f"cn_app_{suffix}", "migrator": f"cn_mig_{suffix}",
             "nobody": f"cn_none_{suffix}"}
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE ROLE "{users["app"]}" LOGIN IN ROLE creditnotes_app')
        await admin.execute(f'CREATE ROLE "{users["migrator"]}" LOGIN IN ROLE creditnotes_migrator')
        await admin.execute(f'CREATE ROLE "{users["nobody"]}" LOGIN')
        yield Roles(database_url, *(as_user(database_url, users[name])
                                    for name in ("app", "migrator", "nobody")))
    finally:
        for user in users.values():
            await admin.execute(f'DROP OWNED BY "{user}"')
            await admin.execute(f'DROP ROLE IF EXISTS "{user}"')
        await admin.close()


async def _apply(pool: asyncpg.Pool, command: Command) -> Result:
    [result] = await apply_batch([Message(command, Delivery("tests"))],
                                 lambda: PostgresUnitOfWork(pool, Topics()))
    return result


@pytest.fixture
async def ledger(roles: Roles) -> Roles:
    """Invoices A, B, C; on A a note issued and one voided; keys applied, released, re-claimed;
    two replays audited. All written as the application role, through the real code paths."""
    pool = await asyncpg.create_pool(roles.app, min_size=1, max_size=2)
    try:
        for command in (_invoice(A, "open", 10_000), _invoice(B, "paid", 500, amount_paid=500),
                        _invoice(C, "open", 300),
                        IssueCreditNote(_trigger("cmd-a1"), A, "other", amount=1_000),
                        IssueCreditNote(_trigger("cmd-a2"), A, "other", amount=2_000),
                        VoidCreditNote(_trigger("cmd-a3", "credit_note.void"),
                                       derived_id("cn", _trigger("cmd-a2"))),
                        FinalizeInvoice(_trigger(f"fin-{D}", "invoice.finalized"), D, "ACME-4004",
                                        "cus_42", "usd", "open",
                                        (DraftLine("il_1", "Seats", 10, 1_000,
                                                   period=ServicePeriod(OCT1, NOV1)),)),
                        IssueCreditNote(_trigger("cmd-d1", "return.received"), D, "order_change",
                                        lines=(InvoiceLineByQuantity("il_1", 2),)),
                        IssueCreditNote(_trigger("cmd-d2", "subscription.canceled"), D,
                                        "subscription_cancellation",
                                        lines=(UnusedTime("il_1", OCT16),),
                                        on_excess=OnExcess.CAP),
                        IssueCreditNote(_trigger("cmd-b1"), B, "other", amount=200,
                                        settlement=Settlement.REFUND),
                        IssueCreditNote(_trigger("cmd-b2"), B, "other", amount=100,
                                        settlement=Settlement.REFUND,
                                        linked_refunds=(LinkedRefund("re_b", 100),)),
                        RecordPayment(_trigger("pay-c1", "invoice.payment_succeeded"), C, 100,
                                      "usd", "pay_c1"),
                        UpdateCreditNote(_trigger("upd-a1", "credit_note.update"),
                                         derived_id("cn", _trigger("cmd-a1")), memo="fixed",
                                         memo_set=True)):
            assert (await _apply(pool, command)).outcome is Outcome.APPLIED
        # a key given back by a dead letter, then re-claimed by its replay: the legal path
        early = IssueCreditNote(_trigger("early"), "in_9009", "other", amount=100)
        assert (await _apply(pool, early)).error is not None
        assert (await _apply(pool, _invoice("in_9009", "open", 1_000))).outcome is Outcome.APPLIED
        assert (await _apply(pool, early)).outcome is Outcome.APPLIED
        # and one that stays released
        late = IssueCreditNote(_trigger("late"), "in_8008", "other", amount=100)
        assert (await _apply(pool, late)).error is not None
        outcomes = {row["id"]: row["outcome"] for row in await pool.fetch(
            "SELECT id, outcome FROM processed_messages WHERE id IN ('early', 'late')")}
        assert outcomes == {"early": "applied", "late": "released:invoice_not_found"}
        statuses = {row["number"]: row["status"] for row in await pool.fetch(
            "SELECT number, status FROM credit_notes")}
        assert statuses == {A1: "issued", A2: "void", "ACME-9009-CN-01": "issued",
                            D1: "issued", D2: "issued", B1: "issued", B2: "issued"}
        refunds = {(row["status"], row["linked"]) for row in await pool.fetch(
            f"SELECT status, linked FROM refunds WHERE invoice_id = '{B}'")}
        assert refunds == {("pending", False), ("succeeded", True)}
        line = await pool.fetchrow("SELECT credit_method, time_credits FROM invoice_lines"
                                   f" WHERE invoice_id = '{D}'")
        assert line is not None
        assert (line["credit_method"], line["time_credits"]) == ("quantity", [OCT16])
        # the relay published A's events and parked D's first one (its later ones wait,
        # unpublished); retention pruned the outbox up to ten days ago
        await pool.execute(f"UPDATE outbox SET published_at = now() WHERE key = '{A}'")
        await pool.execute("UPDATE outbox SET parked_at = now(), park_error = 'too large'"
                           f" WHERE seq = (SELECT min(seq) FROM outbox WHERE key = '{D}')")
        await pool.execute("INSERT INTO retention_horizons (table_name, pruned_before)"
                           " VALUES ('outbox', now() - interval '10 days')")
        # two replays audited as `creditnotes dlq replay` does: one claimed, re-claimed by a
        # later run (--force) and sent; one left claimed ("maybe sent")
        await pool.execute(
            "INSERT INTO dlq_replays (dead_letter_digest, content_digest, dlq_topic, "
            "dlq_partition, dlq_offset, original_topic, original_partition, original_offset, "
            "reason, record_key, replay_run, replayed_by, state) VALUES "
            "('d-sent', 'c-1', 'cmds.dlq', 0, 1, 'cmds', 0, 1, 'invoice_not_found', 'in_8008', "
            "'run-1', 'ops', 'claimed'), "
            "('d-claimed', 'c-2', 'cmds.dlq', 0, 2, 'cmds', 0, 2, 'invoice_not_found', "
            "'in_8008', 'run-1', 'ops', 'claimed')")
        await pool.execute("UPDATE dlq_replays SET replay_run = 'run-2', replayed_by = 'ops', "
                           "replayed_at = now() WHERE dead_letter_digest = 'd-sent' "
                           "AND state = 'claimed'")
        await pool.execute("UPDATE dlq_replays SET state = 'sent', sent_at = now() "
                           "WHERE dead_letter_digest = 'd-sent' AND replay_run = 'run-2'")
    finally:
        await pool.close()
    # two days pass for the replay audit (a superuser bypassing the triggers: time passing)
    admin = await asyncpg.connect(roles.superuser)
    try:
        async with admin.transaction():
            await admin.execute("SET LOCAL session_replication_role = replica")
            await admin.execute("UPDATE dlq_replays SET replayed_at = replayed_at - interval"
                                " '2 days', sent_at = sent_at - interval '2 days'")
    finally:
        await admin.close()
    return roles


async def _history(url: str) -> dict[str, list[str]]:
    connection = await asyncpg.connect(url)
    try:
        return {table: [row[0] for row in await connection.fetch(
                    f"SELECT to_jsonb(t)::text FROM {table} AS t ORDER BY 1")]
                for table in HISTORY}
    finally:
        await connection.close()


async def _attempt(url: str, statements: tuple[str, ...]) -> str | None:
    """Run ``statements`` in one transaction; the error PostgreSQL refused them with, or None."""
    connection = await asyncpg.connect(url)
    try:
        async with connection.transaction():
            for statement in statements:
                await connection.execute(statement)
    except asyncpg.PostgresError as error:
        return str(error)
    finally:
        await connection.close()
    return None


# ------------------------------------------------------------ finding 5: rewriting history


def _note(number: str) -> str:
    return f"(SELECT id FROM credit_notes WHERE number = '{number}')"


_VOID_A1 = (f"UPDATE credit_notes SET status = 'void', voided_at = now(), "
            f"voided_by_source = '/attacker', voided_by_id = 'forged' WHERE number = '{A1}'",
            f"UPDATE invoices SET pre_payment_credited = pre_payment_credited - 1000 "
            f"WHERE id = '{A}'")


# a void of A1 complete but for its invoice line: the void, its reversal, the invoice's counter
_REVERSE_A1 = ("INSERT INTO journal_lines (credit_note_id, entry, position, account, debit, "
               f"credit) SELECT credit_note_id, 'void', position, account, credit, debit "
               f"FROM journal_lines WHERE credit_note_id = {_note(A1)} AND entry = 'issue'")
_TAKE_BACK_A1 = ("UPDATE invoice_lines AS il SET credited_net = il.credited_net - l.net, "
                 "credited_tax = il.credited_tax - l.tax FROM credit_note_lines AS l "
                 f"WHERE l.credit_note_id = {_note(A1)} AND il.invoice_id = '{A}' "
                 "AND il.line_id = l.invoice_line_id")


def _journal(number: str, entry: str, *lines: tuple[int, str, int, int]) -> str:
    values = ", ".join(f"({_note(number)}, '{entry}', {position}, '{account}', {debit}, {credit})"
                       for position, account, debit, credit in lines)
    return ("INSERT INTO journal_lines (credit_note_id, entry, position, account, debit, credit) "
            f"VALUES {values}")


@dataclass(frozen=True)
class Attack:
    name: str
    statements: tuple[str, ...]
    refused: str  # what the refusal says (a regular expression)
    refused_to_app: str | None = None  # when the application role is refused something else
    roles: tuple[str, ...] = ROLES  # who is refused (the others may repair by hand)


ATTACKS = [
    # a void, set once and together
    Attack("void-time-rewritten",
           (f"UPDATE credit_notes SET voided_at = voided_at - interval '1 day' "
            f"WHERE number = '{A2}'",), "never rewritten"),
    Attack("voided-by-rewritten",
           (f"UPDATE credit_notes SET voided_by_source = '/attacker', voided_by_id = 'forged' "
            f"WHERE number = '{A2}'",), "never rewritten"),
    Attack("void-columns-without-the-void",
           (f"UPDATE credit_notes SET voided_by_source = '/attacker', voided_by_id = 'forged' "
            f"WHERE number = '{A1}'",), "set only by its void"),
    Attack("void-backdated",
           (_VOID_A1[0].replace("voided_at = now()", "voided_at = now() - interval '1 day'"),
            _VOID_A1[1]), "voided now"),
    Attack("void-without-its-reversal", _VOID_A1, "without the reversal of its journal"),
    Attack("void-with-a-balanced-reversal-that-is-not-the-reverse",
           (*_VOID_A1, _journal(A1, "void", (0, "customer_credit_balance", 1_000, 0),
                                (1, "contra_revenue", 0, 1_000))),
           "without the reversal of its journal"),
    Attack("credit-note-inserted-void",
           ("INSERT INTO credit_notes (id, invoice_id, sequence, number, customer_id, currency, "
            "status, reason, subtotal, tax, total, pre_payment_amount, refund_amount, "
            "credit_amount, out_of_band_amount, trigger_source, trigger_id, trigger_type, "
            f"voided_at) VALUES ('cn_x', '{A}', 9, 'ACME-1001-CN-09', 'cus_42', 'usd', 'void', "
            "'other', 100, 0, 100, 100, 0, 0, 0, '/attacker', 'x', 'credit_note.issue', now())",),
           "inserted issued"),
    # nothing added to a posted note or journal
    Attack("line-added-to-an-issued-credit-note",
           ("INSERT INTO credit_note_lines (credit_note_id, position, description, tax_rate_bps, "
            f"net, tax) VALUES ({_note(A1)}, 9, 'Extra', 0, 1, 0)",), "is posted"),
    Attack("balanced-lines-added-to-a-posted-journal",
           (_journal(A1, "issue", (9, "accounts_receivable", 500, 0),
                     (10, "refunds_payable", 0, 500)),), "is posted"),
    Attack("lines-added-to-a-posted-void-journal",
           (_journal(A2, "void", (9, "accounts_receivable", 500, 0),
                     (10, "contra_revenue", 0, 500)),), "written only by the void"),
    Attack("void-journal-on-an-issued-note",
           (_journal(A1, "void", (0, "contra_revenue", 0, 1_000),
                     (1, "accounts_receivable", 1_000, 0)),), "written only by the void"),
    # invoices: status along its edges, money received never taken back
    Attack("paid-invoice-set-back-to-open",
           (f"UPDATE invoices SET status = 'open' WHERE id = '{B}'",),
           "cannot go from paid to open"),
    Attack("amount-paid-set-back",
           (f"UPDATE invoices SET amount_paid = 0, status = 'paid' WHERE id = '{B}'",),
           "never decrease"),
    Attack("credit-note-count-set-back",
           (f"UPDATE invoices SET credit_note_count = 0 WHERE id = '{A}'",), "never decrease"),
    # processed messages: written only by the transaction that claimed them
    Attack("applied-message-marked-released",
           ("UPDATE processed_messages SET outcome = 'released:invoice_not_found' "
            "WHERE id = 'cmd-a1'",), "only by the transaction that claimed it"),
    Attack("applied-message-touched-then-released",
           ("UPDATE processed_messages SET outcome = outcome WHERE id = 'cmd-a1'",
            "UPDATE processed_messages SET outcome = 'released:x' WHERE id = 'cmd-a1'"),
           "only by the transaction that claimed it"),
    Attack("applied-message-released-through-the-claim-statement",
           ("INSERT INTO processed_messages (source, id, type, topic, outcome) VALUES "
            "('/tests', 'cmd-a1', 'credit_note.issue', 'x', 'applied') ON CONFLICT (source, id) "
            "DO UPDATE SET outcome = 'released:x'",), "only by the transaction that claimed it"),
    Attack("released-message-marked-applied-in-the-past",
           ("UPDATE processed_messages SET outcome = 'applied' WHERE id = 'late'",),
           "only by the transaction that claimed it"),
    Attack("message-outcome-rewritten",
           ("UPDATE processed_messages SET outcome = 'rejected:invoice_void' "
            "WHERE id = 'cmd-a2'",), "only by the transaction that claimed it"),
    Attack("ledger-time-moved-back-to-make-a-key-prunable",
           ("UPDATE processed_messages SET processed_at = now() - interval '400 days' "
            "WHERE id = 'cmd-a1'",), "only by the transaction that claimed it"),
    # the replay audit: sent once, never set back, never backdated (to be pruned and replayed)
    Attack("sent-replay-set-back-to-maybe-sent",
           ("UPDATE dlq_replays SET state = 'claimed', sent_at = NULL "
            "WHERE dead_letter_digest = 'd-sent'",), "a sent replay is never rewritten"),
    Attack("replay-backdated-to-be-pruned",
           ("UPDATE dlq_replays SET replayed_at = now() - interval '400 days' "
            "WHERE dead_letter_digest = 'd-claimed'",), "nothing else changes"),
    Attack("replay-marked-sent-in-the-past",
           ("UPDATE dlq_replays SET state = 'sent', sent_at = now() - interval '400 days' "
            "WHERE dead_letter_digest = 'd-claimed'",), "nothing else changes"),
    Attack("replay-target-rewritten",
           ("UPDATE dlq_replays SET original_topic = 'refund-requests' "
            "WHERE dead_letter_digest = 'd-claimed'",), "nothing else changes",
           refused_to_app=PERMISSION),
    # what the application role may not even try; the migrator may, and the triggers refuse
    Attack("invoice-figures-changed",
           (f"UPDATE invoices SET subtotal = 1000000, total = 1000000 WHERE id = '{A}'",),
           "figures of invoice .* never change", refused_to_app=PERMISSION),
    Attack("invoice-line-changed",
           (f"UPDATE invoice_lines SET unit_amount = 1 WHERE invoice_id = '{C}'",),
           "figures of invoice line .* never change", refused_to_app=PERMISSION),
    Attack("invoice-deleted", (f"DELETE FROM invoice_lines WHERE invoice_id = '{C}'",
                               f"DELETE FROM invoices WHERE id = '{C}'"),
           "DELETE of invoice_lines is refused", refused_to_app=PERMISSION),
    Attack("outbox-event-rewritten",
           ("UPDATE outbox SET payload = '{}' WHERE type = 'credit_note.issued'",),
           "never changes", refused_to_app=PERMISSION),
    *(Attack(f"{table}-truncated", (f"TRUNCATE {table} CASCADE",),
             r"TRUNCATE of \w+ is refused: it holds history", refused_to_app=PERMISSION)
      for table in HISTORY),
    # 0013: the outbox's delivery state only moves forward (published now, once; parked
    # now or un-parked, while unpublished), so no event is made prunable before it is sent
    Attack("unpublished-event-published-in-the-past-then-deleted",
           ("UPDATE outbox SET published_at = now() - interval '2 days' "
            "WHERE published_at IS NULL AND parked_at IS NULL",
            "DELETE FROM outbox WHERE published_at < now() - interval '1 day'"),
           "is published now, once, and only while not parked"),
    Attack("published-event-set-back-to-unpublished",
           ("UPDATE outbox SET published_at = NULL WHERE published_at IS NOT NULL",),
           "was published: it never changes again"),
    Attack("publication-backdated-to-be-pruned",
           ("UPDATE outbox SET published_at = published_at - interval '2 days' "
            "WHERE published_at IS NOT NULL",), "was published: it never changes again"),
    Attack("published-event-parked",
           ("UPDATE outbox SET parked_at = now() WHERE published_at IS NOT NULL",),
           "was published: it never changes again"),
    Attack("parked-event-marked-published",
           ("UPDATE outbox SET published_at = now() WHERE parked_at IS NOT NULL",),
           "only while not parked"),
    Attack("parked-event-un-parked-and-published-at-once",
           ("UPDATE outbox SET parked_at = NULL, published_at = now() "
            "WHERE parked_at IS NOT NULL",), "only while not parked"),
    Attack("parking-time-rewritten",
           ("UPDATE outbox SET parked_at = parked_at - interval '1 day' "
            "WHERE parked_at IS NOT NULL",), "parked_at is never rewritten"),
    Attack("event-parked-in-the-past",
           ("UPDATE outbox SET parked_at = now() - interval '1 day' "
            "WHERE parked_at IS NULL AND published_at IS NULL",), "parked_at is never rewritten"),
    # the retention horizon (verify forgives missing events older than it) only moves
    # forward, to a day ago at most, and is kept
    Attack("retention-horizon-moved-to-infinity",
           ("INSERT INTO retention_horizons (table_name, pruned_before) VALUES ('outbox', "
            "'infinity') ON CONFLICT (table_name) DO UPDATE SET pruned_before = 'infinity'",),
           "only moves forward, to a day ago at most"),
    Attack("retention-horizon-moved-closer-than-a-day",
           ("UPDATE retention_horizons SET pruned_before = now() - interval '1 hour'",),
           "only moves forward, to a day ago at most"),
    Attack("retention-horizon-moved-back",
           ("UPDATE retention_horizons SET pruned_before = pruned_before - interval '1 day'",),
           "only moves forward, to a day ago at most"),
    Attack("retention-horizon-of-a-new-table-in-the-future",
           ("INSERT INTO retention_horizons (table_name, pruned_before) "
            "VALUES ('processed_messages', now() + interval '1 day')",),
           "only moves forward, to a day ago at most"),
    Attack("retention-horizon-deleted", ("DELETE FROM retention_horizons",),
           "DELETE of retention_horizons is refused", refused_to_app=PERMISSION),
    # a replay still 'claimed' (maybe sent) is kept, however old: the migrator and a
    # superuser may still delete it by hand (0009's manual repair)
    Attack("maybe-sent-replay-deleted",
           ("DELETE FROM dlq_replays WHERE state = 'claimed'",),
           "only retention may delete dlq_replays rows", roles=("app",)),
    # what has been credited of an invoice line is what its non-void credit notes say
    Attack("line-credits-set-back",
           ("UPDATE invoice_lines SET credited_net = 0, credited_tax = 0, "
            f"credited_quantity = 0 WHERE invoice_id IN ('{A}', '{D}')",),
           "records as credited disagrees with its credit notes"),
    Attack("line-credited-net-lowered",
           (f"UPDATE invoice_lines SET credited_net = credited_net - 1 WHERE invoice_id = '{A}'",),
           "records as credited disagrees with its credit notes"),
    Attack("line-credited-quantity-raised",
           ("UPDATE invoice_lines SET credited_quantity = credited_quantity + 1 "
            f"WHERE invoice_id = '{D}'",), "records as credited disagrees with its credit notes"),
    Attack("line-time-credits-cleared",
           (f"UPDATE invoice_lines SET time_credits = '{{}}' WHERE invoice_id = '{D}'",),
           "records as credited disagrees with its credit notes"),
    Attack("line-time-credit-counted-twice",
           ("UPDATE invoice_lines SET time_credits = time_credits || time_credits "
            f"WHERE invoice_id = '{D}'",), "records as credited disagrees with its credit notes"),
    Attack("line-time-credit-moved-later",
           ("UPDATE invoice_lines SET time_credits = ARRAY[period_end] "
            f"WHERE invoice_id = '{D}'",), "records as credited disagrees with its credit notes"),
    Attack("line-credit-method-switched",
           (f"UPDATE invoice_lines SET credit_method = 'amount' WHERE invoice_id = '{D}'",),
           "keeps its credit method while anything is credited"),
    Attack("line-credit-method-cleared",
           (f"UPDATE invoice_lines SET credit_method = NULL WHERE invoice_id = '{D}'",),
           "keeps its credit method while anything is credited"),
    Attack("line-inserted-already-credited",
           ("INSERT INTO invoice_lines (invoice_id, line_id, position, description, quantity, "
            "unit_amount, tax_rate_bps, discount, tax, credited_net) "
            f"VALUES ('{C}', 'il_9', 9, 'Extra', 1, 100, 0, 0, 0, 100)",),
           "records as credited disagrees with its credit notes"),
    Attack("void-leaving-its-lines-credited",
           (*_VOID_A1, _REVERSE_A1), f"does not record what credit note {A1} credits of it"),
    # 0016, the money loop: payments are facts, refunds move pending -> final once with
    # exactly their journal, a refund id is used once, the counters follow the rows
    Attack("payment-applied-rewritten",
           (f"UPDATE payments SET applied = 0 WHERE invoice_id = '{C}'",),
           "payments rows are append-only", refused_to_app=PERMISSION),
    Attack("payment-deleted", (f"DELETE FROM payments WHERE invoice_id = '{C}'",),
           "payments rows are append-only", refused_to_app=PERMISSION),
    Attack("amount-paid-raised-without-a-payment",
           (f"UPDATE invoices SET amount_paid = amount_paid + 1 WHERE id = '{C}'",),
           f"amount_paid of invoice {C} disagrees with its payments"),
    Attack("pending-refund-marked-succeeded-without-its-journal",
           ("UPDATE refunds SET status = 'succeeded', outcome_source = '/attacker',"
            " outcome_id = 'forged', outcome_type = 'refund.succeeded', outcome_at = now()"
            " WHERE status = 'pending'",), "succeeded without exactly its journal"),
    Attack("linked-refund-marked-failed",
           ("UPDATE refunds SET status = 'failed', resettled_to = 'none', outcome_source = '/a',"
            " outcome_id = 'x', outcome_at = now() WHERE refund_id = 're_b'",),
           "an outcome is final"),
    Attack("refund-amount-rewritten", ("UPDATE refunds SET amount = 1 WHERE linked",),
           "the figures of refund re_b never change", refused_to_app=PERMISSION),
    Attack("refund-deleted", ("DELETE FROM refunds",), "DELETE of refunds is refused",
           refused_to_app=PERMISSION),
    Attack("refund-journal-added-to-a-settled-refund",
           ("INSERT INTO refund_journal_lines (refund_id, position, account, debit, credit,"
            " effective_at) VALUES ('re_b', 5, 'cash', 50, 0, now()),"
            " ('re_b', 6, 'refunds_payable', 0, 50, now())",),
           "written only by the outcome of refund re_b"),
    Attack("refund-journal-rewritten",
           ("UPDATE refund_journal_lines SET debit = debit + 1, credit = credit + 1",),
           "refund_journal_lines rows are append-only", refused_to_app=PERMISSION),
    Attack("refund-added-to-a-posted-credit-note",
           ("INSERT INTO refunds (refund_id, invoice_id, payment_sequence, credit_note_id,"
            f" amount, status) SELECT 'rf_new', '{B}', 0, {_note(B1)}, 1, 'pending'",
            f"UPDATE invoices SET refunded = refunded + 1 WHERE id = '{B}'"),
           "is posted: no refund can be added"),
    Attack("refunded-set-back", (f"UPDATE invoices SET refunded = 0 WHERE id = '{B}'",),
           "never decrease"),
    Attack("refunded-raised-without-a-refund",
           (f"UPDATE invoices SET refunded = refunded + 1 WHERE id = '{B}'",),
           f"refunded amounts of invoice {B} disagree with its refunds"),
    Attack("refunded-note-voided",
           (f"UPDATE credit_notes SET status = 'void', voided_at = now(), voided_by_source = '/a',"
            f" voided_by_id = 'x' WHERE number = '{B1}'",), "has refunds: it cannot be voided"),
    Attack("effective-date-rewritten",
           (f"UPDATE credit_notes SET effective_at = now() - interval '1 year'"
            f" WHERE number = '{A1}'",),
           "an issued credit note cannot change", refused_to_app=PERMISSION),
    Attack("credit-note-edit-rewritten",
           ("UPDATE credit_note_updates SET memo = 'forged'",),
           "credit_note_updates rows are append-only", refused_to_app=PERMISSION),
]


@pytest.mark.parametrize("role", ROLES)
async def test_every_attack_on_history_is_refused_and_history_is_unchanged(
        ledger: Roles, role: str) -> None:
    before = await _history(ledger.superuser)
    wrong = {}
    for attack in ATTACKS:
        if role not in attack.roles:
            continue
        expected = (attack.refused_to_app or attack.refused) if role == "app" else attack.refused
        error = await _attempt(ledger.url(role), attack.statements)
        if error is None or not re.search(expected, error):
            wrong[attack.name] = error or "committed"

    assert wrong == {}
    assert await _history(ledger.superuser) == before


async def test_the_claim_statement_still_re_claims_a_released_key(ledger: Roles) -> None:
    # the legal path the ledger fixture took for 'early', here in plain SQL as the app role
    claim = ("INSERT INTO processed_messages (source, id, type, topic, outcome) VALUES "
             "('/tests', 'late', 'credit_note.issue', 'x', 'applied') ON CONFLICT (source, id) "
             "DO UPDATE SET outcome = 'applied', processed_at = now() "
             "WHERE processed_messages.outcome LIKE 'released:%'")
    again = "UPDATE processed_messages SET outcome = 'released:invoice_not_found' WHERE id = 'late'"

    assert await _attempt(ledger.app, (claim, again)) is None
    assert await _attempt(ledger.app, (claim,)) is None

    connection = await asyncpg.connect(ledger.superuser)
    try:
        assert await connection.fetchval(
            "SELECT outcome FROM processed_messages WHERE id = 'late'") == "applied"
    finally:
        await connection.close()



async def test_what_the_service_writes_by_hand_still_commits_as_the_application_role(
        ledger: Roles) -> None:
    """The legal paths of 0013's guards, in plain SQL as the application role: the relay
    publishes and parks, `outbox retry` un-parks, retention moves its horizon and deletes a
    day-old sent replay, a void takes its lines back (verify agrees)."""
    steps = {
        "publish": (f"UPDATE outbox SET published_at = now() WHERE key IN ('in_9009', '{B}')"
                    " AND published_at IS NULL AND parked_at IS NULL",),
        "retry": ("UPDATE outbox SET parked_at = NULL, park_error = NULL"
                  " WHERE parked_at IS NOT NULL",),
        "park again, and hold the later row": (
            f"UPDATE outbox SET parked_at = now(), park_error = 'too large' WHERE key = '{D}'"
            " AND published_at IS NULL",),
        "retry and publish": ("UPDATE outbox SET parked_at = NULL, park_error = NULL"
                              " WHERE parked_at IS NOT NULL",
                              f"UPDATE outbox SET published_at = now() WHERE key = '{D}'"),
        "move the horizon": (
            "INSERT INTO retention_horizons (table_name, pruned_before) VALUES ('outbox', "
            "now() - interval '1 day') ON CONFLICT (table_name) DO UPDATE SET pruned_before"
            " = greatest(retention_horizons.pruned_before, EXCLUDED.pruned_before),"
            " updated_at = now()",),
        "keep the horizon": (
            "INSERT INTO retention_horizons (table_name, pruned_before) VALUES ('outbox', "
            "now() - interval '30 days') ON CONFLICT (table_name) DO UPDATE SET pruned_before"
            " = greatest(retention_horizons.pruned_before, EXCLUDED.pruned_before)",),
        "prune the sent replay": ("DELETE FROM dlq_replays WHERE state = 'sent'",),
        "void with its lines taken back": (*_VOID_A1, _REVERSE_A1, _TAKE_BACK_A1),
    }
    failed = {name: error for name, statements in steps.items()
              if (error := await _attempt(ledger.app, statements)) is not None}

    assert failed == {}
    connection = await asyncpg.connect(ledger.superuser)
    try:
        assert await connection.fetchval(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL OR parked_at IS NOT NULL") == 0
        assert await connection.fetchval(
            "SELECT array_agg(state) FROM dlq_replays") == ["claimed"]
    finally:
        await connection.close()
    lines = [v for v in await check_invariants(ledger.superuser) if v.invariant.startswith("line")]
    assert lines == []


# ------------------------------------------------------ invoices: the status and the money


STATUSES = ("open", "paid", "uncollectible", "void")
EDGES = {("open", "paid"), ("open", "uncollectible"), ("open", "void"),
         ("uncollectible", "void"), ("uncollectible", "paid")}
_INSERT_INVOICE = (
    "INSERT INTO invoices (id, number, customer_id, currency, status, subtotal, discount, tax, "
    "total, customer_balance_applied, amount_paid) "
    "VALUES ($1, 'ACME-1', 'cus_42', 'usd', $2, 10000, 0, 0, 10000, 0, $3)")
_INSERT_PAYMENT = (
    "INSERT INTO payments (invoice_id, sequence, amount, applied, trigger_id, trigger_source) "
    "VALUES ($1, $2, $3, $3, $4, CASE WHEN $4::text IS NULL THEN NULL ELSE '/tests' END)")


async def test_an_invoice_status_moves_only_along_its_edges(roles: Roles) -> None:
    app = await asyncpg.connect(roles.app)
    moved = set()
    try:
        for before, after in product(STATUSES, STATUSES):
            invoice_id = f"in_{before}_{after}"
            await app.execute(_INSERT_INVOICE, invoice_id, before, 0)
            error = await _attempt(roles.app, (
                f"UPDATE invoices SET status = '{after}' WHERE id = '{invoice_id}'",))
            if error is None:
                moved.add((before, after))
            else:
                assert f"cannot go from {before} to {after}" in error
    finally:
        await app.close()

    assert moved == EDGES | {(status, status) for status in STATUSES}


@hypothesis_settings(max_examples=25, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.integers(min_value=0, max_value=10_000),
       after=st.integers(min_value=0, max_value=10_000))
def test_amount_paid_never_decreases(roles: Roles, before: int, after: int) -> None:
    async def example() -> None:
        app = await asyncpg.connect(roles.app)
        try:
            invoice_id = f"in_{uuid.uuid4().hex[:12]}"
            async with app.transaction():  # amount_paid is what its payments applied (0016)
                await app.execute(_INSERT_INVOICE, invoice_id, "open", before)
                if before:
                    await app.execute(_INSERT_PAYMENT, invoice_id, 0, before, None)
            paid_more = (f"INSERT INTO payments (invoice_id, sequence, amount, applied,"
                         f" trigger_source, trigger_id) VALUES ('{invoice_id}', 1, {after - before},"
                         f" {after - before}, '/tests', 'pay-{invoice_id}')",)
            error = await _attempt(roles.app, (*(paid_more if after > before else ()),
                f"UPDATE invoices SET amount_paid = {after} WHERE id = '{invoice_id}'"))
            assert (error is None) == (after >= before)
            assert error is None or "never decrease" in error
            paid = await app.fetchval("SELECT amount_paid FROM invoices WHERE id = $1", invoice_id)
            assert paid == (after if after >= before else before)
        finally:
            await app.close()

    _run(example)


def _run(example: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = asyncio.new_event_loop()  # its own loop: the session's is not running here
    try:
        loop.run_until_complete(example())
    finally:
        loop.close()


# ------------------------------------------- finding 3: temporary tables and the search_path


async def test_the_application_role_and_public_cannot_create_temporary_tables(
        roles: Roles) -> None:
    for role in ("app", "nobody"):
        error = await _attempt(roles.url(role),
                               ("CREATE TEMPORARY TABLE invoices (LIKE public.invoices)",))
        assert error is not None and "permission denied" in error, role


# the attack of finding 3: shadow the tables the invariant triggers read
_SHADOWS = ("CREATE TEMPORARY TABLE invoices (LIKE public.invoices)",
            "CREATE TEMPORARY TABLE credit_notes (LIKE public.credit_notes)",
            "CREATE TEMPORARY TABLE journal_lines (LIKE public.journal_lines)",
            "INSERT INTO pg_temp.invoices SELECT * FROM public.invoices",
            "UPDATE pg_temp.invoices SET subtotal = 1000000000, total = 1000000000, "
            "pre_payment_credited = 0, post_payment_credited = 0")


def _forged_note(number: str, total: int) -> str:
    return ("INSERT INTO public.credit_notes (id, invoice_id, sequence, number, customer_id, "
            "currency, status, reason, subtotal, tax, total, pre_payment_amount, refund_amount, "
            "credit_amount, out_of_band_amount, trigger_source, trigger_id, trigger_type) "
            f"VALUES ('cn_{number}', '{A}', {int(number[-2:])}, '{number}', 'cus_42', 'usd', "
            f"'issued', 'other', {total}, 0, {total}, {total}, 0, 0, 0, '/attacker', "
            f"'{number}', 'credit_note.issue')")


@pytest.mark.parametrize("role", ["migrator", "superuser"])  # the roles that may create them
async def test_temporary_tables_named_like_the_real_ones_do_not_fool_the_triggers(
        ledger: Roles, role: str) -> None:
    before = await _history(ledger.superuser)
    over_credit = (*_SHADOWS, _forged_note("ACME-1001-CN-08", 50_000))
    unbalanced = (*_SHADOWS, _forged_note("ACME-1001-CN-09", 1_000),
                  f"UPDATE public.invoices SET pre_payment_credited = pre_payment_credited + 1000, "
                  f"credit_note_count = 9 WHERE id = '{A}'",
                  "INSERT INTO public.journal_lines (credit_note_id, entry, position, account, "
                  "debit, credit) VALUES ('cn_ACME-1001-CN-09', 'issue', 0, 'contra_revenue', "
                  "1000, 0), ('cn_ACME-1001-CN-09', 'issue', 1, 'accounts_receivable', 0, 1)")

    over = await _attempt(ledger.url(role), over_credit)
    off = await _attempt(ledger.url(role), unbalanced)

    assert over is not None and "credit notes of invoice in_1001 exceed its total" in over
    assert off is not None and "does not balance" in off
    assert await _history(ledger.superuser) == before


async def test_every_function_in_the_schema_has_a_fixed_search_path(database_url: str) -> None:
    # A later migration's function must say SET search_path = pg_catalog, public, pg_temp:
    # without pg_temp listed last, PostgreSQL searches pg_temp FIRST for tables.
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            """
            SELECT p.oid::regprocedure::text AS name, coalesce(p.proconfig, '{}') AS config
              FROM pg_proc AS p
             WHERE p.pronamespace = 'public'::regnamespace AND p.prokind IN ('f', 'p')
               AND NOT EXISTS (SELECT FROM pg_depend AS d
                                WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                  AND d.deptype = 'e')
            """)
    finally:
        await connection.close()

    assert len(rows) >= 10
    unpinned = [row["name"] for row in rows
                if "search_path=pg_catalog, public, pg_temp" not in row["config"]]
    assert unpinned == []


def test_attack_names_are_unique() -> None:
    names = [attack.name for attack in ATTACKS]
    assert len(names) == len(set(names))
