"""One relay publishes at a time, also when the leader's lock connection dies (issue 9,
finding 3). Two relays, as two replicas run them, on one real database and broker.

Before: the leader took its advisory lock once and never looked again; after
``pg_terminate_backend`` on its lock connection the other replica took the
lock while the first kept publishing, and 53 of 100 events went out twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import asyncpg

from service.adapters.outbox_relay import OutboxRelay
from service.settings import Settings
from tests.integration.outbox_support import insert_row, running_relay
from tests.support import Kafka

LOCK_KEY = 0x6F757462
ALIVE_CLASS = 0x6F757463


async def leader_pid(admin: asyncpg.Connection) -> int | None:
    pid: int | None = await admin.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = $1"
        " AND objsubid = 1 AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        LOCK_KEY)
    return pid


async def wait_until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_leader_whose_lock_connection_dies_stops_at_once_and_the_other_takes_over(
        settings: Settings) -> None:
    admin = await asyncpg.connect(settings.database_url)
    try:
        async with running_relay(settings) as first, running_relay(settings) as second:
            async def one_leads() -> bool:
                return first.leading.is_set() != second.leading.is_set()

            await wait_until(one_leads, 10, "one relay to lead")
            leader, follower = (first, second) if first.leading.is_set() else (second, first)
            pid = await leader_pid(admin)
            assert pid is not None
            killed_at = time.monotonic()
            await admin.execute("SELECT pg_terminate_backend($1)", pid)

            async def left() -> bool:
                return not leader.leading.is_set()

            await wait_until(left, 2, "the old leader to leave its loop")
            assert time.monotonic() - killed_at < 1.0, "it leaves at once, not at its next poll"

            async def took_over() -> bool:
                return follower.leading.is_set()

            await wait_until(took_over, 10, "the other relay to lead")
            assert not leader.leading.is_set()
    finally:
        await admin.close()


async def test_killing_the_leaders_lock_connection_mid_stream_publishes_every_event_once(
        settings: Settings, kafka: Kafka) -> None:
    topic = settings.topics.credit_note_events
    total = 600
    admin = await asyncpg.connect(settings.database_url)
    writer = await asyncpg.connect(settings.database_url)
    try:
        # small batches, so that many are in flight when a connection dies
        async with running_relay(settings, batch_size=20) as first, \
                running_relay(settings, batch_size=20) as second:
            relays: list[OutboxRelay] = [first, second]

            async def write() -> None:
                for n in range(total):
                    await insert_row(writer, topic, f"in_{n % 25:02d}", f"evt_{n:04d}", pad=200)
                    if n % 10 == 9:
                        await asyncio.sleep(0.01)

            writing = asyncio.create_task(write())
            kills = 0
            for threshold in (100, 250, 400, 520):
                async def reached(at: int = threshold) -> bool:
                    published: int = await admin.fetchval(
                        "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
                    return published >= at

                await wait_until(reached, 60, f"{threshold} events published")
                pid = await leader_pid(admin)
                if pid is not None:
                    await admin.execute("SELECT pg_terminate_backend($1)", pid)
                    kills += 1
            await writing

            async def drained() -> bool:
                left: int = await admin.fetchval(
                    "SELECT count(*) FROM outbox WHERE published_at IS NULL")
                return left == 0

            await wait_until(drained, 90, "every row to be published")
            await kafka.wait_for(lambda: len(kafka.records) >= total, 60)
            await kafka.settle(1.0)
            leaders = sum(relay.leading.is_set() for relay in relays)
        copies = Counter(record.event["id"] for record in kafka.records)
        assert len(copies) == total, "nothing lost"
        twice = {event_id: count for event_id, count in copies.items() if count > 1}
        assert twice == {}, f"{len(twice)} events published more than once"
        assert kills >= 3 and leaders == 1
        # and per invoice, in the order written
        for n in range(25):
            key = f"in_{n:02d}".encode()
            ids = [r.event["id"] for r in sorted(
                (r for r in kafka.records if r.key == key), key=lambda r: (r.partition, r.offset))]
            assert ids == sorted(ids), key
    finally:
        await writer.close()
        await admin.close()


async def test_a_new_leader_waits_out_the_fence_of_a_live_former_leader_but_not_of_a_dead_one(
        settings: Settings, kafka: Kafka) -> None:
    topic = settings.topics.credit_note_events
    admin = await asyncpg.connect(settings.database_url)
    try:
        # a former leader, alive (its "alive" lock held), fenced for a minute
        await admin.execute("SELECT pg_advisory_lock($1, $2)", ALIVE_CLASS, 12345)
        await admin.execute("UPDATE outbox_relay_fence SET holder = '12345',"
                            " fence_until = now() + interval '60 seconds'")
        await insert_row(admin, topic, "in_1", "evt_fenced")
        async with running_relay(settings):
            await kafka.settle(1.5)
            assert kafka.records == [], "nothing is published while a live leader is fenced"
            await admin.execute("UPDATE outbox_relay_fence SET fence_until = NULL")
            await kafka.wait_for(lambda: len(kafka.records) == 1, 10)

        # the same fence, but its relay is gone (crashed: its sessions ended)
        await admin.execute("SELECT pg_advisory_unlock($1, $2)", ALIVE_CLASS, 12345)
        await admin.execute("UPDATE outbox_relay_fence SET holder = '12345',"
                            " fence_until = now() + interval '60 seconds'")
        await insert_row(admin, topic, "in_1", "evt_after_crash")
        started = time.monotonic()
        async with running_relay(settings):
            await kafka.wait_for(lambda: len(kafka.records) == 2, 10)
            assert time.monotonic() - started < 5, "a dead leader's fence costs no wait"
        assert [r.event["id"] for r in kafka.records] == ["evt_fenced", "evt_after_crash"]
    finally:
        await admin.close()
