"""The outbox relay: publishes committed outbox rows in order, then marks them.

- One relay is active at a time across replicas: the leader holds a session
  advisory lock on a connection of its own. It leaves the leader loop as soon
  as that connection is lost (a termination listener, and a check on that very
  connection before every batch proves the lock is still held).
- A fence keeps a former leader's last batch and a new leader apart: before
  each batch the leader writes, on the lock connection, until when the batch
  may still be publishing (``outbox_relay_fence``) and clears it when done; a
  relay that has just taken the lock waits until a fence it finds has passed,
  unless the relay that wrote it is gone (each relay holds an "alive" advisory
  lock on one more connection for its whole life: a crashed replica costs no
  wait). A batch gives up at that time, so an old leader never publishes beside
  a new one. The in-flight batch is not cancelled when the lock is lost: what the
  producer holds goes out anyway, and marking what the broker acked (through
  the pool) is what keeps the new leader from publishing it a second time.
- It wakes on ``NOTIFY creditnotes_outbox`` (sent by a trigger on insert) and
  also polls, so a lost notification only delays an event.
- Rows are marked published only after the broker acknowledged them. A crash
  in between publishes them again with the same event ids (at-least-once on
  the wire, deduplicable downstream by ``id``).
- A row the broker refuses for a reason retrying cannot fix (too large, an
  invalid topic, not authorized) is parked with its error; later rows with the
  same key (the invoice id, on any topic) wait behind it, every other row
  flows. ``creditnotes outbox retry`` un-parks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from aiokafka.errors import (
    AuthenticationFailedError,
    BrokerNotAvailableError,
    IllegalStateError,
    IncompatibleBrokerVersion,
    InvalidTopicError,
    KafkaConfigurationError,
    KafkaError,
    KafkaTimeoutError,
    KafkaUnavailableError,
    MessageSizeTooLargeError,
    ProducerClosed,
    ReplicaNotAvailableError,
    SaslAuthenticationFailed,
    UnknownError,
    UnrecognizedBrokerVersion,
)
from opentelemetry import trace

from service.adapters.event_codec import CONTENT_TYPE
from service.adapters.kafka_producer import Header, KafkaProducer
from service.tracing import context_from_traceparent, headers_for, messaging_attributes

_RELAY_LOCK_KEY = 0x6F757462  # "outb"
#: (this, a relay's random key): held for the relay's life on a connection of its own, so a
#: new leader can tell a former leader that is gone (no fence to wait out) from one alive
_ALIVE_CLASS = 0x6F757463  # "outc"
_CHANNEL = "creditnotes_outbox"
#: How long marking and clearing the fence may take after a batch's publish deadline.
_MARK_MARGIN_SECONDS = 5.0
_LOCK_QUERY_TIMEOUT_SECONDS = 5.0
#: Kafka's legal topic names; aiokafka would wait for metadata that never comes
_LEGAL_TOPIC = re.compile(r"(?!\.{1,2}$)[a-zA-Z0-9._-]{1,249}")
log = structlog.get_logger(__name__)

#: Not retriable by aiokafka's own flag, yet about the connection or the client
#: rather than the record: these interrupt the relay (it backs off and retries).
_NOT_THE_RECORDS_FAULT = (
    KafkaTimeoutError, ProducerClosed, KafkaUnavailableError, BrokerNotAvailableError,
    ReplicaNotAvailableError, UnrecognizedBrokerVersion, IncompatibleBrokerVersion,
    IllegalStateError, KafkaConfigurationError, AuthenticationFailedError,
    SaslAuthenticationFailed, UnknownError,
)

_PENDING = """
    SELECT seq, event_id, topic, key, type, payload, traceparent FROM outbox o
    WHERE published_at IS NULL AND parked_at IS NULL
      AND NOT EXISTS (SELECT FROM outbox p
                      WHERE p.parked_at IS NOT NULL AND p.key = o.key AND p.seq < o.seq)
    ORDER BY seq LIMIT $1
"""
_HOLDER_ALIVE = """
    SELECT EXISTS (
        SELECT FROM pg_locks WHERE locktype = 'advisory' AND classid = $1
          AND objid = $2 AND objsubid = 2 AND granted
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))
"""
_STILL_LEADER = """
    UPDATE outbox_relay_fence
    SET holder = $1, fence_until = clock_timestamp() + make_interval(secs => $2)
    WHERE id = 1 AND EXISTS (
        SELECT FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
          AND classid = 0 AND objid = $3 AND objsubid = 1 AND granted)
    RETURNING fence_until
"""


def parkable(error: BaseException) -> bool:
    """A refusal of this record that publishing it again cannot fix."""
    return (isinstance(error, KafkaError) and not error.retriable
            and not isinstance(error, _NOT_THE_RECORDS_FAULT))


class LeadershipLost(Exception):
    """The relay's lock connection is gone, or no longer holds the lock."""


@dataclass
class _Batch:
    published: list[int]
    parked: int
    interrupted: BaseException | None


class OutboxRelay:
    def __init__(self, database_url: str, pool: asyncpg.Pool, producer: KafkaProducer,
                 batch_size: int = 500, poll_seconds: float = 1.0,
                 max_backoff_seconds: float = 5.0, publish_timeout_seconds: float = 30.0,
                 max_event_bytes: int = 1_048_576,
                 tracer: trace.Tracer | None = None) -> None:
        self._database_url = database_url
        self._pool = pool
        self._producer = producer
        self._batch_size = batch_size
        self._poll_seconds = poll_seconds
        self._max_backoff = max_backoff_seconds
        self._publish_timeout = publish_timeout_seconds
        self._max_event_bytes = max_event_bytes
        self._wake = asyncio.Event()
        self._tracer = tracer or trace.NoOpTracer()
        #: who wrote a fence: a relay never waits for a fence of its own (its batches
        #: have ended when it takes the lock again)
        self._alive_key = secrets.randbelow(2**31 - 1) + 1
        self._holder = str(self._alive_key)
        self._alive: asyncpg.Connection | None = None
        #: set while this relay leads
        self.leading = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        """Relay until ``stopping`` is set; survives database and broker outages."""
        backoff = self._poll_seconds
        try:
            while not stopping.is_set():
                try:
                    await self._stay_alive()
                    await self._run_as_leader(stopping)
                    backoff = self._poll_seconds
                except (TimeoutError, OSError, KafkaError, asyncpg.PostgresError,
                        asyncpg.InterfaceError, RuntimeError, LeadershipLost) as error:
                    log.warning("outbox relay interrupted, retrying", error=type(error).__name__,
                                retry_in_s=backoff)
                    await _sleep_unless(stopping, backoff)
                    backoff = min(backoff * 2, self._max_backoff)
                except Exception as error:  # a relay that stopped would wedge the outbox
                    log.exception("outbox relay failed, retrying", error=type(error).__name__,
                                  retry_in_s=backoff)
                    await _sleep_unless(stopping, backoff)
                    backoff = min(backoff * 2, self._max_backoff)
        finally:
            if self._alive is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._alive.close(), 5)

    async def _stay_alive(self) -> None:
        """Hold this relay's own "alive" lock (again, after its connection was lost)."""
        if self._alive is not None and not self._alive.is_closed():
            return
        if self._alive is not None:
            self._alive.terminate()
        self._alive = None
        connection = await asyncpg.connect(self._database_url)
        try:
            await connection.execute("SELECT pg_advisory_lock($1, $2)", _ALIVE_CLASS,
                                     self._alive_key)
        except BaseException:
            connection.terminate()
            raise
        self._alive = connection

    async def _run_as_leader(self, stopping: asyncio.Event) -> None:
        lock = await asyncpg.connect(self._database_url)
        lost = asyncio.Event()
        lock.add_termination_listener(lambda _: lost.set())
        try:
            while not await self._lock_query(lock.fetchval(
                    "SELECT pg_try_advisory_lock($1)", _RELAY_LOCK_KEY)):
                await _sleep_unless(stopping, self._poll_seconds)
                if stopping.is_set():
                    return
            await self._wait_for_fence(stopping, lost)
            await lock.add_listener(_CHANNEL, self._on_notify)
            log.info("outbox relay active")
            self.leading.set()
            while not stopping.is_set():
                # cleared before reading, so a NOTIFY that arrives while publishing
                # wakes the next round at once instead of waiting for the poll
                self._wake.clear()
                while await self._publish_fenced(lock, lost) == self._batch_size:
                    pass
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wait(stopping, lost), self._poll_seconds)
                if lost.is_set():
                    raise LeadershipLost("the relay's lock connection was lost")
        finally:
            if self.leading.is_set():
                log.info("outbox relay no longer active")
            self.leading.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(lock.close(), 5)

    async def _wait_for_fence(self, stopping: asyncio.Event, lost: asyncio.Event) -> None:
        """Wait until no former leader can still be publishing its last batch."""
        announced = False
        while not stopping.is_set():
            fence = await self._pool.fetchrow(
                "SELECT holder, extract(epoch FROM fence_until - clock_timestamp()) AS remaining"
                " FROM outbox_relay_fence WHERE id = 1")
            if fence is None or fence["holder"] == self._holder:
                return
            remaining = fence["remaining"]
            if remaining is None or remaining <= 0:
                return
            holder = fence["holder"] or ""
            if holder.isdigit() and not await self._pool.fetchval(
                    _HOLDER_ALIVE, _ALIVE_CLASS, int(holder)):
                return  # its process is gone, and with it whatever it was sending
            if not announced:
                log.info("outbox relay waiting for the former leader's batch",
                         wait_s=round(float(remaining), 3))
                announced = True
            await _sleep_unless(stopping, min(float(remaining), 0.2))
            if lost.is_set():
                raise LeadershipLost("the relay's lock connection was lost")

    async def _publish_fenced(self, lock: asyncpg.Connection, lost: asyncio.Event) -> int:
        """One batch, after proving on the lock connection that this relay still leads."""
        if lost.is_set():
            raise LeadershipLost("the relay's lock connection was lost")
        started = time.monotonic()
        fence = self._publish_timeout + _MARK_MARGIN_SECONDS
        if await self._lock_query(lock.fetchval(
                _STILL_LEADER, self._holder, fence, _RELAY_LOCK_KEY)) is None:
            raise LeadershipLost("the relay's lock is no longer held")
        try:
            return await self.publish_pending(deadline=started + self._publish_timeout)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.execute(
                    "UPDATE outbox_relay_fence SET fence_until = NULL"
                    " WHERE id = 1 AND holder = $1", self._holder), _MARK_MARGIN_SECONDS)

    async def _lock_query(self, query: Any) -> Any:
        try:
            return await asyncio.wait_for(query, _LOCK_QUERY_TIMEOUT_SECONDS)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                OSError, TimeoutError) as error:
            # killed mid-query, asyncpg may also answer "another operation is in progress"
            raise LeadershipLost(f"the relay's lock connection failed: {type(error).__name__}") \
                from error

    async def publish_pending(self, deadline: float | None = None) -> int:
        """Publish one batch of unpublished rows in order; returns how many were handled.

        Rows acked by the broker are marked published, rows it refuses for good
        are parked; anything else interrupts the relay after marking what went out.
        """
        rows = await self._pool.fetch(_PENDING, self._batch_size)
        if not rows:
            return 0
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        spans = [self._tracer.start_span(
            f"publish {row['type']}", context=context_from_traceparent(row["traceparent"]),
            kind=trace.SpanKind.PRODUCER, attributes=messaging_attributes(row["topic"]))
            for row in rows]
        batch = _Batch(published=[], parked=0, interrupted=None)
        try:
            await asyncio.wait_for(self._send(rows, spans, batch), timeout)
        except TimeoutError as error:  # the fence runs out: mark what went out, stop
            batch.interrupted = error
        finally:
            for span in spans:
                span.end()
        if batch.published:  # within the fence's margin, so a successor never reads them unmarked
            await asyncio.wait_for(self._pool.execute(
                "UPDATE outbox SET published_at = now() WHERE seq = ANY($1::bigint[])",
                batch.published), None if deadline is None else _MARK_MARGIN_SECONDS)
        log.debug("outbox published", count=len(batch.published), parked=batch.parked)
        if batch.interrupted is not None:
            raise batch.interrupted
        return len(rows)

    async def _send(self, rows: list[asyncpg.Record], spans: list[trace.Span],
                    batch: _Batch) -> None:
        blocked: dict[str, int] = {}  # key -> seq of its parked row: later rows wait
        sent: list[tuple[asyncpg.Record, asyncio.Future[Any]]] = []
        span_of = {row["seq"]: span for row, span in zip(rows, spans, strict=True)}
        for row, span in zip(rows, spans, strict=True):
            if row["key"] in blocked:
                continue
            try:
                sent.append((row, await self._enqueue(row, span)))
            except KafkaError as error:
                if not parkable(error):
                    batch.interrupted = error
                    break
                await self._park(row, error, blocked)
                batch.parked += 1
        results = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
        refused = []
        for (row, _), result in zip(sent, results, strict=True):
            if not isinstance(result, BaseException):
                if row["key"] in blocked and row["seq"] > blocked[row["key"]]:
                    log.warning("outbox event published ahead of a parked one",
                                seq=row["seq"], event_id=row["event_id"], key=row["key"])
                batch.published.append(row["seq"])
            elif parkable(result):
                refused.append(row)
            elif batch.interrupted is None:
                batch.interrupted = result
        # a broker refuses a whole request: find the guilty rows by sending each alone
        for row in refused:
            if batch.interrupted is not None:
                break
            if row["key"] in blocked:
                continue
            try:
                await (await self._enqueue(row, span_of[row["seq"]]))
                batch.published.append(row["seq"])
            except KafkaError as error:
                if not parkable(error):
                    batch.interrupted = error
                    break
                await self._park(row, error, blocked)
                batch.parked += 1

    async def _enqueue(self, row: asyncpg.Record, span: trace.Span) -> asyncio.Future[Any]:
        key = row["key"].encode() if row["key"] is not None else None
        value = row["payload"].encode()
        headers: list[Header] = [("content-type", CONTENT_TYPE.encode()), *headers_for(span)]
        if not _LEGAL_TOPIC.fullmatch(row["topic"]):
            raise InvalidTopicError(f"{row['topic']!r} is not a legal Kafka topic name")
        size = KafkaProducer.estimated_size(key, value, headers)
        if size > self._max_event_bytes:
            raise MessageSizeTooLargeError(
                f"the record is {size} bytes, more than the {self._max_event_bytes} bytes"
                " allowed (CREDITNOTES_OUTBOX_MAX_EVENT_BYTES)")
        return await self._producer.enqueue(row["topic"], key, value, headers)

    async def _park(self, row: asyncpg.Record, error: BaseException,
                    blocked: dict[str, int]) -> None:
        if row["key"] is not None:
            blocked.setdefault(row["key"], row["seq"])
        reason = f"{type(error).__name__}: {error}"[:1000]
        await self._pool.execute(
            "UPDATE outbox SET parked_at = now(), park_error = $2"
            " WHERE seq = $1 AND published_at IS NULL", row["seq"], reason)
        log.error("outbox event parked", seq=row["seq"], event_id=row["event_id"],
                  topic=row["topic"], key=row["key"], type=row["type"],
                  error=type(error).__name__, size=len(row["payload"].encode()))

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    async def _wait(self, stopping: asyncio.Event, lost: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(event.wait()) for event in (self._wake, stopping, lost)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()


async def _sleep_unless(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
