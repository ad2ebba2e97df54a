"""``dlq replay`` on the real broker and PostgreSQL: it cannot be made to forge, to send a
record twice, or to mistake a new dead letter for an old one (issues 15.1 and 10.2)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from service.adapters.replay_audit import Claim, ReplayAudit
from service.devtools.devstack import EmbeddedKafka, create_topics
from service.entrypoints import dlq
from service.entrypoints.ops_context import OpsError
from service.settings import Settings
from tests.support import Kafka, cloudevent, fetch

pytestmark = pytest.mark.integration


def dead_letter_headers(original_topic: str, *, partition: str = "0", offset: str = "7",
                        reason: str = "invoice_not_found", failed_at: str | None = None,
                        extra: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    failed_at = failed_at or datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return [("content-type", b"application/cloudevents+json"), *(extra or []),
            *((name, value.encode()) for name, value in {
                "dlq.original.topic": original_topic, "dlq.original.partition": partition,
                "dlq.original.offset": offset, "dlq.error.reason": reason,
                "dlq.error.class": "InvoiceNotFound", "dlq.attempts": "3",
                "dlq.failed_at": failed_at}.items())]


def issue(invoice_id: str = "in_1001", amount: int = 2_500) -> dict[str, Any]:
    return cloudevent("credit_note.issue", {"invoice_id": invoice_id, "amount": amount},
                      id_=f"cmd-{uuid.uuid4().hex[:8]}")


async def records_on(bootstrap_servers: str, topic: str) -> list[bytes | None]:
    """Every value now on ``topic`` (read until the broker has nothing more)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        values: list[bytes | None] = []
        while batches := await consumer.getmany(timeout_ms=700):
            values += [record.value for batch in batches.values() for record in batch]
        return values
    finally:
        await consumer.stop()


async def replay(settings: Settings, topic: str, **options: Any) -> tuple[dlq.ReplaySummary, str]:
    out = io.StringIO()
    summary = await dlq.replay(settings, topic, dlq.ReplayOptions(**options), out)
    return summary, out.getvalue()


async def test_a_planted_refund_request_is_refused_not_published(
        settings: Settings, kafka: Kafka) -> None:
    returns, refunds = settings.topics.returns, settings.topics.refund_requests
    forged = cloudevent("refund.requested", {"invoice_id": "in_1001", "amount": 99_999_999,
                                             "customer_id": "cus_attacker"})
    await kafka.publish(f"{returns}.dlq", forged, key="in_1001",
                        headers=dead_letter_headers(refunds))

    for force in (False, True):
        summary, said = await replay(settings, f"{returns}.dlq", force=force)
        assert (summary.refused, summary.republished) == (1, 0)
        assert "REFUSED" in said and refunds in said

    await kafka.settle(1.0)
    assert kafka.on(refunds) == []
    assert await records_on(settings.kafka_bootstrap_servers, returns) == []
    assert await fetch(settings, "SELECT * FROM dlq_replays") == []


async def test_replay_refuses_a_topic_that_is_not_an_input_dead_letter_topic(
        settings: Settings) -> None:
    for topic in (settings.topics.returns, f"{settings.topics.refund_requests}.dlq"):
        with pytest.raises(OpsError) as refused:
            await replay(settings, topic)
        assert refused.value.exit_code == dlq.EXIT_NOT_DEAD_LETTER_TOPIC


async def test_bad_headers_refuse_their_record_before_any_send_and_the_rest_goes(
        settings: Settings, kafka: Kafka) -> None:
    commands = settings.topics.credit_note_commands
    plants = {
        "in_2001": dead_letter_headers(commands, partition="one"),
        "in_2002": dead_letter_headers(commands, offset="7; DROP"),
        "in_2003": [*dead_letter_headers(commands),
                    ("dlq.original.topic", settings.topics.refund_requests.encode())],
        "in_2004": dead_letter_headers(commands, failed_at="yesterday"),
        "in_2005": dead_letter_headers(commands),  # the one good record
    }
    for invoice_id, headers in plants.items():
        await kafka.publish(f"{commands}.dlq", issue(invoice_id), key=invoice_id,
                            headers=headers)

    summary, said = await replay(settings, f"{commands}.dlq")

    assert (summary.refused, summary.republished) == (4, 1)
    assert "dlq.original.partition is not a non-negative integer" in said
    assert "dlq.original.offset is not a non-negative integer" in said
    assert "dlq.original.topic appears 2 times" in said
    assert "dlq.failed_at is not an ISO 8601 time" in said
    sent = await records_on(settings.kafka_bootstrap_servers, commands)
    assert [json.loads(value or b"")["data"]["invoice_id"] for value in sent] == ["in_2005"]
    rows = await fetch(settings, "SELECT record_key, state FROM dlq_replays")
    assert [(row["record_key"], row["state"]) for row in rows] == [("in_2005", "sent")]


async def test_a_send_whose_confirmation_failed_is_never_sent_again_without_force(
        settings: Settings, kafka: Kafka) -> None:
    """The audit row is claimed before the send: a failure after the send (here PostgreSQL
    refuses the confirmation) leaves it 'maybe sent', and the next runs do not send again."""
    commands = settings.topics.credit_note_commands
    await kafka.publish(f"{commands}.dlq", issue("in_3001"), key="in_3001",
                        headers=dead_letter_headers(commands))
    connection = await asyncpg.connect(settings.database_url)
    try:
        await connection.execute("""
            CREATE FUNCTION refuse_confirm() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'the database went away'; END $$;
            CREATE TRIGGER refuse_confirm BEFORE UPDATE ON dlq_replays
                FOR EACH ROW WHEN (NEW.state = 'sent') EXECUTE FUNCTION refuse_confirm();""")
        with pytest.raises(asyncpg.RaiseError):
            await replay(settings, f"{commands}.dlq")
        await connection.execute("DROP TRIGGER refuse_confirm ON dlq_replays")
    finally:
        await connection.close()
    assert len(await records_on(settings.kafka_bootstrap_servers, commands)) == 1
    [row] = await fetch(settings, "SELECT state FROM dlq_replays")
    assert row["state"] == "claimed"

    summary, said = await replay(settings, f"{commands}.dlq")
    assert (summary.held, summary.republished) == (1, 0)
    assert "maybe sent already" in said
    assert len(await records_on(settings.kafka_bootstrap_servers, commands)) == 1

    summary, _ = await replay(settings, f"{commands}.dlq", force=True)
    assert summary.republished == 1
    [row] = await fetch(settings, "SELECT state FROM dlq_replays")
    assert row["state"] == "sent"
    summary, _ = await replay(settings, f"{commands}.dlq", force=True)
    assert (summary.already_replayed, summary.republished) == (1, 0)
    assert len(await records_on(settings.kafka_bootstrap_servers, commands)) == 2


async def test_a_record_claimed_by_another_run_is_left_to_it(
        settings: Settings, kafka: Kafka) -> None:
    commands = settings.topics.credit_note_commands
    headers = dead_letter_headers(commands)
    event = issue("in_4001")
    await kafka.publish(f"{commands}.dlq", event, key="in_4001", headers=headers)
    planted = dlq.DeadLetter(f"{commands}.dlq", 0, 0, 0, b"in_4001",
                             json.dumps(event).encode(), tuple(headers))
    connection = await asyncpg.connect(settings.database_url)
    try:
        other = ReplayAudit(connection, run="other-run", operator="someone")
        claimed = await other.claim([Claim(planted.digest, planted.content_digest,
                                           f"{commands}.dlq", 0, 0, commands, 0, 7,
                                           "invoice_not_found", "in_4001")])
        assert claimed.held == {planted.digest}
    finally:
        await connection.close()
    summary, said = await replay(settings, f"{commands}.dlq")
    assert (summary.held, summary.republished) == (1, 0)
    assert "other-run" in said
    assert await records_on(settings.kafka_bootstrap_servers, commands) == []


async def test_a_new_dead_letter_after_a_broker_reset_is_not_taken_for_an_old_one(
        settings: Settings, kafka: Kafka, tmp_path: Path) -> None:
    commands = settings.topics.credit_note_commands
    old_event, old_headers = issue("in_5001"), dead_letter_headers(commands)
    await kafka.publish(f"{commands}.dlq", old_event, key="in_5001", headers=old_headers)
    summary, _ = await replay(settings, f"{commands}.dlq")
    assert summary.republished == 1

    fresh = EmbeddedKafka(log_file=tmp_path / "tansu.log")  # the broker restarted: empty
    fresh.start()
    try:
        reset = settings.model_copy(update={"kafka_bootstrap_servers": fresh.bootstrap_servers})
        await create_topics(fresh.bootstrap_servers, reset.topics.all())
        async with Kafka(reset) as again:
            await asyncio.sleep(0.002)  # a later dlq.failed_at, to the microsecond
            await again.publish(f"{commands}.dlq", issue("in_5001"), key="in_5001",
                                headers=dead_letter_headers(commands))
            summary, said = await replay(reset, f"{commands}.dlq")
            assert (summary.republished, summary.already_replayed) == (1, 0), said
            # the old dead letter, byte for byte, at a new offset: still known
            await again.publish(f"{commands}.dlq", old_event, key="in_5001",
                                headers=old_headers)
            summary, said = await replay(reset, f"{commands}.dlq")
            assert (summary.republished, summary.already_replayed) == (0, 2), said
        assert len(await records_on(fresh.bootstrap_servers, commands)) == 1
    finally:
        fresh.stop()
    rows = await fetch(settings, "SELECT dlq_partition, dlq_offset, dead_letter_digest "
                                 "FROM dlq_replays")
    assert len(rows) == 2
    assert {(row["dlq_partition"], row["dlq_offset"]) for row in rows} == {
        (rows[0]["dlq_partition"], 0)}  # same place on both brokers, two dead letters


async def test_replay_runs_as_the_application_role_claiming_confirming_and_reclaiming(
        settings: Settings, kafka: Kafka) -> None:
    commands = settings.topics.credit_note_commands
    events = {invoice_id: issue(invoice_id) for invoice_id in ("in_8001", "in_8002")}
    headers = {invoice_id: dead_letter_headers(commands) for invoice_id in events}
    for invoice_id, event in events.items():
        await kafka.publish(f"{commands}.dlq", event, key=invoice_id, headers=headers[invoice_id])
    maybe_sent = dlq.DeadLetter(f"{commands}.dlq", 0, 0, 0, b"in_8002",
                                json.dumps(events["in_8002"]).encode(), tuple(headers["in_8002"]))
    user = f"cn_app_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(settings.database_url)
    try:
        await admin.execute(f'CREATE ROLE "{user}" LOGIN IN ROLE creditnotes_app')
        await ReplayAudit(admin, run="crashed-run", operator="someone").claim([Claim(
            maybe_sent.digest, maybe_sent.content_digest, f"{commands}.dlq", 0, 0, commands, 0,
            7, "invoice_not_found", "in_8002")])
        host = settings.database_url.split("@", 1)[1]
        as_app = settings.model_copy(update={"database_url": f"postgresql://{user}@{host}"})
        summary, said = await replay(as_app, f"{commands}.dlq")
        assert (summary.republished, summary.held) == (1, 1), said
        summary, said = await replay(as_app, f"{commands}.dlq", force=True)
        assert (summary.republished, summary.already_replayed) == (1, 1), said
    finally:
        await admin.execute(f'DROP OWNED BY "{user}"; DROP ROLE IF EXISTS "{user}"')
        await admin.close()
    rows = await fetch(settings, "SELECT record_key, state, sent_at IS NOT NULL AS stamped "
                                 "FROM dlq_replays ORDER BY record_key")
    assert [tuple(row) for row in rows] == [("in_8001", "sent", True), ("in_8002", "sent", True)]


@pytest.mark.parametrize("case", ["nul-in-key", "reason-too-big-for-an-index",
                                  "partition-beyond-int32"])
async def test_one_planted_dead_letter_does_not_stop_the_replay_of_the_others(
        settings: Settings, kafka: Kafka, case: str) -> None:
    """Before, each of these failed the chunk's one-statement claim: the run, and every
    later run, ended with exit 3 and nothing of the topic was ever replayed again."""
    commands = settings.topics.credit_note_commands
    key, bad = "in_9001", {}
    if case == "nul-in-key":
        key = "in_9001\x00"
    elif case == "reason-too-big-for-an-index":
        bad["reason"] = uuid.uuid4().hex * 200  # 6,400 bytes, over btree's 2,704
    else:
        bad["partition"] = "99999999999"  # digits, but not an integer column's
    await kafka.publish(f"{commands}.dlq", issue("in_9001"), key=key,
                        headers=dead_letter_headers(commands, **bad))
    good = issue("in_9002")
    await kafka.publish(f"{commands}.dlq", good, key="in_9002",
                        headers=dead_letter_headers(commands))

    first, said = await replay(settings, f"{commands}.dlq")
    second, said_again = await replay(settings, f"{commands}.dlq")

    sent = [json.loads(value or b"")["data"]["invoice_id"]
            for value in await records_on(settings.kafka_bootstrap_servers, commands)]
    if case == "nul-in-key":  # a key is any bytes: recorded escaped, and replayed
        assert sorted(sent) == ["in_9001", "in_9002"], said
        keys = {row["record_key"] for row in await fetch(settings,
                                                         "SELECT record_key FROM dlq_replays")}
        assert keys == {"in_9001\\x00", "in_9002"}
    else:
        assert sent == ["in_9002"], said
        assert (first.refused, first.republished) == (1, 1), said
        assert "REFUSED, never replayed: header dlq." in said
    assert (second.republished, second.already_replayed) == (0, len(sent)), said_again


async def test_a_row_the_table_refuses_is_that_records_refusal_not_the_chunks(
        settings: Settings) -> None:
    """The last line of defence behind the header checks: a claim PostgreSQL will not
    store (here a NUL in the key) refuses that one record; the rest are claimed."""
    connection = await asyncpg.connect(settings.database_url)
    try:
        audit = ReplayAudit(connection, run="this-run", operator="someone")

        def claim(digest: str, key: str, partition: int = 0) -> Claim:
            return Claim(digest, f"content-{digest}", "t.dlq", 0, 0, "t", partition, 7,
                         "invoice_not_found", key)

        claimed = await audit.claim([claim("a", "in_1"), claim("b", "in_2\x00"),
                                     claim("c", "in_3"), claim("d", "in_4", 2**31)])
        assert claimed.held == {"a", "c"}
        assert claimed.refused.keys() == {"b", "d"}
        assert "CharacterNotInRepertoireError" in claimed.refused["b"]
    finally:
        await connection.close()
    rows = await fetch(settings, "SELECT dead_letter_digest FROM dlq_replays")
    assert sorted(row["dead_letter_digest"] for row in rows) == ["a", "c"]


async def test_a_record_dead_lettered_twice_is_replayed_once_and_its_copy_is_then_held(
        settings: Settings, kafka: Kafka) -> None:
    """Two dead letters of one record (a redelivery: another dlq.failed_at): one content.
    Before, one run sent both, and a copy written before the replay went again later."""
    commands = settings.topics.credit_note_commands
    event, now = issue("in_9101"), datetime.now(UTC)
    for shift in (0, 1):
        await kafka.publish(f"{commands}.dlq", event, key="in_9101", headers=dead_letter_headers(
            commands, failed_at=(now + timedelta(seconds=shift)).isoformat()))

    first, said = await replay(settings, f"{commands}.dlq")
    assert (first.republished, first.held) == (1, 1), said
    assert "this run already replayed the same record" in said
    second, said = await replay(settings, f"{commands}.dlq")
    assert (second.republished, second.already_replayed, second.held) == (0, 1, 1), said
    assert "replayed before and dead-lettered again" in said
    sent = await records_on(settings.kafka_bootstrap_servers, commands)
    assert [json.loads(value or b"")["id"] for value in sent] == [event["id"]]


async def test_a_record_that_failed_again_is_held_whatever_the_service_clock_said(
        settings: Settings, kafka: Kafka) -> None:
    """Before, "failed again after the replay" compared dlq.failed_at (the service's clock)
    with replayed_at (PostgreSQL's): a service 5 s behind looped. No clock is compared now."""
    commands = settings.topics.credit_note_commands
    event = issue("in_9201")
    await kafka.publish(f"{commands}.dlq", event, key="in_9201",
                        headers=dead_letter_headers(commands))
    first, _ = await replay(settings, f"{commands}.dlq")
    assert first.republished == 1
    lagging = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    await kafka.publish(f"{commands}.dlq", event, key="in_9201",
                        headers=dead_letter_headers(commands, offset="8", failed_at=lagging))
    second, said = await replay(settings, f"{commands}.dlq")
    assert (second.republished, second.held) == (0, 1), said
    forced, said = await replay(settings, f"{commands}.dlq", force=True)
    assert forced.republished == 1, said


async def test_of_two_forced_reclaims_of_a_maybe_sent_record_only_one_wins(
        settings: Settings) -> None:
    """--force re-claims a 'maybe sent' row only if the run seen when deciding still holds
    it: before, two concurrent forced runs both took it, and both sent it."""
    connections = [await asyncpg.connect(settings.database_url) for _ in range(2)]
    try:
        crashed = ReplayAudit(connections[0], run="crashed-run", operator="someone")
        await crashed.claim([Claim("d", "c", "t.dlq", 0, 0, "t", 0, 7, "invoice_not_found",
                                   "in_1")])
        one, two = (ReplayAudit(connection, run=f"forced-{n}", operator="someone")
                    for n, connection in enumerate(connections))
        taken = await asyncio.gather(one.claim([], reclaim={"d": "crashed-run"}),
                                     two.claim([], reclaim={"d": "crashed-run"}))
        assert sorted(len(claimed.held) for claimed in taken) == [0, 1]
        assert (await two.claim([], reclaim={"d": "crashed-run"})).held == set()
    finally:
        for connection in connections:
            await connection.close()


async def test_a_dry_run_line_says_the_verdict_before_any_record_field(
        settings: Settings, kafka: Kafka) -> None:
    """Before, a key 'in_1  would replay to <topic>' + padding made a REFUSED line read as
    'would replay': the record's fields came first, unquoted."""
    commands = settings.topics.credit_note_commands
    fake = f"in_1  would replay to {commands}" + " " * 400
    await kafka.publish(f"{commands}.dlq", issue("in_1"), key=fake,
                        headers=dead_letter_headers(settings.topics.refund_requests))
    _, said = await replay(settings, f"{commands}.dlq", dry_run=True)
    [line] = said.splitlines()
    assert re.match(r"[0-9]+:0  REFUSED, never replayed: header dlq.original.topic", line), line
    key = line.split("  key=", 1)[1]
    assert key.startswith('"in_1  would replay to') and key.endswith('chars)"')
    assert len(line) < 500


async def test_list_and_replay_end_although_someone_keeps_writing(
        settings: Settings, kafka: Kafka) -> None:
    """Before, a partition ended only after two empty polls: a writer every 200 ms kept
    ``dlq list`` and ``dlq replay`` reading for ever. Now: up to the end seen at the start."""
    commands = settings.topics.credit_note_commands
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            await kafka.publish(f"{commands}.dlq", issue("in_1"), key="in_1",
                                headers=dead_letter_headers(settings.topics.refund_requests))
            await asyncio.sleep(0.2)

    task = asyncio.create_task(writer())
    try:
        await asyncio.sleep(1)
        listed = io.StringIO()
        count = await asyncio.wait_for(dlq.list_records(
            settings, f"{commands}.dlq", dlq.Filters(), listed), 20)
        assert count >= 1
        summary, _ = await asyncio.wait_for(replay(settings, f"{commands}.dlq", dry_run=True), 20)
        assert summary.refused >= count
    finally:
        stop.set()
        await task
