"""PostgreSQL roles: the application role can run the service and cannot rewrite history."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.settings import Settings
from tests.support import Kafka, RunningService, cloudevent, fetchrow, invoice_data

pytestmark = pytest.mark.integration


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@pytest.fixture
async def app_url(settings: Settings) -> AsyncIterator[str]:
    """A login user that is a member of creditnotes_app and nothing else."""
    user = f"cn_app_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(settings.database_url)
    try:
        await admin.execute(f'CREATE ROLE "{user}" LOGIN IN ROLE creditnotes_app')
        yield as_user(settings.database_url, user)
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{user}"')
        await admin.close()


async def test_the_service_runs_end_to_end_as_the_application_role(
        settings: Settings, app_url: str, kafka: Kafka) -> None:
    as_app = settings.model_copy(update={"database_url": app_url})
    async with RunningService(as_app):
        await kafka.publish(settings.topics.invoices,
                            cloudevent("invoice.finalized", invoice_data("in_1001")))
        await kafka.publish(settings.topics.credit_note_commands, cloudevent(
            "credit_note.issue", {"invoice_id": "in_1001", "amount": 1_000}))
        [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
        await kafka.publish(settings.topics.credit_note_commands, cloudevent(
            "credit_note.void", {"credit_note_id": issued.event["data"]["id"]}), key="in_1001")
        await kafka.expect(settings.topics.credit_note_events, "credit_note.voided")
    row = await fetchrow(settings, "SELECT status FROM credit_notes")
    assert row is not None and row["status"] == "void"
    unpublished = await fetchrow(settings, "SELECT count(*) AS n FROM outbox "
                                           "WHERE published_at IS NULL")
    assert unpublished is not None and unpublished["n"] == 0


async def test_the_application_role_cannot_rewrite_or_delete_issued_credit_notes(
        settings: Settings, app_url: str, kafka: Kafka) -> None:
    async with RunningService(settings):
        await kafka.publish(settings.topics.invoices,
                            cloudevent("invoice.finalized", invoice_data("in_1001")))
        await kafka.publish(settings.topics.credit_note_commands, cloudevent(
            "credit_note.issue", {"invoice_id": "in_1001", "amount": 1_000}))
        await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")

    app = await asyncpg.connect(app_url)
    try:
        for statement in ("UPDATE credit_notes SET total = 1, subtotal = 1",
                          "UPDATE credit_note_lines SET net = 0",
                          "UPDATE journal_lines SET debit = 0",
                          "DELETE FROM credit_notes",
                          "DELETE FROM processed_messages",
                          "DELETE FROM outbox",
                          "UPDATE invoices SET total = 0",
                          "CREATE TABLE sneaky (id int)",
                          "CREATE TEMPORARY TABLE invoices (id text)",
                          "DROP TABLE outbox"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute(statement)
        async with app.transaction():  # an edit is recorded with it (migration 0016)
            await app.execute(
                "INSERT INTO credit_note_updates (credit_note_id, trigger_source, trigger_id,"
                " memo, metadata) SELECT id, '/tests', 'upd-1', 'goodwill', '{\"ticket\": \"7\"}'"
                " FROM credit_notes")
            await app.execute(
                "UPDATE credit_notes SET memo = 'goodwill', metadata = '{\"ticket\": \"7\"}'")
    finally:
        await app.close()
    row = await fetchrow(settings, "SELECT memo, total FROM credit_notes")
    assert row is not None
    assert (row["memo"], row["total"]) == ("goodwill", 1_000)


async def test_as_the_application_role_a_dead_letter_gives_its_key_back_for_a_replay(
        settings: Settings, app_url: str, kafka: Kafka) -> None:
    as_app = settings.model_copy(update={"database_url": app_url})
    early = cloudevent("credit_note.issue", {"invoice_id": "in_1001", "amount": 1_000},
                       id_="early")
    async with RunningService(as_app):
        await kafka.publish(settings.topics.credit_note_commands, early)
        [dead] = await kafka.expect(f"{settings.topics.credit_note_commands}.dlq", timeout_s=30)
        assert dead.headers["dlq.error.reason"] == b"invoice_not_found"
        ledger = await fetchrow(settings, "SELECT outcome FROM processed_messages"
                                          " WHERE id = 'early'")
        assert ledger is not None and ledger["outcome"] == "dead_lettered:invoice_not_found"

        await kafka.publish(settings.topics.invoices,
                            cloudevent("invoice.finalized", invoice_data("in_1001")))
        await kafka.publish(settings.topics.credit_note_commands, dead.value or b"",
                            key="in_1001")
        [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    assert issued.event["data"]["trigger"]["id"] == "early"
    ledger = await fetchrow(settings, "SELECT outcome FROM processed_messages WHERE id = 'early'")
    assert ledger is not None and ledger["outcome"] == "applied"
