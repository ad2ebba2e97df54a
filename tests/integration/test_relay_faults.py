"""The outbox relay under the faults an attacker found (notes/attack-outbox, findings 1-8).

Real PostgreSQL and the embedded broker. Where tansu cannot play the broker's
behaviour (it enforces no record size, no ACLs, its partitions are never
unavailable), a ``KafkaProducer`` subclass plays only the broker's *answer* for
the records involved; every other record goes to the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest
import structlog
from aiokafka import errors as kafka_errors

from service.adapters import outbox_relay
from service.adapters.kafka_producer import KafkaProducer
from service.adapters.outbox_relay import (
    _PENDING,
    RELAY_SESSION_SETTINGS,
    OutboxRelay,
    parkable,
    parked_rows,
    unpark,
)
from service.headers import Header
from service.settings import Settings
from tests.integration.outbox_support import insert_row
from tests.integration.test_single_relay import ALIVE_CLASS, leader_pid, wait_until
from tests.support import Kafka


class Broker(KafkaProducer):
    """The real producer, except for records whose value holds a marker in ``answers``:
    their future resolves with that error after 50 ms, or never (``None``)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.answers: dict[bytes, type[Exception] | None] = {}
        self.once: set[bytes] = set()
        self.ack_delay = 0.0
        self.refuse_all_until = 0.0

    async def enqueue(self, topic: str, key: bytes | None, value: bytes,
                      headers: Sequence[Header]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if time.monotonic() < self.refuse_all_until:
            refused: asyncio.Future[Any] = loop.create_future()
            refused.set_exception(kafka_errors.ClusterAuthorizationFailedError())
            return refused
        for marker, error in list(self.answers.items()):
            if marker in value:
                if marker in self.once:
                    del self.answers[marker]
                future: asyncio.Future[Any] = loop.create_future()
                if error is not None:
                    loop.call_later(0.05, future.set_exception, error())
                return future
        real = await super().enqueue(topic, key, value, headers)
        if not self.ack_delay:
            return real

        async def slow_ack() -> Any:  # a slow ISR with acks=all: the record is out, the ack late
            result = await real
            await asyncio.sleep(self.ack_delay)
            return result

        return asyncio.ensure_future(slow_ack())


@contextlib.asynccontextmanager
async def relay(settings: Settings, pool: Any = None,
                **options: Any) -> AsyncIterator[tuple[OutboxRelay, Broker]]:
    own_pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    producer = Broker(settings)
    await producer.start()
    running = OutboxRelay(settings.database_url, pool or own_pool, producer,
                          **{"poll_seconds": 0.1, "max_backoff_seconds": 0.3, **options})
    stopping = asyncio.Event()
    task = asyncio.create_task(running.run(stopping))
    try:
        yield running, producer
    finally:
        stopping.set()
        await asyncio.wait_for(task, 30)
        await producer.stop()
        await own_pool.close()


def ids_in_partition_order(kafka: Kafka, key: bytes | None = None) -> list[str]:
    return [r.event["id"] for r in sorted(kafka.records, key=lambda r: (r.partition, r.offset))
            if key is None or r.key == key]


async def _true(value: bool) -> bool:
    return value


# -- finding 1: a stalled leader never publishes its stale batch beside the new leader

class StallingPool:
    """The relay's pool; once armed, the batch read returns only after ``stall`` seconds
    (a pool starved by the consumers, a slow database, or the process paused)."""

    def __init__(self, pool: asyncpg.Pool, stall: float) -> None:
        self._pool = pool
        self.stall = stall
        self.armed = False
        self.stalled = asyncio.Event()

    async def fetch(self, query: str, *args: Any) -> Any:
        rows = await self._pool.fetch(query, *args)
        if query == _PENDING and self.armed and rows:
            self.armed = False
            self.stalled.set()
            await asyncio.sleep(self.stall)
        return rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


async def test_a_leader_stalled_past_its_fence_sends_nothing_of_its_stale_batch(
        settings: Settings, kafka: Kafka, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_relay, "_MARK_MARGIN_SECONDS", 0.5)  # fence: 1 + 0.5 s
    topic = settings.topics.credit_note_events
    admin = await asyncpg.connect(settings.database_url)
    raw = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    stalling = StallingPool(raw, stall=3.0)
    try:
        async with relay(settings, stalling, publish_timeout_seconds=1.0) as (a, _):
            await wait_until(lambda: _true(a.leading.is_set()), 10, "A to lead")
            stalling.armed = True
            for n in range(10):
                await insert_row(admin, topic, "in_1", f"evt_{n:02d}")
            await asyncio.wait_for(stalling.stalled.wait(), 10)
            pid = await leader_pid(admin)  # A read evt_00..09 and stalls; its lock dies
            assert pid is not None
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            async with relay(settings, publish_timeout_seconds=1.0) as (b, _):
                await wait_until(lambda: _true(b.leading.is_set()), 10, "B to lead")
                await kafka.wait_for(lambda: len(kafka.records) >= 10, 10)
                for n in range(10, 15):  # newer events of the same invoice, by B
                    await insert_row(admin, topic, "in_1", f"evt_{n:02d}")
                await kafka.wait_for(lambda: len(kafka.records) >= 15, 10)
                await asyncio.sleep(2.0)  # A wakes up, 3 s after its read
                await kafka.settle(0.5)
    finally:
        await raw.close()
        await admin.close()
    assert ids_in_partition_order(kafka) == [f"evt_{n:02d}" for n in range(15)]


# -- finding 2: order per invoice holds when the broker refuses or times out a record

async def test_a_record_that_times_out_is_never_overtaken_by_the_next_of_its_invoice(
        settings: Settings, kafka: Kafka) -> None:
    topic = settings.topics.credit_note_events
    admin = await asyncpg.connect(settings.database_url)
    try:
        await insert_row(admin, topic, "in_A", "evt_A1")
        await insert_row(admin, topic, "in_A", "evt_A2")
        await insert_row(admin, topic, "in_B", "evt_B1")
        async with relay(settings) as (_, broker):
            broker.answers[b"evt_A1"] = kafka_errors.KafkaTimeoutError  # its batch expired
            broker.once.add(b"evt_A1")
            await kafka.wait_for(lambda: len(kafka.records) >= 3, 15)
            await kafka.settle(0.5)
        parked = await admin.fetchval("SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL")
    finally:
        await admin.close()
    assert ids_in_partition_order(kafka, b"in_A") == ["evt_A1", "evt_A2"]
    assert Counter(r.event["id"] for r in kafka.records) == Counter(
        {"evt_A1": 1, "evt_A2": 1, "evt_B1": 1})
    assert parked == 0, "a timeout is retried, never parked"


async def test_a_refused_record_holds_its_invoice_back_until_retry_then_all_go_in_order(
        settings: Settings, kafka: Kafka) -> None:
    topic = settings.topics.credit_note_events
    admin = await asyncpg.connect(settings.database_url)
    try:
        a1 = await insert_row(admin, topic, "in_A", "evt_A1")
        a2 = await insert_row(admin, topic, "in_A", "evt_A2")
        await insert_row(admin, topic, "in_B", "evt_B1")
        n1 = await insert_row(admin, topic, None, "evt_N1")  # finding 8: no key
        await insert_row(admin, topic, None, "evt_N2")
        async with relay(settings) as (_, broker):
            for marker in (b"evt_A1", b"evt_N1"):
                broker.answers[marker] = kafka_errors.MessageSizeTooLargeError
            await kafka.wait_for(lambda: len(kafka.records) >= 2, 10)
            await kafka.settle(0.5)
            a3 = await insert_row(admin, topic, "in_A", "evt_A3")  # written after the refusal
            await kafka.settle(0.5)
            before_retry = sorted(r.event["id"] for r in kafka.records)
            held = {row["seq"]: row["held_behind"] for row in await admin.fetch(
                "SELECT seq, held_behind FROM outbox WHERE parked_at IS NOT NULL")}
            listed = await parked_rows(settings.database_url)
            broker.answers.clear()  # ops fix the cause
            assert await unpark(settings.database_url, a1) == [a1]
            await kafka.wait_for(lambda: len(kafka.records) >= 5, 10)
            await kafka.settle(0.5)
        left = await admin.fetch("SELECT seq FROM outbox WHERE published_at IS NULL")
    finally:
        await admin.close()
    assert before_retry == ["evt_B1", "evt_N2"], "nothing of in_A overtakes its refused event"
    # the refused rows are parked; in_A's later rows held behind its refused one (also the
    # one written after the refusal), never walked again; a key-less row holds back nothing
    assert held == {a1: None, a2: a1, a3: a1, n1: None}
    assert [(row.seq, row.waiting) for row in listed] == [(a1, 2), (n1, 0)]
    assert ids_in_partition_order(kafka, b"in_A") == ["evt_A1", "evt_A2", "evt_A3"]
    assert [row["seq"] for row in left] == [n1]  # still parked: not retried
    assert set(Counter(r.event["id"] for r in kafka.records).values()) == {1}


# -- finding 3: the "alive" lock is part of leadership; losing it ends leading

@pytest.mark.parametrize("how", ["terminated", "idle_session_timeout"])
async def test_a_leader_that_lost_its_alive_lock_takes_it_back_and_the_fence_holds(
        settings: Settings, kafka: Kafka, how: str) -> None:
    topic = settings.topics.credit_note_events
    admin = await asyncpg.connect(settings.database_url)
    if how == "idle_session_timeout":  # a common managed-PostgreSQL setting
        name = settings.database_url.rsplit("/", 1)[1]
        await admin.execute(f"ALTER DATABASE \"{name}\" SET idle_session_timeout = '1s'")
        await admin.close()
        admin = await asyncpg.connect(settings.database_url,
                                      server_settings={"idle_session_timeout": "0"})

    async def alive_pid(of: OutboxRelay) -> int | None:
        pid: int | None = await admin.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1"
            " AND objid = $2 AND objsubid = 2 AND granted", ALIVE_CLASS, of._alive_key)
        return pid

    try:
        async with relay(settings) as (first, first_broker), \
                relay(settings) as (second, second_broker):
            first_broker.ack_delay = second_broker.ack_delay = 1.5
            await wait_until(lambda: _true(first.leading.is_set() or second.leading.is_set()),
                             10, "a leader")
            leader = first if first.leading.is_set() else second
            if how == "terminated":
                pid = await alive_pid(leader)
                assert pid is not None
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
            await asyncio.sleep(2.5)
            for each in (first, second):
                assert await alive_pid(each) is not None, "every relay holds its alive lock"
            await wait_until(lambda: _true(first.leading.is_set() or second.leading.is_set()),
                             10, "a leader")
            for n in range(20):  # 20 invoices: all in flight at once, acks pending
                await insert_row(admin, topic, f"in_{n:02d}", f"evt_{n:02d}")
            await kafka.wait_for(lambda: len(kafka.records) >= 20, 10)
            pid = await leader_pid(admin)
            assert pid is not None
            await admin.execute("SELECT pg_terminate_backend($1)", pid)

            async def drained() -> bool:
                return not await admin.fetchval(
                    "SELECT count(*) FROM outbox WHERE published_at IS NULL")

            await wait_until(drained, 30, "every row marked")
            await kafka.settle(1.0)
    finally:
        await admin.close()
    twice = sorted(k for k, v in Counter(r.event["id"] for r in kafka.records).items() if v > 1)
    assert twice == [], f"{len(twice)} of 20 events published by both relays"


# -- finding 4: a record never acknowledged wedges nothing and costs no re-sends

async def test_rows_acked_beside_a_never_acked_one_are_marked_and_sent_once(
        settings: Settings, kafka: Kafka) -> None:
    topic = settings.topics.credit_note_events
    admin = await asyncpg.connect(settings.database_url)
    try:
        stuck = await insert_row(admin, topic, "in_stuck", "evt_stuck")
        await insert_row(admin, topic, "in_stuck", "evt_stuck_2")
        for n in range(10):
            await insert_row(admin, topic, f"in_{n}", f"evt_{n}")
        async with relay(settings, publish_timeout_seconds=1.0) as (_, broker):
            broker.answers[b"evt_stuck"] = None  # its partition has no leader: never acked
            await kafka.wait_for(lambda: len(kafka.records) >= 10, 10)
            await asyncio.sleep(3.5)  # three batches give up on it
            await kafka.settle(0.5)
            left = await admin.fetch("SELECT seq FROM outbox WHERE published_at IS NULL")
    finally:
        await admin.close()
    copies = Counter(r.event["id"] for r in kafka.records)
    assert copies == Counter({f"evt_{n}": 1 for n in range(10)})
    assert [row["seq"] for row in left] == [stuck, stuck + 1]  # retried, never parked


# -- finding 5: only a refusal of the record itself parks

@pytest.mark.parametrize("error", [
    kafka_errors.ClusterAuthorizationFailedError, kafka_errors.InvalidRequiredAcksError,
    kafka_errors.UnsupportedVersionError, kafka_errors.UnsupportedForMessageFormatError,
    kafka_errors.CorruptRecordException, kafka_errors.QuotaViolationError,
    kafka_errors.StaleControllerEpochError, kafka_errors.ListenerNotFound,
    kafka_errors.InvalidRequestError, kafka_errors.KafkaTimeoutError,
    kafka_errors.NotLeaderForPartitionError, kafka_errors.UnknownError,
    kafka_errors.KafkaConnectionError], ids=lambda e: e.__name__)
def test_cluster_client_and_network_errors_are_retried_not_parked(error: type[Exception]) -> None:
    assert not parkable(error())


@pytest.mark.parametrize("error", [
    kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidTopicError, kafka_errors.InvalidTimestampError,
    kafka_errors.PolicyViolationError, kafka_errors.TopicAuthorizationFailedError],
    ids=lambda e: e.__name__)
def test_refusals_of_the_record_itself_park_it(error: type[Exception]) -> None:
    assert parkable(error())


async def test_a_short_cluster_wide_refusal_parks_nothing_and_every_event_flows_after(
        settings: Settings, kafka: Kafka) -> None:
    topic = settings.topics.credit_note_events
    admin = await asyncpg.connect(settings.database_url)
    try:
        for n in range(10):
            await insert_row(admin, topic, f"in_{n}", f"evt_{n}_a")
        async with relay(settings) as (_, broker):
            broker.refuse_all_until = time.monotonic() + 1.5  # an ACL rollout
            await asyncio.sleep(2.0)
            for n in range(10):
                await insert_row(admin, topic, f"in_{n}", f"evt_{n}_b")
            await kafka.wait_for(lambda: len(kafka.records) >= 20, 10)
            await kafka.settle(0.5)
        parked = await admin.fetchval("SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL")
    finally:
        await admin.close()
    assert parked == 0
    for n in range(10):
        assert ids_in_partition_order(kafka, f"in_{n}".encode()) == [f"evt_{n}_a", f"evt_{n}_b"]


# -- finding 6: a partitioned leader's session is dropped by the server in about 30 s

async def test_the_relays_own_sessions_never_idle_out_and_notice_a_dead_peer_in_30_s(
        settings: Settings) -> None:
    admin = await asyncpg.connect(settings.database_url)
    try:
        async with relay(settings) as (leader, _):
            await wait_until(lambda: _true(leader.leading.is_set()), 10, "a leader")
            assert leader._alive is not None
            settings_of_alive = {name: await leader._alive.fetchval(f"SHOW {name}")
                                 for name in RELAY_SESSION_SETTINGS}
    finally:
        await admin.close()
    # over TCP the server reports what the socket has (0 would mean the OS default: 2 h)
    assert settings_of_alive == {
        "idle_session_timeout": "0", "tcp_keepalives_idle": "10",
        "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3",
        "tcp_user_timeout": "30000"}


# -- finding 7: rows held behind parked ones cost the batch read nothing

async def test_reading_a_batch_behind_many_held_rows_stays_fast(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("""
            INSERT INTO outbox (event_id, topic, key, type, payload, parked_at, park_error)
            SELECT 'p' || i, 't', 'in_' || i, 'x', '{}', now(), 'E: refused'
            FROM generate_series(1, 2000) i;
            INSERT INTO outbox (event_id, topic, key, type, payload, parked_at, held_behind,
                                park_error)
            SELECT 'w' || i, 't', 'in_' || (i % 2000 + 1), 'x', '{}', now(), i % 2000 + 1,
                   'waits behind seq ' || (i % 2000 + 1)
            FROM generate_series(1, 100000) i;
            INSERT INTO outbox (event_id, topic, key, type, payload)
            SELECT 'o' || i, 't', 'other_' || i, 'x', '{}' FROM generate_series(1, 500) i;
            ANALYZE outbox;
        """)
        timings = []
        for _ in range(3):
            started = time.monotonic()
            rows = await connection.fetch(_PENDING, 500)
            timings.append(time.monotonic() - started)
        assert len(rows) == 500 and all(row["behind"] is None for row in rows)
        assert min(timings) < 0.1, f"every batch read takes {min(timings):.2f} s"
    finally:
        await connection.close()


async def test_the_relay_holds_rows_found_waiting_and_retry_releases_them_in_order(
        settings: Settings, kafka: Kafka) -> None:
    """Rows already waiting (unparked) behind a parked row, as before migration 0012."""
    topic = settings.topics.credit_note_events
    admin = await asyncpg.connect(settings.database_url)
    try:
        root = await insert_row(admin, topic, "in_A", "evt_A0")
        await admin.execute("UPDATE outbox SET parked_at = now(), park_error = 'E: x'"
                            " WHERE seq = $1", root)
        for n in range(1, 31):
            await insert_row(admin, topic, "in_A", f"evt_A{n}")
        await insert_row(admin, topic, "in_B", "evt_B1")
        with structlog.testing.capture_logs():
            async with relay(settings, batch_size=8):
                await kafka.wait_for(lambda: len(kafka.records) >= 1, 10)

                async def all_held() -> bool:
                    return await admin.fetchval(
                        "SELECT count(*) FROM outbox WHERE held_behind = $1", root) == 30

                await wait_until(all_held, 10, "in_A's rows to be held")
                assert await unpark(settings.database_url, root) == [root]
                await kafka.wait_for(lambda: len(kafka.records) >= 32, 10)
                await kafka.settle(0.3)
    finally:
        await admin.close()
    assert ids_in_partition_order(kafka, b"in_A") == [f"evt_A{n}" for n in range(31)]
