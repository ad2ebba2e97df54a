"""The composition root: builds the pool, the broker, the pipeline and the relay.

Nothing is created at import time; :class:`Service` is built from a
:class:`~service.settings.Settings` and runs until its ``stopping`` event is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping

import asyncpg
import structlog
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.security import (
    BaseSecurity,
    SASLPlaintext,
    SASLScram256,
    SASLScram512,
)
from opentelemetry import trace

from service import tracing
from service.adapters import migrations
from service.adapters.kafka_producer import KafkaProducer, connection_options
from service.adapters.outbox_relay import OutboxRelay
from service.adapters.probe_connection import ProbeConnection
from service.adapters.retention import Policy, RetentionTask
from service.adapters.unit_of_work import PostgresUnitOfWork
from service.entrypoints.consumer import (
    ATTEMPTS,
    Backoff,
    Pipeline,
    decode_records,
    max_poll_interval_ms,
    parse_records,
)
from service.entrypoints.dead_letters import DeadLetterWriter
from service.entrypoints.http import Cached, HealthServer, Limits
from service.entrypoints.metrics import Metrics
from service.entrypoints.translators import Route, routes
from service.settings import Settings

log = structlog.get_logger(__name__)


class SourcesNotConfigured(Exception):
    """An input topic has no allow-list and ``allow_any_source`` is not set."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(
            f"no allow-list of sources for {len(missing)} input topic(s): set "
            + ", ".join(missing)
            + " (JSON lists of CloudEvents sources), or CREDITNOTES_ALLOW_ANY_SOURCE=true"
              " to accept any source on them")
        self.missing = missing


def check_sources(settings: Settings) -> None:
    """Refuse to consume unless every input topic says who may publish there."""
    missing = settings.missing_allow_lists()
    if missing:
        raise SourcesNotConfigured(missing)
    if settings.open_topics():
        log.warning("sources not checked: these input topics accept any source",
                    topics=settings.open_topics(), setting="CREDITNOTES_ALLOW_ANY_SOURCE")


class Service:
    def __init__(self, settings: Settings,
                 tracer_provider: trace.TracerProvider | None = None) -> None:
        self.settings = settings
        self.tracer_provider = tracer_provider or tracing.tracer_provider(
            settings.tracing_enabled, settings.tracing_endpoint, settings.service_version)
        self.ready = asyncio.Event()
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self.health: HealthServer | None = None

    async def run(self, stopping: asyncio.Event) -> None:
        settings = self.settings
        check_sources(settings)
        pool = await asyncpg.create_pool(settings.database_url, min_size=1,
                                         max_size=settings.database_pool_size)
        producer = KafkaProducer(settings)
        broker = KafkaBroker(security=broker_security(settings),
                             graceful_timeout=settings.shutdown_timeout_seconds,
                             enable_idempotence=False, logger=None,
                             bootstrap_servers=settings.kafka_bootstrap_servers)
        table = routes(settings)
        metrics = Metrics()
        pipeline = Pipeline(
            unit_of_work=lambda: PostgresUnitOfWork(pool, settings.topics),
            table=table,
            dead_letters=DeadLetterWriter(producer, settings.consumer_group,
                                          settings.service_version),
            backoff=Backoff(settings.retry_initial_backoff_seconds,
                            settings.retry_max_backoff_seconds),
            not_found_retry_s=settings.not_found_retry_seconds,
            max_message_bytes=settings.max_message_bytes,
            metrics=metrics,
            tracer=self.tracer_provider.get_tracer("creditnotes.consumer"),
        )
        relay = OutboxRelay(settings.database_url, pool, producer,
                            batch_size=settings.outbox_batch_size,
                            poll_seconds=settings.outbox_poll_seconds,
                            max_backoff_seconds=settings.retry_max_backoff_seconds,
                            publish_timeout_seconds=settings.outbox_publish_timeout_seconds,
                            max_event_bytes=settings.outbox_max_event_bytes,
                            tracer=self.tracer_provider.get_tracer("creditnotes.outbox"))

        probe = ProbeConnection(settings.database_url)

        async def readiness() -> tuple[bool, str]:
            try:
                async with probe.connection() as connection:
                    pending = await migrations.pending(connection, settings.migrations_dir)
                if pending:
                    return False, f"migrations pending: {', '.join(pending)}"
                if not await broker.ping(timeout=2):
                    return False, "broker unreachable"
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                return False, "database unreachable"
            return True, "ready"

        async def scrape() -> str:
            try:  # the other metrics still answer while PostgreSQL is down
                async with probe.connection() as connection:
                    row = await asyncio.wait_for(connection.fetchrow(
                        "SELECT count(*) AS backlog, coalesce(extract(epoch FROM now()"
                        " - min(created_at)), 0) AS oldest_seconds,"
                        " count(*) FILTER (WHERE parked_at IS NOT NULL AND held_behind IS NULL)"
                        " AS parked FROM outbox"
                        " WHERE published_at IS NULL"), 2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                row = None
            if row is not None:
                metrics.outbox_backlog.set(row["backlog"])
                metrics.outbox_oldest.set(float(row["oldest_seconds"]))
                metrics.outbox_parked.set(row["parked"])
            for subscriber in broker.subscribers:
                consumer = getattr(subscriber, "consumer", None)
                if consumer is None:
                    continue
                for partition in consumer.assignment():
                    highwater = consumer.highwater(partition)
                    if highwater is not None:
                        position = await consumer.position(partition)
                        metrics.lag.labels(partition.topic, str(partition.partition)).set(
                            max(highwater - position, 0))
            return metrics.render()

        http = HealthServer(
            settings.http_port, Cached(readiness, settings.readiness_cache_seconds),
            Cached(scrape, settings.readiness_cache_seconds), metrics_port=settings.metrics_port,
            limits=Limits(settings.http_max_connections, settings.http_read_timeout_seconds,
                          settings.http_max_request_line_bytes))
        relay_task: asyncio.Task[None] | None = None
        retention_task: asyncio.Task[None] | None = None
        try:
            await producer.start()
            await http.start()
            self.http_port = http.port
            self.health = http
            self.metrics_port = http.metrics_port
            await broker.start()
            await start_subscribers(broker, table, pipeline, settings)
            relay_task = asyncio.create_task(relay.run(stopping), name="outbox-relay")
            if settings.retention_enabled:
                retention_task = asyncio.create_task(
                    retention(pool, settings, metrics).run(stopping), name="retention")
            log.info("service started", topics=sorted(table), group=settings.consumer_group,
                     http_port=self.http_port)
            self.ready.set()
            await stopping.wait()
        finally:
            log.info("service stopping")
            stopping.set()
            with contextlib.suppress(Exception):
                await broker.stop()
            if relay_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(relay_task, settings.shutdown_timeout_seconds)
            if retention_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(retention_task, settings.shutdown_timeout_seconds)
            await http.stop()
            with contextlib.suppress(Exception):
                await probe.close()
            with contextlib.suppress(Exception):
                await producer.stop()
            await pool.close()
            shutdown = getattr(self.tracer_provider, "shutdown", None)
            if shutdown is not None:
                shutdown()  # flush the spans still buffered
            log.info("service stopped")


def retention(pool: asyncpg.Pool, settings: Settings, metrics: Metrics) -> RetentionTask:
    """The periodic prune (service/adapters/retention.py), counted in the metrics."""
    return RetentionTask(
        pool, retention_policy(settings), settings.retention_interval_seconds,
        on_pruned=lambda pruned: metrics.retention_pruned.labels(pruned.table).inc(pruned.rows),
        on_run=lambda result: metrics.retention_runs.labels(result).inc())


def retention_policy(settings: Settings) -> Policy:
    return Policy(processed_messages_days=settings.retention_processed_messages_days,
                  outbox_days=settings.retention_outbox_days,
                  dlq_replays_days=settings.retention_dlq_replays_days,
                  batch_size=settings.retention_batch_size,
                  pause_seconds=settings.retention_batch_pause_seconds)


async def start_subscribers(broker: KafkaBroker, table: Mapping[str, Route],
                            pipeline: Pipeline, settings: Settings) -> None:
    """Two thin batch subscribers, each its own consumer, handing records to the pipeline.

    - ``invoices`` alone, so a credit waiting for its invoice never holds up
      the topic the invoice arrives on;
    - every topic that credits an invoice (commands and triggers) together,
      so their batches never wait on each other's invoice locks (the
      benchmark's finding: per-topic consumers on the same invoices
      serialised on the row locks and ran smaller batches).

    They are started together (FastStream starts registered subscribers one
    by one, and every join rebalances the group).

    ``NACK_ON_ERROR``: the offsets are committed only after the handler returned,
    once per batch (never FastStream's default ``ACK_FIRST``, which auto-commits
    on receipt); an exception seeks every partition of the batch back to its
    first record, so they are all delivered again.
    """
    invoices = settings.topics.invoices
    groups = [[topic for topic in table if topic == invoices],
              [topic for topic in table if topic != invoices]]
    subscribers = []
    for topics in (group for group in groups if group):
        subscriber = broker.subscriber(
            *topics, batch=True, max_records=settings.batch_max_records,
            batch_timeout_ms=settings.batch_timeout_ms,
            group_id=settings.consumer_group, auto_offset_reset="earliest",
            ack_policy=AckPolicy.NACK_ON_ERROR,
            # above the longest a batch can take (retry budget, wait, backoff, per record)
            max_poll_interval_ms=max_poll_interval_ms(
                Backoff(settings.retry_initial_backoff_seconds,
                        settings.retry_max_backoff_seconds),
                ATTEMPTS, settings.not_found_retry_seconds, settings.batch_max_records),
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
