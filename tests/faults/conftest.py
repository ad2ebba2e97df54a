"""Fixtures of the fault-injection tests: their OWN PostgreSQL and broker, never shared.

Some scenarios crash PostgreSQL or freeze the broker, so these tests never
use a server from the environment (``CREDITNOTES_DATABASE_URL``, a
testcontainer, 127.0.0.1:5432): one embedded PostgreSQL and one tansu are
started for this directory, and every test gets a fresh database, its own
topic names and consumer group on them. After each test both servers are
brought back up (a failed scenario may leave them stopped or paused) and
every service process the test started is killed.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.adapters.migrations import migrate
from service.devtools.devstack import EmbeddedKafka, EmbeddedPostgres, create_topics
from service.settings import MIGRATIONS_DIR
from tests.faults.harness import Deployment, ServiceProcess
from tests.servers import create_database, drop_database


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault injection on real processes")


@dataclass(frozen=True)
class FaultStack:
    postgres: EmbeddedPostgres
    kafka: EmbeddedKafka


@pytest.fixture(scope="session")
def fault_stack() -> Iterator[FaultStack]:
    # outside pytest's temporary directories, which a concurrent pytest run may delete
    with tempfile.TemporaryDirectory(prefix="creditnotes-fault-stack-") as name:
        directory = Path(name)
        postgres = EmbeddedPostgres(directory / "postgres")
        kafka = EmbeddedKafka(log_file=directory / "tansu.log")
        try:
            postgres.start()
            kafka.start()
            yield FaultStack(postgres, kafka)
        finally:
            kafka.stop()
            postgres.stop()


@pytest.fixture
async def deployment(fault_stack: FaultStack, tmp_path: Path) -> AsyncIterator[Deployment]:
    url = await create_database(fault_stack.postgres.url)
    await migrate(url, MIGRATIONS_DIR)
    world = Deployment(database_url=url, bootstrap_servers=fault_stack.kafka.bootstrap_servers,
                       prefix=f"f{uuid.uuid4().hex[:8]}-", log_dir=tmp_path)
    await create_topics(world.bootstrap_servers, world.topics.all())
    yield world
    fault_stack.kafka.resume()
    fault_stack.postgres.start()
    await drop_database(fault_stack.postgres.url, url.rsplit("/", 1)[1])


@pytest.fixture
def replicas(deployment: Deployment) -> Iterator[Callable[..., ServiceProcess]]:
    """Makes service processes of this test; none outlives it."""
    made: list[ServiceProcess] = []

    def make(name: str = "service", **env: str) -> ServiceProcess:
        service = ServiceProcess(deployment, name, **env)
        made.append(service)
        return service

    yield make
    for service in made:
        service.stop_quietly()
