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
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import KafkaError
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

log = structlog.get_logger(__name__)

#: The group protocols every subscriber offers, preferred first: range aligns the shards
#: (:func:`start_subscribers`), round robin is what replicas of earlier releases offer.
ASSIGNORS = (RangePartitionAssignor, RoundRobinPartitionAssignor)


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


class Shard(ConsumerRebalanceListener):  # type: ignore[misc]
    """One batch subscriber's batch in flight, and its rebalance listener.

    The handler marks the batch busy from its first line to the offset commit
    after the transaction (:func:`start_subscribers`). When the group takes
    this consumer's partitions away, aiokafka calls :meth:`on_partitions_revoked`
    in the consumer's coordination task before it rejoins; it waits until the
    batch and its offset commit are done, so the next owner starts after them
    instead of redoing the batch beside it.

    It cannot deadlock with that commit (aiokafka 0.14, group_coordinator.py):
    the callback runs in ``_on_join_prepare``, before the JoinGroup is sent,
    with the old assignment and generation still current and the heartbeat
    task still running ("as it can commit offsets"); ``consumer.commit()``
    needs only a known coordinator and ``_commit_lock``, which the
    coordination task holds only to auto-commit (off here). The broker accepts
    a current generation's commit while the group prepares to rebalance.

    The wait is bounded by ``wait_s`` (the session timeout: the group already
    waits that long for a member that died): a batch may itself wait on the
    group, e.g. a credit waiting for an invoice the ``invoices`` consumer
    cannot fetch while the group rebalances. Past the bound the rebalance goes
    on, the batch's commit fails (logged), and the next owner redelivers its
    records, which are deduplicated (``processed_messages``): slower, never
    wrong.
    """

    def __init__(self, name: str, wait_s: float) -> None:
        self.name = name
        self.wait_s = wait_s
        self.idle = asyncio.Event()
        self.idle.set()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if self.idle.is_set() or not revoked:
            return
        started = time.monotonic()
        log.info("partitions revoked mid-batch", shard=self.name, partitions=len(revoked),
                 wait_at_most_s=self.wait_s)
        try:
            await asyncio.wait_for(self.idle.wait(), self.wait_s)
        except TimeoutError:
            log.warning("partitions moved before the batch finished", shard=self.name,
                        waited_s=round(time.monotonic() - started, 3))
        else:
            log.info("batch finished before its partitions moved", shard=self.name,
                     waited_s=round(time.monotonic() - started, 3))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Nothing to do: the positions come from the group's committed offsets."""


def subscriber_groups(table: Mapping[str, Route], settings: Settings) -> list[list[str]]:
    """The topics of each batch subscriber: ``invoices``, ``refund-results``, then
    ``consumer_shards`` times the crediting topics (all the others)."""
    alone = (settings.topics.invoices, settings.topics.refund_results)
    crediting = [topic for topic in table if topic not in alone]
    groups = [[topic for topic in table if topic == own] for own in alone]
    groups += [list(crediting) for _ in range(settings.consumer_shards)] if crediting else []
    return [group for group in groups if group]


async def start_subscribers(broker: KafkaBroker, table: Mapping[str, Route],
                            pipeline: Pipeline, settings: Settings) -> list[Any]:
    """Thin batch subscribers, each its own consumer, handing records to the pipeline.

    - ``invoices`` alone, so a credit waiting for its invoice never holds up
      the topic the invoice arrives on;
    - ``refund-results`` alone, so an outcome waiting for its refund (a payment
      system faster than our commit) never holds up the credit note that
      brings the refund;
    - every topic that credits an invoice (commands and triggers) together,
      so their batches never wait on each other's invoice locks (the
      benchmark's finding: per-topic consumers on the same invoices
      serialised on the row locks and ran smaller batches), consumed by
      ``consumer_shards`` subscribers: that many batches in flight.

    Every subscriber offers the range assignor first, then round robin
    (:data:`ASSIGNORS`). Range gives each member the same partition numbers
    on every topic it reads, so one shard holds partition *p* of every
    crediting topic, an invoice's records (keyed by invoice id) meet in one
    shard, and shards never wait on each other's row locks. Round robin
    (aiokafka's default, which deals all topics' partitions out together) is
    offered so that a rolling upgrade works: the group agrees on one protocol
    every member supports, and replicas of releases before the shards offer
    only round robin; a member with no protocol in common with the group is
    refused (``InconsistentGroupProtocolError``). While old and new replicas
    share the group, the shards are unaligned (slower, never wrong: row locks
    serialise); once every member is new, Kafka's coordinator chooses range
    (each member votes for its first protocol all support). tansu 0.6 instead
    keeps the protocol of the group's first member for the broker's lifetime.

    They are started together, after the broker (FastStream starts registered
    subscribers one by one, and every join rebalances the group).

    ``NACK_ON_ERROR``: the handler commits the consumer's offsets (its own
    partitions' positions, just past the batch) once per batch, after the
    pipeline returned, i.e. after the transaction committed (never
    FastStream's default ``ACK_FIRST``, which auto-commits on receipt); an
    exception seeks every partition of the batch back to its first record, so
    they are all delivered again. Each subscriber's :class:`Shard` listener
    lets its batch finish before its partitions move.
    """
    # above the longest a batch can take (retry budget, wait, backoff, per record)
    poll_interval_ms = max_poll_interval_ms(
        Backoff(settings.retry_initial_backoff_seconds, settings.retry_max_backoff_seconds),
        ATTEMPTS, settings.not_found_retry_seconds, settings.batch_max_records)
    revoke_wait_s = min(settings.kafka_session_timeout_ms, poll_interval_ms // 2) / 1000
    subscribers = []
    groups = subscriber_groups(table, settings)
    shards = 0
    for topics in groups:
        name = topics[0] if len(topics) == 1 else f"crediting-{shards}"
        shards += len(topics) > 1
        shard = Shard(name, revoke_wait_s)
        subscriber = broker.subscriber(
            *topics, batch=True, max_records=settings.batch_max_records,
            batch_timeout_ms=settings.batch_timeout_ms,
            group_id=settings.consumer_group, auto_offset_reset="earliest",
            ack_policy=AckPolicy.NACK_ON_ERROR, max_poll_interval_ms=poll_interval_ms,
            partition_assignment_strategy=ASSIGNORS, listener=shard,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms, persistent=False,
            # bounded memory: a batch holds at most what one fetch brought
            fetch_max_bytes=settings.kafka_fetch_max_bytes,
            max_partition_fetch_bytes=settings.kafka_max_partition_fetch_bytes,
            # a record arriving while a fetch is held waits for the next (tansu holds each)
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
            # FastStream neither decodes headers nor bodies: the pipeline judges each record
            parser=parse_records, decoder=decode_records,
        )
        subscriber(_handler(pipeline.for_another_consumer(), shard))
        subscribers.append(subscriber)
    await asyncio.gather(*(subscriber.start() for subscriber in subscribers))
    warn_unaligned(subscribers, groups)
    return subscribers


def _handler(pipeline: Pipeline, shard: Shard) -> Callable[[KafkaMessage], Awaitable[None]]:
    """The subscriber's handler: the batch, then its offset commit, marked busy throughout.

    Busy from the first line: nothing between aiokafka's ``getmany`` returning
    the records and this line suspends (FastStream's parser, decoder and
    middlewares do no I/O), so a revocation sees either no batch or this one;
    and once a revocation began, ``getmany`` returns no records until the new
    assignment (aiokafka's fetcher waits for it).
    """
    async def consume(message: KafkaMessage) -> None:
        shard.idle.clear()
        try:
            await pipeline.process_batch(message.raw_message)
            # FastStream's ack (consumer.commit(): this consumer's positions, just past the
            # batch) here rather than after the handler, so the listener sees it done;
            # the ack after the handler is then a no-op
            try:
                await message.ack()
            except KafkaError as error:
                log.warning("offsets not committed", shard=shard.name,
                            error_class=type(error).__name__)
                raise
        finally:
            shard.idle.set()

    return consume


def warn_unaligned(subscribers: Sequence[Any], groups: Sequence[list[str]]) -> None:
    """One warning when the crediting topics' partition counts differ: partition *p* of
    each is then no longer the same invoices, so a shard may wait on another's row locks
    (correctness is unaffected: the locks serialise; only speed)."""
    for subscriber, topics in zip(subscribers, groups, strict=True):
        consumer = getattr(subscriber, "consumer", None)
        if len(topics) < 2 or consumer is None:
            continue
        counts = {topic: len(consumer.partitions_for_topic(topic) or ()) for topic in topics}
        if len(set(counts.values())) > 1:
            log.warning("crediting topics' partition counts differ", partitions=counts)
        return


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
