"""Which PostgreSQL and Kafka-protocol broker the tests run against.

In this order, for each server on its own:

1. the environment: ``CREDITNOTES_DATABASE_URL`` (an admin URL: we create a database per test)
   and ``CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS``;
2. testcontainers, when a Docker engine answers: ``postgres:16-alpine`` and ``apache/kafka``
   (KRaft, single node);
3. the embedded servers of :mod:`service.devtools.devstack` (PostgreSQL from a wheel, tansu).

The tests never skip for want of a server.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from service.devtools.devstack import (
    EmbeddedKafka,
    EmbeddedPostgres,
    free_port,
    wait_for_kafka,
)

DATABASE_URL_ENV = "CREDITNOTES_DATABASE_URL"
BOOTSTRAP_SERVERS_ENV = "CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS"
POSTGRES_IMAGE = "postgres:16-alpine"
KAFKA_IMAGE = "apache/kafka:3.9.1"


@dataclass(frozen=True)
class Servers:
    database_url: str  # an admin URL to a server where we may CREATE DATABASE
    bootstrap_servers: str
    origin: str  # "environment" | "testcontainers" | "embedded"; "mixed" when they differ
    database_origin: str = ""  # where database_url came from (one of the three above)
    kafka_origin: str = ""  # where bootstrap_servers came from


@contextlib.contextmanager
def provide_servers(tmp_dir: Path) -> Iterator[Servers]:
    """Yield servers for the test session; stop whatever was started for it afterwards."""
    database_url = os.environ.get(DATABASE_URL_ENV) or None
    bootstrap_servers = os.environ.get(BOOTSTRAP_SERVERS_ENV) or None
    origins = {"database": "environment", "kafka": "environment"}
    with contextlib.ExitStack() as stack:
        if database_url is None or bootstrap_servers is None:
            if _docker_answers():
                if database_url is None:
                    database_url = stack.enter_context(_postgres_container())
                    origins["database"] = "testcontainers"
                if bootstrap_servers is None:
                    bootstrap_servers = stack.enter_context(_kafka_container())
                    origins["kafka"] = "testcontainers"
            else:
                if database_url is None:
                    postgres = EmbeddedPostgres(tmp_dir / "postgres")
                    stack.callback(postgres.stop)
                    postgres.start()
                    database_url = postgres.url
                    origins["database"] = "embedded"
                if bootstrap_servers is None:
                    kafka = EmbeddedKafka(log_file=tmp_dir / "tansu.log")
                    stack.callback(kafka.stop)
                    kafka.start()
                    bootstrap_servers = kafka.bootstrap_servers
                    origins["kafka"] = "embedded"
        same = origins["database"] == origins["kafka"]
        yield Servers(database_url=database_url, bootstrap_servers=bootstrap_servers,
                      origin=origins["database"] if same else "mixed",
                      database_origin=origins["database"], kafka_origin=origins["kafka"])


async def create_database(admin_url: str) -> str:
    """Create a fresh, uniquely named database (``cn_test_<hex>``) and return its URL."""
    name = f"cn_test_{uuid.uuid4().hex[:16]}"
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return database_url(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    """Drop a database made by :func:`create_database`, even with connections still open."""
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def database_url(admin_url: str, name: str) -> str:
    """``admin_url`` pointing at the database ``name`` instead."""
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


# --------------------------------------------------------------------------- testcontainers


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped, unused-ignore]

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no library, no socket, no daemon, a timeout: no Docker
        return False


@contextlib.contextmanager
def _postgres_container() -> Iterator[str]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.14
        from testcontainers.postgres import PostgresContainer

    with PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
        yield str(container.get_connection_url())


@contextlib.contextmanager
def _kafka_container() -> Iterator[str]:
    # testcontainers' KafkaContainer runs Confluent images only; apache/kafka is configured here.
    # Clients must reach the advertised listener, so the host port is fixed before the start and
    # the broker listens on that same port inside the container.
    from testcontainers.core.container import DockerContainer

    port = free_port()
    container = DockerContainer(KAFKA_IMAGE)
    host = container.get_docker_client().host()
    settings = {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://0.0.0.0:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{host}:{port}",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_NUM_PARTITIONS": "3",
    }
    for key, value in settings.items():
        container.with_env(key, value)
    container.with_bind_ports(port, port)
    with container:
        bootstrap_servers = f"{host}:{port}"
        wait_for_kafka(bootstrap_servers, timeout=120)
        yield bootstrap_servers
