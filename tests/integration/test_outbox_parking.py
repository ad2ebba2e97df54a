"""An outbox row the broker refuses for good is parked; its invoice waits, the rest flows
(issue 9, finding 2). Real PostgreSQL, real broker, the real ``creditnotes outbox`` command.

Before: the relay retried the refused row at the head of the queue for ever,
every other invoice's events waited, and the rows sent beside it went out again
every few seconds.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
import structlog

from service.settings import Settings
from tests.integration.outbox_support import insert_row, running_relay
from tests.support import (
    Kafka,
    Record,
    RunningService,
    cloudevent,
    creditnotes,
    fetch,
    fetchrow,
    invoice_data,
)

TOO_LARGE = 1_200_000  # over the relay's default 1 MiB, under the producer's 2 MiB


def copies(kafka: Kafka) -> Counter[str]:
    return Counter(record.event["id"] for record in kafka.records)


def of_key(kafka: Kafka, key: str) -> list[Record]:
    return sorted((r for r in kafka.records if r.key == key.encode()),
                  key=lambda r: (r.topic, r.partition, r.offset))


async def metrics(service: RunningService) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", service.service.http_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    return text


async def test_a_refused_event_is_parked_its_invoice_waits_others_flow_and_retry_publishes(
        settings: Settings, kafka: Kafka) -> None:
    topics = settings.topics
    for invoice_id in ("in_A001", "in_B001"):
        await kafka.publish(topics.invoices, cloudevent("invoice.finalized",
                                                        invoice_data(invoice_id)))
    admin = await asyncpg.connect(settings.database_url)
    try:  # an event larger than the broker takes (written before the wire limits, say)
        parked_seq = await insert_row(admin, topics.credit_note_events, "in_A001", "evt_big",
                                      pad=TOO_LARGE)
    finally:
        await admin.close()
    with structlog.testing.capture_logs() as logs:
        async with RunningService(settings) as service:
            for invoice_id in ("in_A001", "in_B001"):
                await kafka.publish(topics.credit_note_commands, cloudevent(
                    "credit_note.issue", {"invoice_id": invoice_id, "amount": 1_000}))
            [issued_b] = await kafka.expect(topics.credit_note_events, "credit_note.issued")
            assert issued_b.key == b"in_B001"
            waiting = await fetchrow(settings, "SELECT seq, published_at, held_behind,"
                                     " park_error FROM outbox"
                                     " WHERE key = 'in_A001' AND type = 'credit_note.issued'")
            assert waiting is not None and waiting["published_at"] is None
            # it waits (held, out of the relay's scan); it is not itself refused
            assert waiting["held_behind"] == parked_seq
            assert waiting["park_error"] == f"waits behind seq {parked_seq}"
            await kafka.settle(1.5)
            assert of_key(kafka, "in_A001") == []  # order per invoice: nothing overtakes
            assert "creditnotes_outbox_parked 1.0" in await metrics(service)
    [parked_line] = [line for line in logs if line["event"] == "outbox event parked"]
    assert (parked_line["seq"], parked_line["key"], parked_line["error"]) == (
        parked_seq, "in_A001", "MessageSizeTooLargeError")
    assert parked_line["size"] > TOO_LARGE

    listed = await creditnotes(settings, "outbox", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if f"{parked_seq} " in line)
    assert "in_A001" in row and "MessageSizeTooLargeError" in listed.stdout
    cells = [cell.strip() for cell in row.strip().strip("│").split("│")]
    assert cells[-1] == "1"  # waiting: the credit_note.issued held behind it

    # the cause is fixed (a larger limit), the row is still parked until ops retry it
    fixed = settings.model_copy(update={"outbox_max_event_bytes": 2_000_000})
    async with RunningService(fixed):
        await kafka.settle(1.0)
        assert of_key(kafka, "in_A001") == []
        retried = await creditnotes(fixed, "outbox", "retry", "--seq", str(parked_seq))
        assert retried.returncode == 0, retried.stdout + retried.stderr
        assert f"un-parked 1 row(s) (seq {parked_seq}) and released the 1 held" in \
            " ".join(retried.stdout.split())
        await kafka.wait_for(lambda: len(of_key(kafka, "in_A001")) == 2)
        await kafka.settle(1.0)
    first, second = of_key(kafka, "in_A001")
    assert first.event["id"] == "evt_big" and second.event["type"] == "credit_note.issued"
    assert set(copies(kafka).values()) == {1}, "every event published exactly once"
    assert await fetch(settings, "SELECT seq FROM outbox WHERE published_at IS NULL") == []
    assert (await creditnotes(settings, "outbox", "list")).stdout.strip() == \
        "no parked outbox rows"


async def test_refusals_in_one_batch_park_only_their_rows_and_rows_sent_beside_them_go_once(
        settings: Settings, kafka: Kafka) -> None:
    events = settings.topics.credit_note_events
    admin = await asyncpg.connect(settings.database_url)
    try:
        rows = {name: await insert_row(admin, topic, key, f"evt_{name}", pad)
                for name, topic, key, pad in [
                    ("a1", events, "in_A", 0),
                    ("a2", events, "in_A", 3_000_000),  # over the producer's max_request_size
                    ("b1", events, "in_B", 0),
                    ("c1", events, "in_C", 1_600_000),  # over this relay's limit only
                    ("e1", "not a topic!", "in_E", 0),  # no broker takes this name
                    ("a3", events, "in_A", 0),
                    ("c2", events, "in_C", 0),
                    ("e2", events, "in_E", 0),
                    ("b2", events, "in_B", 0),
                    ("d1", events, None, 0)]}
        async with running_relay(settings, max_event_bytes=1_500_000):
            await kafka.wait_for(lambda: len(kafka.records) >= 4)
            await kafka.settle(1.5)  # a dozen polls: nothing is sent again
        assert copies(kafka) == Counter({"evt_a1": 1, "evt_b1": 1, "evt_b2": 1, "evt_d1": 1})
        assert await parked(admin) == {rows["a2"]: "MessageSizeTooLargeError",
                                       rows["c1"]: "MessageSizeTooLargeError",
                                       rows["e1"]: "InvalidTopicError"}
        assert await unpublished(admin) == {rows[name] for name in
                                            ("a2", "c1", "e1", "a3", "c2", "e2")}

        # ops raise the limit and retry everything: c1 and c2 flow, in order; a2 is too
        # large for the producer itself and e1's topic is still no topic, so they are
        # parked again (once each) and a3, e2 keep waiting
        async with running_relay(settings, max_event_bytes=8_000_000):
            retried = await creditnotes(settings, "outbox", "retry", "--all")
            assert retried.returncode == 0, retried.stdout + retried.stderr
            assert "un-parked 3 row(s)" in retried.stdout
            await kafka.wait_for(lambda: copies(kafka)["evt_c2"] == 1)
            await kafka.settle(1.0)
        assert [r.event["id"] for r in of_key(kafka, "in_C")] == ["evt_c1", "evt_c2"]
        assert not {"evt_a2", "evt_a3", "evt_e1", "evt_e2"} & set(copies(kafka))
        assert set(copies(kafka).values()) == {1}
        errors = {row["seq"]: row["park_error"] for row in await admin.fetch(
            "SELECT seq, park_error FROM outbox WHERE parked_at IS NOT NULL"
            " AND held_behind IS NULL")}
        assert set(errors) == {rows["a2"], rows["e1"]}
        assert "when serialized" in errors[rows["a2"]]  # aiokafka's own refusal this time
        assert await unpublished(admin) == {rows[name] for name in ("a2", "e1", "a3", "e2")}
    finally:
        await admin.close()


async def parked(connection: asyncpg.Connection) -> dict[int, str]:
    return {row["seq"]: row["park_error"].split(":")[0] for row in await connection.fetch(
        "SELECT seq, park_error FROM outbox WHERE parked_at IS NOT NULL"
        " AND held_behind IS NULL")}


async def unpublished(connection: asyncpg.Connection) -> set[int]:
    return {row["seq"] for row in await connection.fetch(
        "SELECT seq FROM outbox WHERE published_at IS NULL")}
