"""Retention on a real PostgreSQL: what is eligible goes, nothing else ever does, as the app role.

Old rows are written by the admin with their times set in the past; pruning
runs as a login user that is a member of ``creditnotes_app`` only, as the
service does in production.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.adapters.invariants import check_invariants
from service.adapters.retention import LOCK_KEY, Policy, RetentionTask, prune_if_leader
from service.settings import Settings
from tests.integration.test_health_and_shutdown import http_get
from tests.support import (
    Kafka,
    RunningService,
    cloudevent,
    creditnotes,
    fetch,
    fetchrow,
    invoice_data,
)

pytestmark = pytest.mark.integration

POLICY = Policy(processed_messages_days=3, outbox_days=2, dlq_replays_days=4, batch_size=2,
                pause_seconds=0)


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@pytest.fixture
async def app_url(database_url: str) -> AsyncIterator[str]:
    """A login user that is a member of creditnotes_app and nothing else."""
    user = f"cn_app_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE ROLE "{user}" LOGIN IN ROLE creditnotes_app')
        yield as_user(database_url, user)
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{user}"')
        await admin.close()


# ------------------------------------------------------------------------- seeding old rows


@dataclass(frozen=True)
class Row:
    table: str  # outbox | processed_messages | dlq_replays
    age_hours: int
    state: str  # outbox: published | unpublished | parked; processed_messages: the type's
    #             kind (payment | other) and outcome; dlq_replays: sent | claimed
    name: str = ""

    def eligible(self, policy: Policy) -> bool:
        if self.table == "outbox":
            return self.state == "published" and self.age_hours >= policy.outbox_days * 24
        if self.table == "processed_messages":
            return (not self.state.startswith("payment")
                    and self.age_hours >= policy.processed_messages_days * 24)
        return self.state == "sent" and self.age_hours >= policy.dlq_replays_days * 24


async def seed(connection: asyncpg.Connection, rows: list[Row]) -> None:
    """Write ``rows`` as they would look after ``age_hours`` (the admin may set any time)."""
    for row in rows:
        at = f"now() - interval '{row.age_hours} hours'"
        if row.table == "outbox":
            published = at if row.state == "published" else "NULL"
            parked = at if row.state == "parked" else "NULL"
            await connection.execute(
                "INSERT INTO outbox (event_id, topic, key, type, payload, created_at,"
                f" published_at, parked_at) VALUES ($1, 'credit-note-events', 'in_1',"
                f" 'credit_note.rejected', '{{}}', {at}, {published}, {parked})", row.name)
        elif row.table == "processed_messages":
            type_ = ("invoice.payment_succeeded" if row.state.startswith("payment")
                     else "credit_note.issue")
            outcome = row.state.split(":", 1)[1]
            await connection.execute(
                "INSERT INTO processed_messages (source, id, type, topic, outcome, processed_at)"
                f" VALUES ('/tests', $1, $2, 'in', $3, {at})", row.name, type_, outcome)
        else:
            await connection.execute(
                "INSERT INTO dlq_replays (dlq_topic, dlq_partition, dlq_offset, original_topic,"
                " replay_run, replayed_by, replayed_at, dead_letter_digest, state)"
                f" VALUES ('in.dlq', 0, 0, 'in', 'run', 'ops', {at}, $1, $2)",
                row.name, row.state)


async def remaining(connection: asyncpg.Connection) -> set[str]:
    found = await connection.fetch(
        "SELECT event_id AS name FROM outbox UNION ALL SELECT id FROM processed_messages"
        " UNION ALL SELECT dead_letter_digest FROM dlq_replays")
    return {row["name"] for row in found}


STATES = {
    "outbox": ["published", "unpublished", "parked"],
    "processed_messages": ["other:applied", "other:rejected:exceeds_remaining",
                           "other:released:invoice_not_found",
                           "other:dead_lettered:invoice_not_found", "payment:applied",
                           "payment:rejected:payment_refused"],
    "dlq_replays": ["sent", "claimed"],
}
rows_strategy = st.lists(
    st.sampled_from(sorted(STATES)).flatmap(lambda table: st.builds(
        Row, st.just(table), st.integers(min_value=0, max_value=24 * 200),
        st.sampled_from(STATES[table]))),
    max_size=25)


# ------------------------------------------------------------------- what goes, what stays


@hypothesis_settings(max_examples=30, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_strategy, batch_size=st.integers(min_value=1, max_value=6))
def test_prune_deletes_exactly_the_eligible_rows_as_the_application_role(
        database_url: str, app_url: str, rows: list[Row], batch_size: int) -> None:
    named = [Row(row.table, row.age_hours, row.state, f"r{n}") for n, row in enumerate(rows)]
    policy = Policy(processed_messages_days=3, outbox_days=2, dlq_replays_days=4,
                    batch_size=batch_size, pause_seconds=0)

    async def example() -> None:
        admin = await asyncpg.connect(database_url)
        app = await asyncpg.connect(app_url)
        try:
            # the admin may delete anything (TRUNCATE is refused to everyone: 0011)
            await admin.execute("DELETE FROM outbox; DELETE FROM processed_messages;"
                                " DELETE FROM dlq_replays")
            await seed(admin, named)
            results = await prune_if_leader(app, policy)
            assert results is not None
            expected = {row.name for row in named if not row.eligible(policy)}
            assert await remaining(admin) == expected
            deleted = {result.table: result.rows for result in results}
            for table in STATES:
                assert deleted[table] == sum(
                    1 for row in named if row.table == table and row.eligible(policy))
        finally:
            await app.close()
            await admin.close()

    loop = asyncio.new_event_loop()  # its own loop: the session's is not running here
    try:
        loop.run_until_complete(example())
    finally:
        loop.close()


async def test_the_database_refuses_the_application_role_any_ineligible_delete(
        database_url: str, app_url: str) -> None:
    admin = await asyncpg.connect(database_url)
    app = await asyncpg.connect(app_url)
    try:
        await seed(admin, [
            Row("outbox", 24 * 30, "unpublished", "old-unpublished"),
            Row("outbox", 24 * 30, "parked", "old-parked"),
            Row("outbox", 12, "published", "published-hours-ago"),
            Row("processed_messages", 24 * 400, "payment:applied", "old-payment"),
            Row("processed_messages", 12, "other:applied", "key-hours-ago"),
            Row("dlq_replays", 12, "sent", "replay-hours-ago"),
        ])
        for statement in ("DELETE FROM outbox", "DELETE FROM processed_messages",
                          "DELETE FROM dlq_replays", "DELETE FROM outbox WHERE published_at"
                          " IS NULL", "DELETE FROM processed_messages WHERE type ="
                          " 'invoice.payment_succeeded'"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute(statement)
        # the guard binds whatever the settings say: even a zero-day policy keeps them
        await seed(admin, [Row("outbox", 24 * 30, "published", "old-published")])
        await app.execute("DELETE FROM outbox WHERE event_id = 'old-published'")
        assert await remaining(admin) == {"old-unpublished", "old-parked", "published-hours-ago",
                                          "old-payment", "key-hours-ago", "replay-hours-ago"}
    finally:
        await app.close()
        await admin.close()


async def test_only_one_prunes_at_a_time_and_the_command_says_so(
        settings: Settings, database_url: str) -> None:
    admin = await asyncpg.connect(database_url)
    other = await asyncpg.connect(database_url)
    try:
        await seed(admin, [Row("outbox", 24 * 30, "published", "old")])
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY)
        assert await prune_if_leader(admin, POLICY) is None
        busy = await creditnotes(settings, "prune")
        assert busy.returncode == 1 and "another replica is pruning" in busy.stdout
        assert await remaining(admin) == {"old"}
    finally:
        await other.close()  # its lock goes with it
        await admin.close()

    dry = await creditnotes(settings, "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "outbox: would delete 1 published outbox rows older than" in dry.stdout
    assert await fetchrow(settings, "SELECT 1 FROM outbox") is not None
    done = await creditnotes(settings, "prune")
    assert done.returncode == 0, done.stderr
    assert "outbox: deleted 1 published outbox rows" in done.stdout
    assert "processed_messages: deleted 0 processed-message keys" in done.stdout
    assert "dlq_replays: deleted 0 replay audit rows" in done.stdout
    assert await fetchrow(settings, "SELECT 1 FROM outbox") is None


async def test_a_failed_prune_is_reported_and_the_next_run_works(
        database_url: str, app_url: str) -> None:
    pool = await asyncpg.create_pool(app_url, min_size=1, max_size=2)
    admin = await asyncpg.connect(database_url)
    runs: list[str] = []
    try:
        await seed(admin, [Row("outbox", 24 * 30, "published", "old")])
        task = RetentionTask(pool, POLICY, 3600, on_run=runs.append)
        await admin.execute("REVOKE DELETE ON outbox FROM creditnotes_app")
        assert await task.run_once() == "failed"
        await admin.execute("GRANT DELETE ON outbox TO creditnotes_app")
        assert await task.run_once() == "completed"
        assert runs == ["failed", "completed"]
        assert await remaining(admin) == set()
    finally:
        await admin.close()
        await pool.close()


# -------------------------------------------------------------- the window, through the service


async def age_ledger(settings: Settings, event_id: str, days: float) -> None:
    admin = await asyncpg.connect(settings.database_url)
    try:
        async with admin.transaction():  # past the ledger's triggers, as a restore would
            await admin.execute("SET LOCAL session_replication_role = replica")
            await admin.execute("UPDATE processed_messages SET processed_at = now() - $2::interval"
                                " WHERE id = $1", event_id, timedelta(days=days))
    finally:
        await admin.close()


async def test_inside_the_window_a_duplicate_is_still_a_duplicate_and_payments_stay_for_ever(
        settings: Settings, app_url: str, kafka: Kafka) -> None:
    as_app = settings.model_copy(update={"database_url": app_url,
                                         "retention_interval_seconds": 0.2})
    issue = cloudevent("credit_note.issue", {"invoice_id": "in_1001", "amount": 1_000},
                       id_="cmd-1")
    payment = cloudevent("invoice.payment_succeeded",
                         {"invoice_id": "in_1001", "amount": 5_000, "currency": "usd"},
                         id_="pay-1")
    async with RunningService(as_app) as running:
        await kafka.publish(settings.topics.invoices, cloudevent(
            "invoice.finalized", invoice_data("in_1001"), id_="fin-1"))
        await kafka.publish(settings.topics.credit_note_commands, issue)
        await kafka.publish(settings.topics.invoices, payment)
        await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
        while await fetchrow(settings, "SELECT 1 FROM invoices WHERE amount_paid > 0") is None:
            await kafka.settle(0.1)
        # a day inside the 30-day window; the payment and the invoice far outside it
        await age_ledger(settings, "cmd-1", 29)
        await age_ledger(settings, "pay-1", 400)
        await age_ledger(settings, "fin-1", 31)
        await wait_for_runs(running, more_than=await completed_runs(running))
        assert await fetchrow(settings, "SELECT 1 FROM processed_messages"
                                        " WHERE id = 'fin-1'") is None
        await kafka.publish(settings.topics.credit_note_commands, issue)
        await kafka.publish(settings.topics.invoices, payment)
        await kafka.settle(2.0)

    assert len(kafka.on(settings.topics.credit_note_events, "credit_note.issued")) == 1
    invoice = await fetchrow(settings, "SELECT amount_paid FROM invoices")
    assert invoice is not None and invoice["amount_paid"] == 5_000
    kept = await fetch(settings, "SELECT id FROM processed_messages ORDER BY id")
    assert {row["id"] for row in kept} == {"cmd-1", "pay-1"}


async def scrape(running: RunningService) -> str:
    service = running.service
    port = service.metrics_port or service.http_port
    assert port is not None
    _, body = await http_get(port, "/metrics")
    return body


async def completed_runs(running: RunningService) -> float:
    for line in (await scrape(running)).splitlines():
        if line.startswith('creditnotes_retention_runs_total{result="completed"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def wait_for_runs(running: RunningService, more_than: float = 0,
                        timeout_s: float = 20) -> str:
    """Wait until the service's /metrics counts more completed retention runs than given."""
    deadline = time.monotonic() + timeout_s
    while await completed_runs(running) <= more_than:
        assert time.monotonic() < deadline, "retention did not run in the service"
        await asyncio.sleep(0.2)
    return await scrape(running)


async def test_the_service_prunes_periodically_and_verify_stays_clean(
        settings: Settings, app_url: str, kafka: Kafka) -> None:
    as_app = settings.model_copy(update={"database_url": app_url,
                                         "retention_interval_seconds": 0.2})
    async with RunningService(as_app):
        await kafka.publish(settings.topics.invoices,
                            cloudevent("invoice.finalized", invoice_data("in_1001")))
        for n in (1, 2):
            await kafka.publish(settings.topics.credit_note_commands, cloudevent(
                "credit_note.issue", {"invoice_id": "in_1001", "amount": 1_000}, id_=f"c{n}"))
        issued = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued", 2)
        await kafka.publish(settings.topics.credit_note_commands, cloudevent(
            "credit_note.void", {"credit_note_id": issued[0].event["data"]["id"]}),
            key="in_1001")
        await kafka.expect(settings.topics.credit_note_events, "credit_note.voided")
        while await fetchrow(settings, "SELECT 1 FROM outbox WHERE published_at IS NULL"):
            await kafka.settle(0.1)

    # everything written 10 days ago: the credit notes (bypassing their immutability
    # trigger, as a restore would), their outbox rows and ledger keys
    admin = await asyncpg.connect(settings.database_url)
    try:
        async with admin.transaction():
            await admin.execute("SET LOCAL session_replication_role = replica")
            await admin.execute("UPDATE credit_notes SET issued_at = issued_at - interval '10 days',"
                                " voided_at = voided_at - interval '10 days'")
            await admin.execute("UPDATE outbox SET created_at = created_at - interval '10 days',"
                                " published_at = published_at - interval '10 days'")
            await admin.execute("UPDATE processed_messages"
                                " SET processed_at = processed_at - interval '40 days'")
    finally:
        await admin.close()

    async with RunningService(as_app) as running:
        body = await wait_for_runs(running)
    assert 'creditnotes_retention_pruned_rows_total{table="outbox"}' in body
    assert await fetch(settings, "SELECT 1 FROM outbox") == []
    assert await fetch(settings, "SELECT 1 FROM processed_messages") == []
    assert await check_invariants(settings.database_url) == []

    # a newer event that goes missing is still a violation
    async with RunningService(settings):
        await kafka.publish(settings.topics.credit_note_commands, cloudevent(
            "credit_note.issue", {"invoice_id": "in_1001", "amount": 1_000}, id_="c3"))
        await kafka.expect(settings.topics.credit_note_events, "credit_note.issued", 3)
    admin = await asyncpg.connect(settings.database_url)
    try:
        await admin.execute("DELETE FROM outbox")  # the admin may; the app role may not
    finally:
        await admin.close()
    assert [v.invariant for v in await check_invariants(settings.database_url)] == [
        "issued_event_missing"]


async def test_after_the_window_a_credit_trigger_still_has_no_second_credit_note(
        settings: Settings, app_url: str, kafka: Kafka) -> None:
    """Its key pruned, the replayed trigger is still a duplicate: its credit note names it."""
    as_app = settings.model_copy(update={"database_url": app_url,
                                         "retention_interval_seconds": 0.2})
    issue = cloudevent("credit_note.issue", {"invoice_id": "in_1001", "amount": 1_000},
                       id_="cmd-old")
    async with RunningService(as_app) as running:
        await kafka.publish(settings.topics.invoices,
                            cloudevent("invoice.finalized", invoice_data("in_1001")))
        await kafka.publish(settings.topics.credit_note_commands, issue)
        await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
        await age_ledger(settings, "cmd-old", 31)
        await wait_for_runs(running, more_than=await completed_runs(running))
        assert await fetchrow(settings, "SELECT 1 FROM processed_messages"
                                        " WHERE id = 'cmd-old'") is None
        await kafka.publish(settings.topics.credit_note_commands, issue)
        await kafka.publish(settings.topics.credit_note_commands, cloudevent(
            "credit_note.issue", {"invoice_id": "in_1001", "amount": 500}, id_="cmd-new"))
        await kafka.expect(settings.topics.credit_note_events, "credit_note.issued", 2)
        await kafka.settle(1.0)

    assert kafka.on(f"{settings.topics.credit_note_commands}.dlq") == []
    issued = kafka.on(settings.topics.credit_note_events, "credit_note.issued")
    assert sorted(record.event["data"]["trigger"]["id"] for record in issued) == [
        "cmd-new", "cmd-old"]
    notes = await fetch(settings, "SELECT trigger_id FROM credit_notes ORDER BY trigger_id")
    assert [row["trigger_id"] for row in notes] == ["cmd-new", "cmd-old"]
