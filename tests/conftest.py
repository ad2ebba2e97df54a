"""Shared fixtures: real servers for the session, a fresh database and topics per test.

The servers come from ``tests/servers.py`` (environment, testcontainers, or
the embedded PostgreSQL and tansu). Each test gets its own database and its
own topic names, so tests never see each other's data.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.adapters.migrations import migrate
from service.devtools.devstack import create_topics
from service.settings import MIGRATIONS_DIR, Settings
from tests.servers import Servers, create_database, drop_database, provide_servers
from tests.support import Kafka, RunningService, consumer_shards


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    # Not under pytest's own temporary directory: a concurrent pytest run on the same machine
    # deletes all but the newest three of those, and with them a running server's data.
    with tempfile.TemporaryDirectory(prefix="creditnotes-test-servers-") as directory, \
            provide_servers(Path(directory)) as found:
        yield found


@pytest.fixture
async def database_url(servers: Servers) -> AsyncIterator[str]:
    url = await create_database(servers.database_url)
    await migrate(url, MIGRATIONS_DIR)
    yield url
    await drop_database(servers.database_url, url.rsplit("/", 1)[1])


@pytest.fixture
async def settings(servers: Servers, database_url: str, request: pytest.FixtureRequest) -> Settings:
    prefix = f"t{uuid.uuid4().hex[:8]}-"
    names = ["invoices", "returns", "sla_breaches", "downgrades", "cancellations",
             "credit_note_commands", "refund_results", "credit_note_events", "invoice_events",
             "refund_requests", "customer_balance_events"]
    shards = consumer_shards(request)
    # None: Settings' own default (CREDITNOTES_CONSUMER_SHARDS, else 4)
    shard_setting: dict[str, Any] = {} if shards is None else {"consumer_shards": shards}
    configured = Settings(
        database_url=database_url,
        kafka_bootstrap_servers=servers.bootstrap_servers,
        consumer_group=f"{prefix}credit-notes",
        http_port=0,
        log_format="console",
        not_found_retry_seconds=3.0,
        retry_initial_backoff_seconds=0.05,
        retry_max_backoff_seconds=0.5,
        outbox_poll_seconds=0.2,
        shutdown_timeout_seconds=5.0,
        kafka_session_timeout_ms=2_000,
        kafka_heartbeat_interval_ms=300,
        kafka_fetch_max_wait_ms=10,  # tansu holds every fetch about this long
        allow_any_source=True,  # tests publish from their own sources; allow-lists opt in
        **shard_setting,
        **{f"topic_{name}": prefix + name.replace("_", "-") for name in names},
    )
    await create_topics(configured.kafka_bootstrap_servers, configured.topics.all())
    return configured


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[RunningService]:
    async with RunningService(settings) as running:
        yield running


@pytest.fixture
async def kafka(settings: Settings) -> AsyncIterator[Kafka]:
    async with Kafka(settings) as client:
        yield client
