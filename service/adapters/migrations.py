"""Forward-only, numbered SQL migrations (``service/adapters/sql/NNNN_name.sql``).

Applied in order under a PostgreSQL advisory lock, so replicas starting
together migrate once; each file runs in its own transaction and is recorded
in ``schema_migrations``. Running it again is a no-op. The files are package
data (``settings.MIGRATIONS_DIR``), found from an installed wheel as from a checkout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

_LOCK_KEY = 0x63726E6F  # "crno": any constant shared by every replica
_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    path: Path


def discover(directory: Path) -> list[Migration]:
    found = []
    for path in sorted(directory.iterdir()):
        match = _FILE.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), path))
    versions = [migration.version for migration in found]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"two migrations share a number in {directory}")
    return found


async def migrate(database_url: str, directory: Path) -> list[str]:
    """Apply the pending migrations; returns the names of those applied."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await connection.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            applied = {row["version"] for row in
                       await connection.fetch("SELECT version FROM schema_migrations")}
            done = []
            for migration in discover(directory):
                if migration.version in applied:
                    continue
                async with connection.transaction():
                    await connection.execute(migration.path.read_text())
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version, migration.path.name,
                    )
                done.append(migration.path.name)
            return done
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await connection.close()


async def pending(connection: asyncpg.Connection | PoolConnectionProxy, directory: Path) -> list[str]:
    """Migrations not yet applied (for readiness checks)."""
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied = set()
    if exists:
        applied = {row["version"] for row in
                   await connection.fetch("SELECT version FROM schema_migrations")}
    return [m.path.name for m in discover(directory) if m.version not in applied]
