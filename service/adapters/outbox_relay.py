"""The outbox relay: publishes committed outbox rows in order, then marks them.

- One relay is active at a time across replicas: the leader holds a session
  advisory lock on a connection of its own. It leaves the leader loop as soon
  as that connection (or its "alive" connection, below) is lost: termination
  listeners on both, and a statement on the lock connection before every batch
  proving the lock and the alive lock are still held.
- A fence keeps a former leader's last batch and a new leader apart: before
  each batch the leader writes, on the lock connection, until when the batch
  may still be publishing (``outbox_relay_fence``) and clears it when done; a
  relay that has just taken the lock waits until a fence it finds has passed,
  unless the relay that wrote it is gone (each relay holds an "alive" advisory
  lock on one more connection for its whole life: a crashed replica costs no
  wait; after a PostgreSQL crash every relay looks gone: see below). A batch
  hands no record to the producer once its deadline has passed
  or leadership is lost (checked before every record), so an old leader never
  publishes beside a new one. Records already handed over are not cancelled:
  they go out anyway, and marking what the broker acked (through the pool, in
  a ``finally``) is what keeps the new leader from publishing them again
  (except after a PostgreSQL crash, below: then nothing does).
- The relay's own connections keep their sessions (``idle_session_timeout`` 0)
  and let the server drop a partitioned leader's session in about 30 s (TCP
  keepalives and ``tcp_user_timeout``), which frees the lock for another replica.
- It is woken by the service's units of work as soon as one commits outbox
  rows (:meth:`OutboxRelay.wake`): in-process when this replica's relay leads;
  otherwise with ``NOTIFY creditnotes_outbox``, which the leader LISTENs to,
  sent after the commit in a statement of its own on the relay's alive
  connection (never inside a batch's transaction: a NOTIFY serialises
  concurrent commits, which is why migration 0017 dropped the trigger that
  notified on insert). Those NOTIFYs are coalesced: at most one in flight, and
  commits during it cause exactly one more, so the last commit is always
  followed by one; one that fails is logged (debug) and left to the leader's
  poll, which also sweeps up anything else. ``creditnotes outbox retry`` wakes
  it with a NOTIFY too.
- Its own writes cost no disk flush: the "published" marks and the fence (set
  and cleared) commit with ``synchronous_commit = off``. A
  mark lost in a PostgreSQL crash only publishes the same event ids again (the
  crash loses a suffix of the commits, so the marks lost are the last ones, and
  the rows go out again in order). A fence lost in a crash changes nothing,
  but not because the crash is harmless to order: a PostgreSQL crash ends every
  session, the relays' alive locks included, so after it a new leader waits for
  no fence, lost or not, while the former leader's process may still be alive
  with at most one unacked record per key in its producer. That record can land
  after the new leader has published it again and newer events of the same key
  (raw order of key K: s, s+1, s): a stale duplicate. Order by first appearance
  of each event id stays correct (both relays send each key's rows in ``seq``
  order, and the rows before s were acked before the crash), so consumers that
  deduplicate by ``id`` see each key's events in order.
- Order: rows with the same key (the invoice id, on any topic) form a chain; a
  chain hands its next row to the producer only after the broker acked the
  previous one, so a refused or timed-out row is never overtaken. Different
  keys are pipelined. A key-less row is a chain of its own (Kafka gives such
  records no order to keep).
- Rows are marked published only after the broker acknowledged them. A crash
  in between publishes them again with the same event ids (at-least-once on
  the wire, deduplicable downstream by ``id``).
- A row the broker refuses for a fault of the record itself (too large, an
  invalid topic or timestamp, a policy, the topic's ACL) is parked with its
  error, and its key's later rows are held (parked with ``held_behind``) so the
  batch read never walks them; every other key flows. Any other error (the
  cluster, the client, the network, a timeout) is retried with backoff, never
  parked. ``creditnotes outbox retry`` un-parks a row and the rows held behind it.

The end of the module holds what ops and ``/metrics`` ask of the outbox: the
backlog, the parked rows, and releasing them (``creditnotes outbox``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from aiokafka.errors import (
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)
from opentelemetry import trace

from service.adapters.event_codec import CONTENT_TYPE
from service.adapters.kafka_producer import KafkaProducer
from service.adapters.unavailable import DATABASE_ERRORS, DRIVER_ERRORS, NETWORK_ERRORS, Backoff
from service.headers import Header
from service.tracing import context_from_traceparent, headers_for, messaging_attributes

_RELAY_LOCK_KEY = 0x6F757462  # "outb"
#: (this, a relay's random key): held for the relay's life on a connection of its own, so a
#: new leader can tell a former leader that is gone (no fence to wait out) from one alive
_ALIVE_CLASS = 0x6F757463  # "outc"
_CHANNEL = "creditnotes_outbox"
#: How long marking and clearing the fence may take after a batch's publish deadline.
_MARK_MARGIN_SECONDS = 5.0
_LOCK_QUERY_TIMEOUT_SECONDS = 5.0
#: How long a wake-up NOTIFY may take before it is given up (the leader's poll remains).
_NOTIFY_TIMEOUT_SECONDS = 2.0
#: Kafka's legal topic names; aiokafka would wait for metadata that never comes
_LEGAL_TOPIC = re.compile(r"(?!\.{1,2}$)[a-zA-Z0-9._-]{1,249}")
#: The relay's own connections (lock, alive): never closed for idling (a managed
#: PostgreSQL's idle_session_timeout would drop the alive lock), and a peer that
#: vanished without a FIN or RST is noticed by the server in about 30 s, not 2 h.
RELAY_SESSION_SETTINGS = {
    "idle_session_timeout": "0",
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
log = structlog.get_logger(__name__)

#: Refusals of the record itself: sending it again is refused again. Everything
#: else (cluster authorization, versions, quotas, the network, timeouts) is retried.
_RECORD_FAULTS = (
    MessageSizeTooLargeError, RecordListTooLargeError, InvalidTopicError,
    InvalidTimestampError, PolicyViolationError, TopicAuthorizationFailedError,
)

#: Rows the relay may send, each with the refused row it must be held behind, if
#: any (a row of its key parked earlier); only the batch's rows are probed.
_PENDING = """
    SELECT c.seq, c.event_id, c.topic, c.key, c.type, c.payload, c.traceparent,
           (SELECT coalesce(p.held_behind, p.seq) FROM outbox p
            WHERE p.parked_at IS NOT NULL AND p.key = c.key AND p.seq < c.seq
            ORDER BY p.seq LIMIT 1) AS behind
    FROM (SELECT seq, event_id, topic, key, type, payload, traceparent FROM outbox
          WHERE published_at IS NULL AND parked_at IS NULL ORDER BY seq LIMIT $1) c
    ORDER BY c.seq
"""
#: Hold rows behind refused ones, unless that refused row was un-parked meanwhile
#: (FOR SHARE waits for a concurrent ``outbox retry`` and sees its result).
_HOLD = """
    WITH still_parked AS (
        SELECT seq FROM outbox
        WHERE seq = ANY($2::bigint[]) AND parked_at IS NOT NULL AND held_behind IS NULL
        FOR SHARE)
    UPDATE outbox o SET parked_at = now(), held_behind = h.root,
                        park_error = 'waits behind seq ' || h.root
    FROM unnest($1::bigint[], $2::bigint[]) AS h(seq, root)
    JOIN still_parked r ON r.seq = h.root
    WHERE o.seq = h.seq AND o.published_at IS NULL AND o.parked_at IS NULL
"""
#: Park a refused row and hold its key's later unpublished rows behind it.
_PARK = """
    WITH parked AS (
        UPDATE outbox SET parked_at = now(), park_error = $2
        WHERE seq = $1 AND published_at IS NULL AND parked_at IS NULL RETURNING seq, key)
    UPDATE outbox o SET parked_at = now(), held_behind = p.seq,
                        park_error = 'waits behind seq ' || p.seq
    FROM parked p
    WHERE o.key = p.key AND o.seq > p.seq AND o.published_at IS NULL AND o.parked_at IS NULL
"""
#: Prefixed to a statement sent alone (its own transaction): that commit does not wait
#: for the disk (see the module's docstring for what a lost one costs).
_WITHOUT_FLUSH = ("WITH no_flush AS MATERIALIZED"
                  " (SELECT set_config('synchronous_commit', 'off', true)) ")
_HOLDER_ALIVE = """
    SELECT EXISTS (
        SELECT FROM pg_locks WHERE locktype = 'advisory' AND classid = $1
          AND objid = $2 AND objsubid = 2 AND granted
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))
"""
_STILL_LEADER = """
    WITH no_flush AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))
    UPDATE outbox_relay_fence
    SET holder = $1, fence_until = clock_timestamp() + make_interval(secs => $2)
    FROM no_flush
    WHERE id = 1
      AND EXISTS (
        SELECT FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
          AND classid = 0 AND objid = $3 AND objsubid = 1 AND granted)
      AND EXISTS (
        SELECT FROM pg_locks WHERE locktype = 'advisory' AND pid = $6
          AND classid = $4 AND objid = $5 AND objsubid = 2 AND granted)
    RETURNING fence_until
"""


def parkable(error: BaseException) -> bool:
    """A refusal of this record that publishing it again cannot fix (an allow-list).

    ``CorruptRecordException`` is not one: it is also a CRC mismatch on the
    network (retriable in the Java client). Kafka's INVALID_RECORD (87) reaches
    aiokafka as ``UnknownError``, indistinguishable from other faults: retried.
    """
    return isinstance(error, _RECORD_FAULTS)


class LeadershipLost(Exception):
    """The relay's lock or alive connection is gone, or no longer holds its lock."""


#: What interrupts the relay without being a bug: a server, the network, the producer
#: (``RuntimeError``: a send it cancelled), or leadership lost. Logged as a warning.
_INTERRUPTIONS: tuple[type[Exception], ...] = (*DRIVER_ERRORS, RuntimeError, LeadershipLost)


@dataclass
class _Batch:
    published: list[int] = field(default_factory=list)
    parked: int = 0
    held: int = 0
    #: the first error that is not the record's fault: the relay backs off after the batch
    error: BaseException | None = None


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
        #: set when the alive connection is lost (the relay then stops leading)
        self._alive_lost = asyncio.Event()
        #: set while this relay leads
        self.leading = asyncio.Event()
        #: the NOTIFY in flight that wakes another replica's leader, if any
        self._notifier: asyncio.Task[None] | None = None
        #: a commit happened while that NOTIFY was in flight: send one more
        self._notify_again = False
        self._closed = False
        #: NOTIFYs sent to wake the leader (for tests and debugging)
        self.notifies_sent = 0

    async def run(self, stopping: asyncio.Event) -> None:
        """Relay until ``stopping`` is set; survives database and broker outages."""
        backoff = Backoff(self._poll_seconds, self._max_backoff)
        failures = 0
        self._closed = False
        try:
            while not stopping.is_set():
                try:
                    await self._stay_alive()
                    await self._run_as_leader(stopping)
                    failures = 0
                except _INTERRUPTIONS as error:
                    failures += 1
                    log.warning("outbox relay interrupted, retrying", error=type(error).__name__,
                                retry_in_s=backoff.seconds_before(failures))
                    await _sleep_unless(stopping, backoff.seconds_before(failures))
                except Exception as error:  # a relay that stopped would wedge the outbox
                    failures += 1
                    log.exception("outbox relay failed, retrying", error=type(error).__name__,
                                  retry_in_s=backoff.seconds_before(failures))
                    await _sleep_unless(stopping, backoff.seconds_before(failures))
        finally:
            await self.close()
            if self._alive is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._alive.close(), 5)

    async def _stay_alive(self) -> None:
        """Hold this relay's own "alive" lock (again, after its connection was lost)."""
        if self._alive is not None and not self._alive.is_closed() \
                and not self._alive_lost.is_set():
            return
        if self._alive is not None:
            self._alive.terminate()
        self._alive = None
        connection = await _connect(self._database_url)
        try:
            await connection.execute("SELECT pg_advisory_lock($1, $2)", _ALIVE_CLASS,
                                     self._alive_key)
        except BaseException:
            connection.terminate()
            raise
        self._alive_lost.clear()
        connection.add_termination_listener(lambda _: self._alive_lost.set())
        self._alive = connection

    def _check_alive(self, lost: asyncio.Event) -> None:
        if lost.is_set():
            raise LeadershipLost("the relay's lock connection was lost")
        if self._alive_lost.is_set():
            raise LeadershipLost("the relay's alive connection was lost")

    async def _run_as_leader(self, stopping: asyncio.Event) -> None:
        lock = await _connect(self._database_url)
        lost = asyncio.Event()
        lock.add_termination_listener(lambda _: lost.set())
        try:
            while not await self._lock_query(lock.fetchval(
                    "SELECT pg_try_advisory_lock($1)", _RELAY_LOCK_KEY)):
                await _sleep_unless(stopping, self._poll_seconds)
                if stopping.is_set():
                    return
                self._check_alive(lost)
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
                self._check_alive(lost)
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
            self._check_alive(lost)

    async def _publish_fenced(self, lock: asyncpg.Connection, lost: asyncio.Event) -> int:
        """One batch, after proving on the lock connection that this relay still leads."""
        self._check_alive(lost)
        started = time.monotonic()
        fence = self._publish_timeout + _MARK_MARGIN_SECONDS
        alive_pid = self._alive.get_server_pid() if self._alive is not None else 0
        if await self._lock_query(lock.fetchval(
                _STILL_LEADER, self._holder, fence, _RELAY_LOCK_KEY, _ALIVE_CLASS,
                self._alive_key, alive_pid)) is None:
            raise LeadershipLost("the relay's lock (or its alive lock) is no longer held")
        try:
            return await self.publish_pending(deadline=started + self._publish_timeout,
                                              may_send=lambda: self._check_alive(lost))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.execute(
                    _WITHOUT_FLUSH + "UPDATE outbox_relay_fence SET fence_until = NULL"
                    " FROM no_flush WHERE id = 1 AND holder = $1", self._holder),
                    _MARK_MARGIN_SECONDS)

    async def _lock_query(self, query: Any) -> Any:
        try:
            return await asyncio.wait_for(query, _LOCK_QUERY_TIMEOUT_SECONDS)
        except (*NETWORK_ERRORS, *DATABASE_ERRORS) as error:
            # killed mid-query, asyncpg may also answer "another operation is in progress"
            raise LeadershipLost(f"the relay's lock connection failed: {type(error).__name__}") \
                from error

    async def publish_pending(self, deadline: float | None = None,
                              may_send: Callable[[], None] | None = None) -> int:
        """Publish one batch of unpublished rows in order; returns how many were read.

        Each key's rows go out one after the other (the next only once the
        broker acked the previous), keys side by side. Before handing any record
        to the producer, ``may_send`` (raises when leadership is lost) and the
        deadline are checked. Acked rows are marked published whatever happens
        to the rest of the batch; a refused row is parked with its key's later
        rows held; any other failure stops that key for this batch, and is
        raised after marking so the relay backs off and sends it again.
        """
        rows = await self._pool.fetch(_PENDING, self._batch_size)
        if not rows:
            return 0
        batch = _Batch()
        behind = [row for row in rows if row["behind"] is not None]
        if behind:  # a key with a parked row: held, never walked again
            await self._pool.execute(_HOLD, [row["seq"] for row in behind],
                                     [row["behind"] for row in behind])
            batch.held = len(behind)
        chains: dict[object, list[asyncpg.Record]] = {}
        for row in rows:
            if row["behind"] is None:
                key = row["key"] if row["key"] is not None else ("no key", row["seq"])
                chains.setdefault(key, []).append(row)

        def check() -> None:
            if may_send is not None:
                may_send()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("the batch's publish deadline has passed")

        try:
            sends = [self._send_chain(chain, batch, check) for chain in chains.values()]
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*sends, return_exceptions=True), timeout)
            except TimeoutError as error:  # records still unacked: sent again next batch
                results = [error]
            for result in results:
                if isinstance(result, asyncio.CancelledError):  # a send, not this task
                    result = RuntimeError("the producer cancelled a send")
                if isinstance(result, BaseException) and batch.error is None:
                    batch.error = result
        finally:
            if batch.published:  # within the fence's margin: a successor never reads them unmarked
                await asyncio.wait_for(self._pool.execute(
                    # a row another relay marked already stays as it is (0013 refuses a second mark)
                    _WITHOUT_FLUSH + "UPDATE outbox SET published_at = now() FROM no_flush"
                    " WHERE seq = ANY($1::bigint[]) AND published_at IS NULL",
                    sorted(set(batch.published))),
                    None if deadline is None else _MARK_MARGIN_SECONDS)
        log.debug("outbox published", count=len(batch.published), parked=batch.parked,
                  held=batch.held)
        if batch.error is not None:
            raise batch.error
        return len(rows)

    async def _send_chain(self, rows: list[asyncpg.Record], batch: _Batch,
                          check: Callable[[], None]) -> None:
        """Send one key's rows in order, each after the previous one was acked."""
        for row in rows:
            check()
            span = self._tracer.start_span(
                f"publish {row['type']}", context=context_from_traceparent(row["traceparent"]),
                kind=trace.SpanKind.PRODUCER, attributes=messaging_attributes(row["topic"]))
            try:
                try:
                    future = await self._enqueue(row, span)
                    future.add_done_callback(_recorder(batch, row["seq"]))
                    # shielded: a deadline must not cancel a record the producer holds
                    await asyncio.shield(future)
                except KafkaError as error:
                    if not parkable(error):
                        raise
                    await self._park(row, error)
                    batch.parked += 1
                    return
            finally:
                span.end()

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

    async def _park(self, row: asyncpg.Record, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"[:1000]
        await self._pool.execute(_PARK, row["seq"], reason)
        log.error("outbox event parked", seq=row["seq"], event_id=row["event_id"],
                  topic=row["topic"], key=row["key"], type=row["type"],
                  error=type(error).__name__, size=len(row["payload"].encode()))

    def wake(self) -> None:
        """Publish now: a unit of work of this process committed outbox rows.

        Leading, this relay wakes itself. Otherwise it NOTIFYs the leader, after
        the commit, outside any transaction, without waiting: at most one NOTIFY
        in flight, and a commit during it asks for one more (sent once it ends).
        """
        self._wake.set()
        if self.leading.is_set() or self._closed:
            return
        if self._notifier is not None and not self._notifier.done():
            self._notify_again = True
            return
        self._notifier = asyncio.get_running_loop().create_task(
            self._notify_leader(), name="outbox-relay-notify")

    async def _notify_leader(self) -> None:
        while not self._closed and not self.leading.is_set():
            self._notify_again = False  # a commit from now on asks for one more
            connection = self._alive
            try:
                if connection is None or connection.is_closed() or self._alive_lost.is_set():
                    raise ConnectionError("the relay's alive connection is not open")
                await asyncio.wait_for(connection.execute("SELECT pg_notify($1, '')", _CHANNEL),
                                       _NOTIFY_TIMEOUT_SECONDS)
                self.notifies_sent += 1
            except Exception as error:  # the leader's poll publishes the rows anyway
                log.debug("outbox relay wake-up not sent, the leader's poll will publish",
                          error=type(error).__name__)
            if not self._notify_again:
                return

    async def close(self) -> None:
        """Send no more wake-ups; ends the one in flight (within its timeout)."""
        self._closed = True
        notifier, self._notifier = self._notifier, None
        if notifier is not None and not notifier.done():
            with contextlib.suppress(Exception):  # a timeout cancels it
                await asyncio.wait_for(notifier, _NOTIFY_TIMEOUT_SECONDS)

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    async def _wait(self, stopping: asyncio.Event, lost: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(event.wait())
                 for event in (self._wake, stopping, lost, self._alive_lost)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()


def _recorder(batch: _Batch, seq: int) -> Callable[[asyncio.Future[Any]], None]:
    """Record an ack the moment it arrives, so it is marked even if the batch then fails."""
    def record(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            batch.published.append(seq)
    return record


async def _connect(database_url: str,
                   settings: dict[str, str] = RELAY_SESSION_SETTINGS) -> asyncpg.Connection:
    try:
        connection: asyncpg.Connection = await asyncpg.connect(
            database_url, server_settings=settings)
    except asyncpg.UndefinedObjectError:
        if "idle_session_timeout" not in settings:
            raise
        # PostgreSQL 13 has no idle_session_timeout (nor can it end an idle session)
        return await _connect(database_url, {name: value for name, value in settings.items()
                                             if name != "idle_session_timeout"})
    return connection


async def _sleep_unless(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


# --------------------------------------------------------------------------- for ops and /metrics


@dataclass(frozen=True)
class Backlog:
    """The unpublished rows: how many, the oldest one's age, how many were refused (parked)."""

    rows: int
    oldest_seconds: float
    parked: int


async def backlog(connection: asyncpg.Connection) -> Backlog:
    row = await connection.fetchrow(
        "SELECT count(*) AS backlog, coalesce(extract(epoch FROM now()"
        " - min(created_at)), 0) AS oldest_seconds,"
        " count(*) FILTER (WHERE parked_at IS NOT NULL AND held_behind IS NULL)"
        " AS parked FROM outbox"
        " WHERE published_at IS NULL")
    assert row is not None  # an aggregate always answers one row
    return Backlog(row["backlog"], float(row["oldest_seconds"]), row["parked"])


@dataclass(frozen=True)
class Parked:
    seq: int
    topic: str
    key: str | None
    type: str
    error: str
    parked_at: datetime
    size: int
    waiting: int  # later rows of the same key held behind this one, released with it


async def parked_rows(database_url: str) -> list[Parked]:
    """The rows the broker refused (not the rows held behind them: counted in ``waiting``)."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            """
            SELECT p.seq, p.topic, p.key, p.type, p.park_error, p.parked_at,
                   octet_length(p.payload::text) AS size,
                   (SELECT count(*) FROM outbox w WHERE w.held_behind = p.seq
                      AND w.published_at IS NULL) AS waiting
            FROM outbox p WHERE p.parked_at IS NOT NULL AND p.held_behind IS NULL ORDER BY p.seq
            """)
    finally:
        await connection.close()
    return [Parked(row["seq"], row["topic"], row["key"], row["type"], row["park_error"] or "",
                   row["parked_at"], row["size"], row["waiting"]) for row in rows]


async def release(database_url: str, seq: int | None) -> tuple[list[int], int]:
    """Un-park one refused row (or all when ``seq`` is None) and release the rows held
    behind it, then wake the relay; returns the refused rows' seqs and how many were held."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            rows = await connection.fetch(
                "WITH target AS (SELECT seq, held_behind FROM outbox"
                "   WHERE parked_at IS NOT NULL AND ($1::bigint IS NULL"
                "     OR (seq = $1 AND held_behind IS NULL) OR held_behind = $1) FOR UPDATE)"
                " UPDATE outbox o SET parked_at = NULL, park_error = NULL, held_behind = NULL"
                " FROM target t WHERE o.seq = t.seq RETURNING o.seq, t.held_behind", seq)
            await connection.execute("SELECT pg_notify($1, '')", _CHANNEL)
    finally:
        await connection.close()
    refused = sorted(row["seq"] for row in rows if row["held_behind"] is None)
    return refused, len(rows) - len(refused)


async def unpark(database_url: str, seq: int | None) -> list[int]:
    """Un-park one refused row (or all) with the rows held behind it; returns its seqs."""
    refused, _ = await release(database_url, seq)
    return refused
