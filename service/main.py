"""The composition root: builds the pool, the broker, the pipeline and the relay.

Nothing is created at import time. :class:`Service` is built from a
:class:`~service.settings.Settings`; :meth:`Service.run` builds the parts
(:func:`build`), starts them, runs until its ``stopping`` event is set, and
stops them in the reverse order (one ``AsyncExitStack``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from faststream.kafka import KafkaBroker
from opentelemetry import trace

from service import tracing
from service.adapters import queries
from service.adapters.kafka_producer import KafkaProducer
from service.adapters.outbox_relay import OutboxRelay
from service.adapters.probe_connection import ProbeConnection
from service.adapters.retention import Policy, RetentionTask
from service.adapters.unavailable import Backoff
from service.adapters.unit_of_work import PooledConnection, PostgresUnitOfWork
from service.domain import errors
from service.entrypoints import subscribers
from service.entrypoints.consumer import Pipeline
from service.entrypoints.dead_letters import DeadLetterWriter
from service.entrypoints.http import Cached, HealthServer, Limits, metrics_scrape, readiness_check
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


@dataclass(frozen=True)
class Parts:
    """What :meth:`Service.run` starts and stops, built and not yet started."""

    producer: KafkaProducer
    broker: KafkaBroker
    table: Mapping[str, Route]
    pipeline: Pipeline
    relay: OutboxRelay
    probe: ProbeConnection
    http: HealthServer
    retention: RetentionTask | None


def build(settings: Settings, pool: asyncpg.Pool,
          tracer_provider: trace.TracerProvider, metrics: Metrics | None = None) -> Parts:
    """Every part of the service, wired to the others; nothing connects yet.

    A unit of work that committed outbox rows wakes the relay at once: this
    process's relay in-process when it leads, otherwise the leader (another
    replica) with a coalesced NOTIFY sent after the commit, outside the batch's
    transaction (migration 0017: no NOTIFY at commit); the leader's poll sweeps up
    whatever a lost NOTIFY leaves.
    """
    producer = KafkaProducer(settings)
    broker = subscribers.broker(settings)
    metrics = metrics or Metrics()
    table = routes(settings)
    relay = OutboxRelay(settings.database_url, pool, producer,
                        batch_size=settings.outbox_batch_size,
                        poll_seconds=settings.outbox_poll_seconds,
                        max_backoff_seconds=settings.retry_max_backoff_seconds,
                        publish_timeout_seconds=settings.outbox_publish_timeout_seconds,
                        max_event_bytes=settings.outbox_max_event_bytes,
                        tracer=tracer_provider.get_tracer("creditnotes.outbox"))
    pipeline = Pipeline(
        unit_of_work=lambda: PostgresUnitOfWork(pool, settings.topics, on_commit=relay.wake),
        table=table,
        dead_letters=DeadLetterWriter(producer, settings.consumer_group,
                                      settings.service_version),
        backoff=Backoff(settings.retry_initial_backoff_seconds,
                        settings.retry_max_backoff_seconds),
        not_found_retry_s=settings.not_found_retry_seconds,
        max_message_bytes=settings.max_message_bytes,
        metrics=metrics,
        tracer=tracer_provider.get_tracer("creditnotes.consumer"),
    )
    probe = ProbeConnection(settings.database_url)
    http = HealthServer(
        settings.http_port,
        Cached(readiness_check(probe, broker, settings.migrations_dir),
               settings.readiness_cache_seconds),
        Cached(with_refund_gauges(probe, metrics, metrics_scrape(probe, broker, metrics)),
               settings.readiness_cache_seconds),
        metrics_port=settings.metrics_port,
        limits=Limits(settings.http_max_connections, settings.http_read_timeout_seconds,
                      settings.http_max_request_line_bytes))
    return Parts(producer, broker, table, pipeline, relay, probe, http,
                 retention(pool, settings, metrics) if settings.retention_enabled else None)


def with_refund_gauges(probe: ProbeConnection, metrics: Metrics,
                       scrape: Callable[[], Awaitable[str]]) -> Callable[[], Awaitable[str]]:
    """``/metrics`` with the pending-refund gauges refreshed first (beside the outbox's)."""
    async def refreshed() -> str:
        try:  # the other metrics still answer while PostgreSQL is down
            async with probe.connection() as connection:
                pending = await asyncio.wait_for(queries.pending_refunds(connection), 2)
        except errors.Unavailable:
            pending = None
        if pending is not None:
            metrics.refunds_pending.set(pending.count)
            metrics.refund_oldest_pending.set(pending.oldest_seconds)
        return await scrape()
    return refreshed


#: The note an ``OSError`` raised creating the PostgreSQL pool carries (``creditnotes run``
#: then names PostgreSQL; another ``OSError`` at start is not PostgreSQL's).
CREATING_THE_POOL = "while creating the PostgreSQL connection pool"


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
        """Start every part, run until ``stopping`` is set, then stop them in reverse order.

        Each stop is registered before its part starts, so a start that fails
        still stops whatever may have started; a stop that fails is logged away
        where it cannot lose data (the consumers, the relay, the producer).
        """
        settings = self.settings
        check_sources(settings)
        tasks: list[asyncio.Task[None]] = []
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._stopped)
            metrics = Metrics()
            try:
                pool = await asyncpg.create_pool(
                    settings.database_url, min_size=1, max_size=settings.database_pool_size,
                    connection_class=PooledConnection, init=round_trips_counted(metrics))
            except OSError as error:  # the network's, or a TLS file's: PostgreSQL's anyway
                error.add_note(CREATING_THE_POOL)
                raise
            stack.push_async_callback(pool.close)
            # built once the pool's close is registered: a part that fails to build
            # (a Kafka TLS file that is not PEM, say) leaves no pool open
            parts = build(settings, pool, self.tracer_provider, metrics)
            stack.push_async_callback(_quietly, parts.producer.stop)
            stack.push_async_callback(_quietly, parts.probe.close)
            stack.push_async_callback(parts.http.stop)
            # after the consumers and the relay's task have ended, before the pool closes:
            # a wake-up NOTIFY still in flight is awaited (or cancelled), never left pending
            stack.push_async_callback(parts.relay.close)
            stack.push_async_callback(_finish, tasks, settings.shutdown_timeout_seconds)
            stack.push_async_callback(_quietly, parts.broker.stop)
            stack.callback(self._stopping, stopping)

            await parts.producer.start()
            await parts.http.start()
            self.http_port, self.metrics_port = parts.http.port, parts.http.metrics_port
            self.health = parts.http
            await parts.broker.start()
            await subscribers.start_subscribers(parts.broker, parts.table, parts.pipeline,
                                                settings)
            tasks.append(asyncio.create_task(parts.relay.run(stopping), name="outbox-relay"))
            if parts.retention is not None:
                tasks.append(asyncio.create_task(parts.retention.run(stopping),
                                                 name="retention"))
            log.info("service started", topics=sorted(parts.table),
                     group=settings.consumer_group, http_port=self.http_port)
            self.ready.set()
            await stopping.wait()

    def _stopping(self, stopping: asyncio.Event) -> None:
        log.info("service stopping")
        stopping.set()

    def _stopped(self) -> None:
        shutdown = getattr(self.tracer_provider, "shutdown", None)
        if shutdown is not None:
            shutdown()  # flush the spans still buffered
        log.info("service stopped")


def round_trips_counted(metrics: Metrics
                        ) -> Callable[[asyncpg.Connection], Coroutine[Any, Any, None]]:
    """A pool's ``init``: every statement its connections send counts one round trip
    (``creditnotes_db_round_trips_total``; asyncpg calls the logger after each one)."""
    def counted(_: object) -> None:
        metrics.db_round_trips.inc()

    async def init(connection: asyncpg.Connection) -> None:
        connection.add_query_logger(counted)
    return init


async def _quietly(stop: Callable[[], Awaitable[object]]) -> None:
    with contextlib.suppress(Exception):
        await stop()


async def _finish(tasks: list[asyncio.Task[None]], timeout_seconds: float) -> None:
    """Wait for each background task to see ``stopping`` and end, each within the timeout."""
    for task in tasks:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout_seconds)


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
