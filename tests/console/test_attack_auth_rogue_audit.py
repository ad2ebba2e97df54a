"""Attack (/work/notes/attack-crash): a rogue session of the application role against the
console's append-only tables. It could finish a published command's pending row as
'refused:<code>' (freeing the (actor, key) slot for a second command under the same key)
and choose ids (OVERRIDING SYSTEM VALUE on console_audit, an explicit id on verify_runs:
history re-ordered, the next real verify run unrecordable). Ids now come from the
sequences only, through the insert triggers, whatever the statement's shape."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from service.adapters import console_audit
from service.settings import Settings

pytestmark = pytest.mark.integration

HOLDS = [
    "UPDATE console_audit SET actor = 'someone' WHERE id = $1",
    "UPDATE console_audit SET outcome = 'rejected' WHERE id = $2",  # a second outcome
    "UPDATE console_audit SET outcome = 'pending' WHERE id = $1",
    "UPDATE console_audit SET id = -5 WHERE id = $1",
    "DELETE FROM console_audit WHERE id = $1",
    "TRUNCATE console_audit",
    "ALTER TABLE console_audit DISABLE TRIGGER ALL",
    "SET session_replication_role = replica",
    "UPDATE verify_runs SET violations = 0",
    "DELETE FROM verify_runs",
    "TRUNCATE verify_runs",
    "SELECT setval('verify_runs_id_seq', 1)",
    "SELECT setval('console_audit_id_seq', 1)",
    "LOCK TABLE console_audit IN ACCESS EXCLUSIVE MODE",
    # a pending row ends as what became of its command, never as a refusal
    "UPDATE console_audit SET outcome = 'refused:forbidden' WHERE id = $1",
    "UPDATE console_audit SET outcome = 'refused:x' WHERE id = $1",
    # ids: from the sequence only, whatever the statement
    "INSERT INTO console_audit (id, actor, role, via, action, outcome) "
    "OVERRIDING SYSTEM VALUE VALUES (-1, 'otto', 'operator', 'token', 'void', 'applied')",
    "INSERT INTO console_audit (id, actor, role, via, action, outcome) "
    "VALUES (1000000, 'otto', 'operator', 'token', 'void', 'applied')",
    "INSERT INTO console_audit (id, actor, role, via, action, outcome) "
    "SELECT id + 1000, actor, role, via, action, 'applied' FROM console_audit",
    "INSERT INTO verify_runs (id, started_at, violations, ran_by) "
    "VALUES (1000000, '2000-01-01', 0, 'creditnotes verify')",
    "INSERT INTO verify_runs (id, started_at, violations, ran_by) OVERRIDING SYSTEM VALUE "
    "VALUES (1000001, '2000-01-01', 0, 'creditnotes verify')",
    # sessions: only ever ended, once
    "UPDATE console_sessions SET ended_at = NULL",
    "UPDATE console_sessions SET expires_at = now() + interval '1 year'",
    "DELETE FROM console_sessions",
    "TRUNCATE console_sessions",
]


async def as_app(connection: asyncpg.Connection, statement: str, *args: object) -> str | None:
    """The error the app role meets, or None when the statement went through."""
    try:
        async with connection.transaction():
            await connection.execute("SET LOCAL ROLE creditnotes_app")
            await connection.execute(statement, *args)
    except asyncpg.PostgresError as error:
        return type(error).__name__
    return None


async def test_the_app_role_cannot_rewrite_the_console_audit_verify_runs_or_sessions(
        settings: Settings) -> None:
    connection = await asyncpg.connect(settings.database_url)
    try:
        pending = await connection.fetchval(
            "INSERT INTO console_audit (actor, role, via, action, target, idempotency_key, "
            "request_digest, outcome) VALUES ('otto', 'operator', 'token', 'issue', 'in_1', "
            "'k1', 'd1', 'pending') RETURNING id")
        done = await connection.fetchval(
            "INSERT INTO console_audit (actor, role, via, action, outcome) VALUES "
            "('otto', 'operator', 'token', 'issue', 'applied') RETURNING id")
        await connection.execute(
            "INSERT INTO console_sessions (id, actor, role, expires_at) VALUES "
            "($1, 'otto', 'operator', now() + interval '1 hour')", "a" * 64)
        await connection.execute("UPDATE console_sessions SET ended_at = now()")
        for statement in HOLDS:
            args = tuple(x for x, name in ((pending, "$1"), (done, "$2")) if name in statement)
            if "$2" in statement:
                statement = statement.replace("$2", "$1")
            assert await as_app(connection, statement, *args) is not None, statement
        # COPY is an insert too (the trigger runs for it)
        await connection.execute("SET ROLE creditnotes_app")
        with pytest.raises(asyncpg.PostgresError):
            await connection.copy_records_to_table(
                "verify_runs", records=[(7, datetime(2000, 1, 1, tzinfo=UTC), 0, "forged")],
                columns=["id", "started_at", "violations", "ran_by"])
        # what the application itself does still works, ids in order
        assert await as_app(connection, "UPDATE console_audit SET outcome = 'applied' "
                            "WHERE id = $1", pending) is None
        later = await connection.fetchval(
            "INSERT INTO console_audit (actor, role, via, action, outcome) VALUES "
            "('otto', 'operator', 'token', 'login', 'signed_in') RETURNING id")
        await connection.execute("INSERT INTO verify_runs (started_at, violations, invariants, "
                                 "ran_by) VALUES (now(), 3, '{x}', 'ops')")
        await connection.execute("RESET ROLE")
        assert pending < done < later
        assert await connection.fetchval("SELECT min(id) FROM console_audit") > 0
        runs = await connection.fetch("SELECT ran_by FROM verify_runs")
        assert [run["ran_by"] for run in runs] == ["ops"]
    finally:
        await connection.close()


async def test_an_unknown_outcome_takes_its_final_one_once_never_a_refusal(
        settings: Settings) -> None:
    connection = await asyncpg.connect(settings.database_url)
    try:
        async def row(outcome: str, key: str) -> int:
            return int(await connection.fetchval(
                "INSERT INTO console_audit (actor, role, via, action, idempotency_key, outcome) "
                "VALUES ('otto', 'operator', 'token', 'issue', $1, $2) RETURNING id",
                key, outcome))
        unknown = await row("unknown:KafkaTimeoutError", "u1")
        for refused in ("refused:forbidden", "unknown:again", "pending"):
            assert await as_app(connection, "UPDATE console_audit SET outcome = $2 "
                                "WHERE id = $1", unknown, refused) is not None, refused
        assert await console_audit.finish(connection, unknown, "unknown:other") is False
        assert await console_audit.finish(connection, unknown, "applied") is True
        assert await console_audit.finish(connection, unknown, "rejected:x") is False  # once
        assert await as_app(connection, "UPDATE console_audit SET outcome = 'rejected:y' "
                            "WHERE id = $1", unknown) is not None
        pending = await row("pending", "u2")
        assert await console_audit.finish(connection, pending, "unknown:OSError") is True
        assert await console_audit.finish(connection, pending, "duplicate") is True
        outcomes = await connection.fetch("SELECT outcome FROM console_audit ORDER BY id")
        assert [r["outcome"] for r in outcomes] == ["applied", "duplicate"]
    finally:
        await connection.close()
