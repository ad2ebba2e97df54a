"""The console's audit trail (table ``console_audit``, migration 0019).

Every write attempt through the console or its API leaves a row: a command's is
begun ``pending`` before its CloudEvent is published and finished once with the
outcome; any other (a refusal: ``refused:<code>``, a sign-in) is written with its
outcome at once. The database refuses any other change, and any delete. A
command's row holds its idempotency key and a digest of the request; a user has
one command per key (a unique index; refusals take no key).

Sessions (``console_sessions``) are at the end of this module.

Each function takes a connection or the pool, so a caller may run :func:`find` and
:func:`begin` in one transaction (under an advisory lock on the user and key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

PENDING = "pending"
REFUSED = "refused:"
#: A command whose publish failed (it may have been sent): its final outcome may follow.
UNKNOWN = "unknown:"
_COLUMNS = ("id, at, actor, role, via, action, target, idempotency_key, request_digest, "
            "outcome, finished_at")

Executor = asyncpg.Connection | asyncpg.Pool


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    role: str
    via: str
    action: str
    target: str | None
    idempotency_key: str | None
    request_digest: str | None
    outcome: str
    finished_at: datetime | None


def request_digest(action: str, target: str | None, body: Any) -> str:
    """A digest of what was asked, independent of key order and whitespace in JSON."""
    canonical = json.dumps([action, target, body], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _row(record: asyncpg.Record) -> AuditRow:
    return AuditRow(**dict(record))


async def begin(executor: Executor, *, actor: str, role: str, via: str, action: str,
                target: str | None, idempotency_key: str | None,
                request_digest: str | None, outcome: str | None = None) -> int:
    """Write a row: ``pending`` (a command about to be published: :func:`finish` it),
    or with its ``outcome`` at once. The id of the row.

    A second command row for the same user and key raises
    ``asyncpg.UniqueViolationError`` (:func:`find` it first, in the same transaction).
    """
    row_id = await executor.fetchval(
        """
        INSERT INTO console_audit (actor, role, via, action, target, idempotency_key,
                                   request_digest, outcome)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id
        """, actor, role, via, action[:100], None if target is None else target[:500],
        idempotency_key, request_digest, outcome or PENDING)
    return int(row_id)


async def finish(executor: Executor, audit_id: int, outcome: str) -> bool:
    """Record a pending row's outcome, or the final outcome of an ``unknown:*`` one (a
    publish that failed; a retry learnt what became of it); False when it has one
    already (it keeps it). Never a refusal (the database refuses it)."""
    status = await executor.execute(
        f"""
        UPDATE console_audit SET outcome = $2
         WHERE id = $1 AND (outcome = '{PENDING}'
                            OR (outcome LIKE '{UNKNOWN}%' AND $2 NOT LIKE '{UNKNOWN}%'))
        """, audit_id, outcome)
    return bool(status.endswith(" 1"))


async def find(executor: Executor, actor: str, idempotency_key: str) -> AuditRow | None:
    """This user's command of this idempotency key (refusals are not commands)."""
    record = await executor.fetchrow(
        f"SELECT {_COLUMNS} FROM console_audit WHERE actor = $1 AND idempotency_key = $2 "
        f"AND outcome NOT LIKE '{REFUSED}%' ORDER BY id LIMIT 1", actor, idempotency_key)
    return None if record is None else _row(record)


async def recent(executor: Executor, limit: int = 50, *, actor: str | None = None,
                 action: str | None = None, before_id: int | None = None) -> list[AuditRow]:
    """The newest rows first, optionally one user's or one action's, paged by id."""
    records = await executor.fetch(
        f"""
        SELECT {_COLUMNS} FROM console_audit
         WHERE ($1::text IS NULL OR actor = $1) AND ($2::text IS NULL OR action = $2)
           AND ($3::bigint IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4
        """, actor, action, before_id, max(1, min(limit, 1_000)))
    return [_row(record) for record in records]


# ------------------------------------------------------------------ sessions
# console_sessions (0019): a browser session's row, keyed by a digest of its nonce
# (service.entrypoints.console.auth.session_key). Signing out ends it for every replica.


async def open_session(executor: Executor, key: str, actor: str, role: str,
                       expires_at: datetime) -> None:
    await executor.execute(
        "INSERT INTO console_sessions (id, actor, role, expires_at) VALUES ($1, $2, $3, $4)",
        key, actor, role, expires_at)


async def session_open(executor: Executor, key: str) -> bool:
    """Whether the session is neither signed out nor expired (one primary-key lookup)."""
    found = await executor.fetchval(
        "SELECT ended_at IS NULL AND expires_at > now() FROM console_sessions WHERE id = $1",
        key)
    return bool(found)


async def end_session(executor: Executor, key: str) -> bool:
    """Sign out: False when the session had ended already (or never was)."""
    status = await executor.execute(
        "UPDATE console_sessions SET ended_at = now() WHERE id = $1 AND ended_at IS NULL", key)
    return bool(status.endswith(" 1"))
