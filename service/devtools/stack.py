"""Where the servers come from for ``creditnotes dev`` and ``demo``.

``CREDITNOTES_DATABASE_URL`` and ``CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS``, when
set, name your own servers; whatever is not set is started embedded (a real
PostgreSQL and the tansu Kafka-protocol broker, from PyPI wheels) with its
data under ``data_dir``, and stopped again on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from service.settings import Settings

#: tansu holds each consumer-group join for about half the session timeout, and every
#: fetch for about its whole wait even when records arrive (Kafka answers at once).
EMBEDDED_BROKER_GROUP_TIMEOUTS = {"kafka_session_timeout_ms": 2_000,
                                  "kafka_heartbeat_interval_ms": 300,
                                  "kafka_fetch_max_wait_ms": 10}


@contextlib.contextmanager
def servers(settings: Settings, data_dir: Path, database: str = "creditnotes") -> Iterator[Settings]:
    """Yield settings pointing at configured or embedded servers."""
    from service.devtools.devstack import EmbeddedKafka, EmbeddedPostgres

    updates: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        if "CREDITNOTES_DATABASE_URL" not in os.environ:
            postgres = EmbeddedPostgres(data_dir / "postgres")
            postgres.start()
            stack.callback(postgres.stop)
            asyncio.run(ensure_database(postgres.url, database))
            updates["database_url"] = with_database(postgres.url, database)
        if "CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS" not in os.environ:
            kafka = EmbeddedKafka(log_file=data_dir / "broker.log")
            kafka.start()
            stack.callback(kafka.stop)
            updates["kafka_bootstrap_servers"] = kafka.bootstrap_servers
            updates |= EMBEDDED_BROKER_GROUP_TIMEOUTS
        yield settings.model_copy(update=updates)


def with_database(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


async def ensure_database(admin_url: str, database: str) -> None:
    connection = await asyncpg.connect(admin_url)
    try:
        exists = await connection.fetchval(
            "SELECT true FROM pg_database WHERE datname = $1", database)
        if not exists:
            await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()
