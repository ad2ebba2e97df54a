"""The Kafka side of ``creditnotes run``: the broker, its subscribers, and their lag.

FastStream's public API builds the broker and starts subscribers registered
after the broker started (``persistent=False``, then ``start()``). Only
:func:`partition_lag` reaches past it, to the aiokafka consumer behind a
started subscriber: FastStream 0.7 offers no public way to read a consumer's
assignment and high-water marks.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable, Mapping
from typing import Any

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from service.adapters.kafka_producer import connection_options
from service.adapters.unavailable import Backoff
from service.entrypoints.consumer import (
    ATTEMPTS,
    Pipeline,
    decode_records,
    max_poll_interval_ms,
    parse_records,
)
from service.entrypoints.translators import Route
from service.settings import Settings


def broker(settings: Settings) -> KafkaBroker:
    """The broker the subscribers consume with (the service publishes with its own producer)."""
    return KafkaBroker(security=broker_security(settings),
                       graceful_timeout=settings.shutdown_timeout_seconds,
                       enable_idempotence=False, logger=None,
                       bootstrap_servers=settings.kafka_bootstrap_servers)


def broker_security(settings: Settings) -> BaseSecurity | None:
    options = connection_options(settings)
    context: ssl.SSLContext | None = options.get("ssl_context")
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return BaseSecurity(ssl_context=context, use_ssl=True)
    username = settings.kafka_sasl_username or ""
    password = options["sasl_plain_password"]
    use_ssl = protocol == "SASL_SSL"
    kinds = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256,
             "SCRAM-SHA-512": SASLScram512}
    kind = kinds[settings.kafka_sasl_mechanism or "PLAIN"]
    return kind(username, password, ssl_context=context, use_ssl=use_ssl)


async def start_subscribers(broker: KafkaBroker, table: Mapping[str, Route],
                            pipeline: Pipeline, settings: Settings) -> list[Any]:
    """Three thin batch subscribers, each its own consumer, handing records to the pipeline.

    - ``invoices`` alone, so a credit waiting for its invoice never holds up
      the topic the invoice arrives on;
    - ``refund-results`` alone, so an outcome waiting for its refund (a payment
      system faster than our commit) never holds up the credit note that
      brings the refund;
    - every topic that credits an invoice (commands and triggers) together,
      so their batches never wait on each other's invoice locks (the
      benchmark's finding: per-topic consumers on the same invoices
      serialised on the row locks and ran smaller batches).

    They are started together, after the broker (FastStream starts registered
    subscribers one by one, and every join rebalances the group).

    ``NACK_ON_ERROR``: the offsets are committed only after the handler returned,
    once per batch (never FastStream's default ``ACK_FIRST``, which auto-commits
    on receipt); an exception seeks every partition of the batch back to its
    first record, so they are all delivered again.
    """
    alone = (settings.topics.invoices, settings.topics.refund_results)
    groups = [*([topic for topic in table if topic == own] for own in alone),
              [topic for topic in table if topic not in alone]]
    # above the longest a batch can take (retry budget, wait, backoff, per record)
    poll_interval_ms = max_poll_interval_ms(
        Backoff(settings.retry_initial_backoff_seconds, settings.retry_max_backoff_seconds),
        ATTEMPTS, settings.not_found_retry_seconds, settings.batch_max_records)
    subscribers = []
    for topics in (group for group in groups if group):
        subscriber = broker.subscriber(
            *topics, batch=True, max_records=settings.batch_max_records,
            batch_timeout_ms=settings.batch_timeout_ms,
            group_id=settings.consumer_group, auto_offset_reset="earliest",
            ack_policy=AckPolicy.NACK_ON_ERROR, max_poll_interval_ms=poll_interval_ms,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms, persistent=False,
            # bounded memory: a batch holds at most what one fetch brought
            fetch_max_bytes=settings.kafka_fetch_max_bytes,
            max_partition_fetch_bytes=settings.kafka_max_partition_fetch_bytes,
            # FastStream neither decodes headers nor bodies: the pipeline judges each record
            parser=parse_records, decoder=decode_records,
        )

        async def consume(message: KafkaMessage) -> None:
            await pipeline.process_batch(message.raw_message)

        subscriber(consume)
        subscribers.append(subscriber)
    await asyncio.gather(*(subscriber.start() for subscriber in subscribers))
    return subscribers


async def partition_lag(subscribers: Iterable[Any]) -> list[tuple[str, int, int]]:
    """``(topic, partition, records not yet consumed)`` for every assigned partition.

    The one place that reaches into FastStream: a started Kafka subscriber's
    ``consumer`` attribute is its aiokafka consumer (None while stopped).
    """
    lag = []
    for subscriber in subscribers:
        consumer = getattr(subscriber, "consumer", None)
        if consumer is None:
            continue
        for partition in consumer.assignment():
            highwater = consumer.highwater(partition)
            if highwater is not None:
                position = await consumer.position(partition)
                lag.append((partition.topic, partition.partition, max(highwater - position, 0)))
    return lag
