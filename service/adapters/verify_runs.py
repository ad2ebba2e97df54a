"""``creditnotes verify`` results (table ``verify_runs``, migration 0019): the console's
flow-health page shows the last one, so nobody has to ask when it last ran."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True)
class VerifyRun:
    started_at: datetime
    finished_at: datetime
    violations: int
    invariants: tuple[str, ...]  # the codes of the invariants violated
    ran_by: str


async def record(connection: asyncpg.Connection, started_at: datetime, violated: Sequence[str],
                 ran_by: str) -> None:
    """One run: ``violated`` holds one invariant code per violation found."""
    await connection.execute(
        "INSERT INTO verify_runs (started_at, violations, invariants, ran_by)"
        " VALUES ($1, $2, $3, $4)",
        started_at, len(violated), sorted(set(violated)), ran_by)


async def last(connection: asyncpg.Connection) -> VerifyRun | None:
    """The newest run, or None (none yet, or the table is not there: not migrated yet)."""
    try:
        row = await connection.fetchrow(
            "SELECT started_at, finished_at, violations, invariants, ran_by FROM verify_runs"
            " ORDER BY finished_at DESC, id DESC LIMIT 1")
    except asyncpg.UndefinedTableError:
        return None
    if row is None:
        return None
    return VerifyRun(row["started_at"], row["finished_at"], row["violations"],
                     tuple(row["invariants"]), row["ran_by"])


async def record_run(database_url: str, started_at: datetime, violated: Sequence[str],
                     ran_by: str) -> bool:
    """Record one ``creditnotes verify`` on its own connection; False (nothing recorded,
    the verdict stands) when the table is not there yet or the insert is refused."""
    connection = await asyncpg.connect(database_url, timeout=15)
    try:
        await record(connection, started_at, violated, ran_by)
    except (asyncpg.UndefinedTableError, asyncpg.InsufficientPrivilegeError):
        return False
    finally:
        await connection.close()
    return True
