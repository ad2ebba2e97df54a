"""Retention: prunes what only grows (processed-message keys, published outbox rows, replay audit).

Batched deletes rather than one big one: each batch is its own short
transaction of at most ``batch_size`` rows, found through an index on the
row's time in that time's order (each batch starts where the last one ended,
so no batch walks over the index entries its predecessors left dead), with a
pause between batches, so consumers writing meanwhile never wait long on it.
Only one replica prunes at a time (a session advisory lock held for the run).

What is eligible is decided here *and* by the database (migration 0009: a
guard trigger lets the application role delete only eligible rows):

- ``outbox``: rows published more than ``outbox_days`` ago; an unpublished or
  parked row is never touched (``published_at`` is NULL for both);
- ``processed_messages``: keys older than ``processed_messages_days`` (the
  dedupe window), except payments' keys, kept for ever: a payment is
  deduplicated by nothing else;
- ``dlq_replays``: audit rows older than ``dlq_replays_days``, but never a
  replay still ``claimed`` (maybe sent: a later run must not send it again).

Before deleting from a table the run records its cutoff in
``retention_horizons``, so ``creditnotes verify`` knows which outbox events
may legitimately be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from service.adapters.unavailable import DATABASE_ERRORS, NETWORK_ERRORS

log = structlog.get_logger(__name__)

LOCK_KEY = 0x70726E65  # "prne": one pruning replica at a time
PAYMENT_TYPE = "invoice.payment_succeeded"

Connection = asyncpg.Connection | PoolConnectionProxy


@dataclass(frozen=True)
class Policy:
    processed_messages_days: int = 30
    outbox_days: int = 7
    dlq_replays_days: int = 90
    batch_size: int = 5_000
    pause_seconds: float = 0.05


@dataclass(frozen=True)
class _Target:
    table: str
    time_column: str
    eligible: str  # SQL, with $1 the cutoff


_TARGETS = (
    _Target("outbox", "published_at", "published_at IS NOT NULL AND published_at < $1"),
    # the literal matches the partial index processed_messages_prunable
    _Target("processed_messages", "processed_at",
            f"type <> '{PAYMENT_TYPE}' AND processed_at < $1"),
    _Target("dlq_replays", "replayed_at", "replayed_at < $1"),
)
# a replay claimed but never confirmed ("maybe sent", migration 0010) stays until settled
_UNSETTLED_REPLAYS = _Target("dlq_replays", "replayed_at",
                             "replayed_at < $1 AND state IS DISTINCT FROM 'claimed'")


@dataclass(frozen=True)
class Pruned:
    table: str
    cutoff: datetime
    rows: int  # deleted, or that would be deleted in a dry run
    seconds: float


def _days(policy: Policy, table: str) -> int:
    return {"outbox": policy.outbox_days,
            "processed_messages": policy.processed_messages_days,
            "dlq_replays": policy.dlq_replays_days}[table]


async def prune(connection: Connection, policy: Policy, *, dry_run: bool = False,
                stop: Callable[[], bool] = lambda: False) -> list[Pruned]:
    """Prune every table once (the caller holds the lock); per table what was deleted.

    Cutoffs come from the database's clock, so the application's does not matter.
    """
    results = []
    for target in await _targets(connection):
        if stop():
            break
        started = time.perf_counter()
        cutoff: datetime = await connection.fetchval(
            "SELECT now() - make_interval(days => $1)", _days(policy, target.table))
        if dry_run:
            rows = await connection.fetchval(
                f"SELECT count(*) FROM {target.table} WHERE {target.eligible}", cutoff)
        else:
            rows = await _delete_in_batches(connection, target, cutoff, policy, stop)
        results.append(Pruned(target.table, cutoff, rows, time.perf_counter() - started))
    return results


async def _targets(connection: Connection) -> tuple[_Target, ...]:
    has_state = await connection.fetchval(
        "SELECT true FROM pg_attribute WHERE attrelid = 'dlq_replays'::regclass"
        " AND attname = 'state' AND NOT attisdropped")
    return (*_TARGETS[:2], _UNSETTLED_REPLAYS) if has_state else _TARGETS


async def _delete_in_batches(connection: Connection, target: _Target, cutoff: datetime,
                             policy: Policy, stop: Callable[[], bool]) -> int:
    await connection.execute(
        """
        INSERT INTO retention_horizons (table_name, pruned_before) VALUES ($1, $2)
        ON CONFLICT (table_name) DO UPDATE
            SET pruned_before = greatest(retention_horizons.pruned_before, EXCLUDED.pruned_before),
                updated_at = now()
        """, target.table, cutoff)
    column = target.time_column
    statement = f"""
        WITH deleted AS (
            DELETE FROM {target.table}
            WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM {target.table}
                WHERE {target.eligible} AND {column} >= $2
                ORDER BY {column} LIMIT $3))
              AND {target.eligible}
            RETURNING {column}
        )
        SELECT count(*) AS rows, max({column}) AS last FROM deleted
    """
    total = 0
    after = datetime.min.replace(tzinfo=cutoff.tzinfo)  # where the next batch starts
    while True:
        row = await connection.fetchrow(statement, cutoff, after, policy.batch_size)
        assert row is not None
        deleted: int = row["rows"]
        total += deleted
        if deleted < policy.batch_size or stop():
            return total
        after = row["last"]
        await asyncio.sleep(policy.pause_seconds)


async def prune_if_leader(connection: Connection, policy: Policy, *, dry_run: bool = False,
                          stop: Callable[[], bool] = lambda: False) -> list[Pruned] | None:
    """Prune unless another replica is pruning right now (then None)."""
    if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        return None
    try:
        # a batch never queues for long behind a lock; the next run tries again
        await connection.execute("SET lock_timeout = '5s'; SET statement_timeout = '120s'")
        return await prune(connection, policy, dry_run=dry_run, stop=stop)
    finally:
        with contextlib.suppress(*NETWORK_ERRORS, *DATABASE_ERRORS):
            await connection.execute("RESET lock_timeout; RESET statement_timeout")
            await connection.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


class RetentionTask:
    """The periodic prune inside ``creditnotes run``: a failure is logged, never fatal."""

    def __init__(self, pool: asyncpg.Pool, policy: Policy, interval_seconds: float,
                 on_pruned: Callable[[Pruned], None] | None = None,
                 on_run: Callable[[str], None] | None = None) -> None:
        self._pool = pool
        self._policy = policy
        self._interval = interval_seconds
        self._on_pruned = on_pruned or (lambda _: None)
        self._on_run = on_run or (lambda _: None)

    async def run(self, stopping: asyncio.Event) -> None:
        delay = min(self._interval, 60.0)  # soon after a start, so restarts never starve it
        while not await _stopped_within(stopping, delay):
            delay = self._interval
            await self.run_once(stopping)

    async def run_once(self, stopping: asyncio.Event | None = None) -> str:
        """One prune attempt; returns ``completed``, ``skipped`` or ``failed``."""
        try:
            async with self._pool.acquire() as connection:
                results = await prune_if_leader(
                    connection, self._policy,
                    stop=(stopping.is_set if stopping is not None else lambda: False))
        except Exception as error:  # a prune must never take the service down
            log.warning("retention failed, retrying next interval", error=type(error).__name__,
                        retry_in_s=self._interval)
            self._on_run("failed")
            return "failed"
        if results is None:
            log.info("retention skipped, another replica is pruning")
            self._on_run("skipped")
            return "skipped"
        for result in results:
            log.info("retention pruned", table=result.table, deleted=result.rows,
                     cutoff=result.cutoff.isoformat(), seconds=round(result.seconds, 3))
            self._on_pruned(result)
        self._on_run("completed")
        return "completed"


async def _stopped_within(stopping: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
    return stopping.is_set()
