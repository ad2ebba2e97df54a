"""Order per key on the output topic equals outbox order: generated events over several
relay batches, with slow acks and records the broker answers with a retriable error once.

The relay hands a key's next record to the producer only once the previous one
is acked (docs/reliability.md; service/adapters/kafka_producer.py says why
pipelining a key's records is not safe without idempotence). A consumer that
drops ids it has seen (at-least-once on the wire) must see each key's events in
the order they were written to the outbox.
"""

from __future__ import annotations

import uuid
from collections import defaultdict

import asyncpg
import pytest
from aiokafka import errors as kafka_errors
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.settings import Settings
from tests.integration.outbox_support import insert_row
from tests.integration.test_relay_faults import relay
from tests.support import Kafka

pytestmark = pytest.mark.integration

KEYS = ["in_A", "in_B", "in_C", None]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[str | None], set[int], float, int]:
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=2, max_size=24))
    failing = draw(st.sets(st.integers(0, len(keys) - 1), max_size=4))
    ack_delay = draw(st.sampled_from([0.0, 0.01, 0.05]))
    batch_size = draw(st.integers(1, 6))
    return keys, failing, ack_delay, batch_size


@hypothesis_settings(max_examples=6, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
async def test_each_keys_events_reach_the_topic_in_outbox_order(
        settings: Settings, kafka: Kafka,
        scenario: tuple[list[str | None], set[int], float, int]) -> None:
    keys, failing, ack_delay, batch_size = scenario
    topic = settings.topics.credit_note_events
    run = uuid.uuid4().hex[:8]
    ids = [f"evt_{run}_{n:02d}" for n in range(len(keys))]
    admin = await asyncpg.connect(settings.database_url)
    try:
        async with relay(settings, batch_size=batch_size) as (_, broker):
            broker.ack_delay = ack_delay
            for n in failing:  # the broker's answer once: a timeout, retried by the relay
                marker = ids[n].encode()
                broker.answers[marker] = kafka_errors.KafkaTimeoutError
                broker.once.add(marker)
            for key, event_id in zip(keys, ids, strict=True):
                await insert_row(admin, topic, key, event_id)

            def seen() -> set[str]:
                return {r.event["id"] for r in kafka.records if r.event["id"] in ids}

            await kafka.wait_for(lambda: seen() == set(ids), 30)
    finally:
        await admin.close()

    published: dict[str | None, list[str]] = defaultdict(list)
    for record in sorted(kafka.records, key=lambda r: (r.partition, r.offset)):
        event_id = record.event["id"]
        key = record.key.decode() if record.key is not None else None
        if event_id in ids and event_id not in published[key]:  # a consumer drops repeats
            published[key].append(event_id)
    written: dict[str | None, list[str]] = defaultdict(list)
    for key, event_id in zip(keys, ids, strict=True):
        written[key].append(event_id)
    for key in written:
        if key is None:  # Kafka keeps no order for key-less records: only that all arrive
            assert sorted(published[None]) == sorted(written[None])
        else:
            assert published[key] == written[key], key
