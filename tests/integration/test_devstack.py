"""The embedded stack: a real PostgreSQL and tansu, started and stopped without leftovers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from service.devtools.devstack import DevStack, EmbeddedKafka, EmbeddedPostgres, create_topics

pytestmark = pytest.mark.integration

# tansu delays a join by about half the session timeout, and a member of a group's first
# generation (0) never sends LeaveGroup (aiokafka skips it), so keep sessions short here.
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}


def _postgres_family(data_dir: Path) -> set[int]:
    """The postmaster of ``data_dir`` and all its children."""
    pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    postmaster = psutil.Process(pid)
    return {pid, *(child.pid for child in postmaster.children(recursive=True))}


def _alive(pids: set[int]) -> set[int]:
    """The pids that still belong to a running process (zombies awaiting init do not count)."""
    alive = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
    return alive


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)
            if child.status() != psutil.STATUS_ZOMBIE}


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "pg")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def kafka() -> Iterator[EmbeddedKafka]:
    broker = EmbeddedKafka()
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
async def producer(kafka: EmbeddedKafka) -> AsyncIterator[AIOKafkaProducer]:
    client = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers,
                              enable_idempotence=False, acks="all")
    await client.start()
    yield client
    await client.stop()


async def test_postgres_answers_over_tcp_and_stop_leaves_no_process(
        postgres: EmbeddedPostgres) -> None:
    assert postgres.url == f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    connection = await asyncpg.connect(postgres.url)
    try:
        assert await connection.fetchval("select 1") == 1
        assert str(await connection.fetchval("select inet_server_addr()")) == "127.0.0.1"
        assert await connection.fetchval("show server_encoding") == "UTF8"
        assert await connection.fetchval("select rolsuper from pg_roles where rolname = 'postgres'")
    finally:
        await connection.close()
    family = _postgres_family(postgres.data_dir)

    postgres.stop()

    assert _alive(family) == set()
    assert not (postgres.data_dir / "postmaster.pid").exists()
    postgres.stop()  # idempotent


async def test_postgres_keeps_committed_data_across_kill_and_restart(
        postgres: EmbeddedPostgres) -> None:
    connection = await asyncpg.connect(postgres.url)
    await connection.execute("create table notes (id int primary key); insert into notes values (1)")
    await connection.close()

    postgres.kill()
    postgres.start()

    connection = await asyncpg.connect(postgres.url)
    try:
        assert await connection.fetchval("select count(*) from notes") == 1
    finally:
        await connection.close()


def test_postgres_left_running_by_a_previous_run_is_stopped_first(tmp_path: Path) -> None:
    previous = EmbeddedPostgres(tmp_path / "pg")
    previous.start()
    leftover = _postgres_family(previous.data_dir)
    current = EmbeddedPostgres(tmp_path / "pg")  # a new run does not know the old one
    try:
        current.start()
        assert _alive(leftover) == set()
        assert _postgres_family(current.data_dir)
    finally:
        current.stop()
        previous.stop()


async def test_create_topics_then_produce_and_consume(
        kafka: EmbeddedKafka, producer: AIOKafkaProducer) -> None:
    topics = ["devstack-a", "devstack-b"]
    await create_topics(kafka.bootstrap_servers, topics, partitions=3)
    await create_topics(kafka.bootstrap_servers, topics, partitions=3)  # already there: fine

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    assert {t["topic"]: len(t["partitions"]) for t in described} == dict.fromkeys(topics, 3)

    sent = await producer.send_and_wait("devstack-a", b"credit note", key=b"invoice-1")
    consumer = AIOKafkaConsumer("devstack-a", bootstrap_servers=kafka.bootstrap_servers,
                                group_id="devstack-readers", auto_offset_reset="earliest",
                                enable_auto_commit=False, **FAST_GROUP)
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=20)
    finally:
        await consumer.stop()
    assert (record.key, record.value, record.partition, record.offset) == (
        b"invoice-1", b"credit note", sent.partition, sent.offset)


async def test_committed_offsets_are_kept_for_the_group(
        kafka: EmbeddedKafka, producer: AIOKafkaProducer) -> None:
    await create_topics(kafka.bootstrap_servers, ["devstack-commits"], partitions=1)

    async def read_one() -> bytes:
        consumer = AIOKafkaConsumer("devstack-commits", bootstrap_servers=kafka.bootstrap_servers,
                                    group_id="devstack-committers", auto_offset_reset="earliest",
                                    enable_auto_commit=False, **FAST_GROUP)
        await consumer.start()
        try:
            record = await asyncio.wait_for(consumer.getone(), timeout=20)
            await consumer.commit()
        finally:
            await consumer.stop()
        assert record.value is not None
        return bytes(record.value)

    await producer.send_and_wait("devstack-commits", b"first")
    await producer.send_and_wait("devstack-commits", b"second")
    assert await read_one() == b"first"
    assert await read_one() == b"second"


async def test_a_send_during_pause_completes_only_after_resume(
        kafka: EmbeddedKafka, producer: AIOKafkaProducer) -> None:
    await create_topics(kafka.bootstrap_servers, ["devstack-outage"])
    await producer.send_and_wait("devstack-outage", b"before")

    kafka.pause()
    try:
        send = asyncio.ensure_future(producer.send_and_wait("devstack-outage", b"during"))
        await asyncio.sleep(1.5)
        assert not send.done()
    finally:
        kafka.resume()
    sent = await asyncio.wait_for(send, timeout=20)
    assert sent.topic == "devstack-outage"


async def test_devstack_serves_both_and_exits_without_leftovers(tmp_path: Path) -> None:
    before = _children()
    with DevStack(tmp_path) as stack:
        connection = await asyncpg.connect(stack.database_url)
        assert await connection.fetchval("select 1") == 1
        await connection.close()
        await create_topics(stack.bootstrap_servers, ["devstack-stack"])
        started = _postgres_family(stack.postgres.data_dir) | (_children() - before)
        assert len(started) > 1

    assert _alive(started) == set()
    assert _children() - before == set()
    assert (tmp_path / "postgres" / "PG_VERSION").exists()
    assert (tmp_path / "tansu.log").exists()


def test_devstack_stops_both_on_keyboard_interrupt(tmp_path: Path) -> None:
    before = _children()
    with pytest.raises(KeyboardInterrupt), DevStack(tmp_path) as stack:  # noqa: PT012
        started = _postgres_family(stack.postgres.data_dir) | (_children() - before)
        raise KeyboardInterrupt

    assert _alive(started) == set()
    assert _children() - before == set()
