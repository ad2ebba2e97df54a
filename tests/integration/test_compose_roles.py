"""docker-compose.yml's database users, created by running deploy/compose/init-roles.sql
with psql as PostgreSQL's image does: the migrations apply as ``creditnotes_migrate``, and
the service's ``creditnotes_service`` owns nothing (issue 15, finding 8)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.adapters.migrations import migrate
from service.devtools.devstack import _postgres_bin_dir
from service.settings import MIGRATIONS_DIR
from tests.servers import Servers, create_database, drop_database

pytestmark = pytest.mark.integration

INIT_SQL = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "init-roles.sql"
USERS = ("creditnotes_migrate", "creditnotes_service")


def as_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


@pytest.fixture
async def compose_database(servers: Servers) -> AsyncIterator[str]:
    """A fresh database after init-roles.sql ran in it as the superuser."""
    url = await create_database(servers.database_url)
    parts = urlsplit(url)
    ran = await asyncio.to_thread(
        subprocess.run,
        [str(_postgres_bin_dir() / "psql"), "--no-psqlrc", "--host", parts.hostname or "",
         "--port", str(parts.port or 5432), "--username", parts.username or "postgres",
         "--dbname", parts.path.lstrip("/"), "--set", "migrate_password=m-secret",
         "--set", "service_password=s-secret", "--file", str(INIT_SQL)],
        capture_output=True, text=True, timeout=60,
        env={"PGPASSWORD": parts.password or ""})
    assert ran.returncode == 0, ran.stdout + ran.stderr
    try:
        yield url
    finally:
        await drop_database(servers.database_url, parts.path.lstrip("/"))
        admin = await asyncpg.connect(servers.database_url)
        try:
            for user in USERS:  # roles are cluster-wide: leave none behind
                await admin.execute(f'DROP ROLE IF EXISTS "{user}"')
        finally:
            await admin.close()


async def test_migrations_run_as_the_owner_and_the_service_user_owns_nothing(
        compose_database: str) -> None:
    migrator_url = as_user(compose_database, "creditnotes_migrate", "m-secret")
    assert await migrate(migrator_url, MIGRATIONS_DIR)

    service = await asyncpg.connect(as_user(compose_database, "creditnotes_service", "s-secret"))
    try:
        owners = await service.fetchrow(
            "SELECT (SELECT datdba::regrole::text FROM pg_database"
            "        WHERE datname = current_database()) AS database,"
            "       (SELECT array_agg(DISTINCT tableowner::text) FROM pg_tables"
            "        WHERE schemaname = 'public') AS tables,"
            "       pg_has_role('creditnotes_app', 'MEMBER') AS app,"
            "       pg_has_role('creditnotes_migrator', 'MEMBER') AS migrator,"
            "       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS super")
        assert owners is not None
        assert owners["database"] == "creditnotes_migrate"
        assert owners["tables"] == ["creditnotes_migrate"]
        assert (owners["app"], owners["migrator"], owners["super"]) == (True, False, False)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await service.execute("ALTER TABLE invoices DISABLE TRIGGER ALL")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await service.execute("CREATE TABLE intruder (id int)")
        assert await service.fetchval("SELECT count(*) FROM invoices") == 0
    finally:
        await service.close()
