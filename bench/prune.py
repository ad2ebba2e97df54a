"""Does pruning a million rows stall the consumers? (``python -m bench.prune``)

Fills a throwaway database (``bench_prune_<hex>`` on the PostgreSQL of
``CREDITNOTES_DATABASE_URL``, an admin URL; default 127.0.0.1:5432) with
``--rows`` old processed-message keys and as many old published outbox rows,
then runs a concurrent writer doing what a consumer's batch does (claim keys
with ``INSERT ... ON CONFLICT``, write outbox rows, record outcomes, in one
transaction) at a fixed rate, plus a relay marking rows published. It measures
the writer's transaction latency for ``--baseline`` seconds, then while
retention prunes (as a member of ``creditnotes_app``, with the service's
default policy unless told otherwise), and prints duration, rows/s and the
latency percentiles of both phases. The database is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from service.adapters.migrations import migrate
from service.adapters.retention import Policy, prune_if_leader
from service.settings import MIGRATIONS_DIR, Settings

RESULTS = Path(__file__).resolve().parent / "results"
PAYLOAD = json.dumps({"specversion": "1.0", "type": "credit_note.issued",
                      "source": "/billing/credit-notes", "data": {
                          "id": "cn_0123456789abcdef", "number": "ACME-1001-CN-01",
                          "invoice_id": "in_1001", "total": 1000, "currency": "usd",
                          "lines": [{"description": "Widget", "net": 1000, "tax": 0}]}})


def _with_database(url: str, name: str, user: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc if user is None else f"{user}@{parts.netloc.rsplit('@', 1)[-1]}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{name}"))


async def fill(url: str, rows: int) -> None:
    """``rows`` keys processed 31-90 days ago and ``rows`` outbox rows published 8-60 days ago."""
    connection = await asyncpg.connect(url)
    try:
        chunk = 200_000
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows) - 1
            await connection.execute(f"""
                INSERT INTO processed_messages (source, id, type, topic, kafka_partition,
                                                kafka_offset, outcome, processed_at)
                SELECT '/bench', 'old-' || i, 'credit_note.issue', 'credit-note-commands',
                       i % 6, i, 'applied',
                       now() - interval '90 days' + (i * interval '59 days') / {rows}
                FROM generate_series({start}, {end}) AS i""")
            await connection.execute(f"""
                INSERT INTO outbox (event_id, topic, key, type, payload, created_at, published_at)
                SELECT 'old-' || i, 'credit-note-events', 'in_' || (i % 10000),
                       'credit_note.issued', $1::json,
                       now() - interval '60 days' + (i * interval '52 days') / {rows},
                       now() - interval '60 days' + (i * interval '52 days') / {rows}
                FROM generate_series({start}, {end}) AS i""", PAYLOAD)
        await connection.execute("VACUUM ANALYZE processed_messages")
        await connection.execute("VACUUM ANALYZE outbox")
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()


@dataclass
class Writer:
    """A consumer's unit of work at a fixed rate, and a relay, on their own pool."""

    pool: asyncpg.Pool
    rate: float  # transactions per second
    per_transaction: int
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (started, seconds)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def consumer(self) -> None:
        period = 1 / self.rate
        next_at = time.perf_counter()
        while not self.stopping.is_set():
            next_at += period
            started = time.perf_counter()
            await self.one_batch()
            self.latencies.append((started, time.perf_counter() - started))
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    async def one_batch(self) -> None:
        ids = [uuid.uuid4().hex for _ in range(self.per_transaction)]
        n = len(ids)
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.fetch(
                """
                INSERT INTO processed_messages
                    (source, id, type, topic, kafka_partition, kafka_offset, outcome)
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[],
                                     $6::bigint[], $7::text[])
                ON CONFLICT (source, id) DO UPDATE SET outcome = 'applied'
                    WHERE processed_messages.outcome LIKE 'released:%'
                RETURNING source, id
                """, ["/bench"] * n, ids, ["credit_note.issue"] * n,
                ["credit-note-commands"] * n, [0] * n, list(range(n)), ["applied"] * n)
            await connection.execute(
                """
                INSERT INTO outbox (event_id, topic, key, type, payload)
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::json[])
                """, ids, ["credit-note-events"] * n, ["in_1"] * n,
                ["credit_note.issued"] * n, [PAYLOAD] * n)
            await connection.execute(
                """
                UPDATE processed_messages AS p SET outcome = u.outcome
                FROM unnest($1::text[], $2::text[], $3::text[]) AS u (source, id, outcome)
                WHERE p.source = u.source AND p.id = u.id
                """, ["/bench"] * n, ids, ["applied"] * n)

    async def relay(self) -> None:
        while not self.stopping.is_set():
            await self.pool.execute(
                """
                UPDATE outbox SET published_at = now() WHERE seq = ANY(ARRAY(
                    SELECT seq FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT 500))
                """)
            await asyncio.sleep(0.05)

    def between(self, start: float, end: float) -> list[float]:
        return [seconds for started, seconds in self.latencies if start <= started < end]


def summary(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"transactions": 0}
    ordered = sorted(seconds)
    quantiles = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"transactions": len(ordered), "p50_ms": round(quantiles[49] * 1000, 2),
            "p99_ms": round(quantiles[98] * 1000, 2), "max_ms": round(ordered[-1] * 1000, 2)}


async def run(args: argparse.Namespace) -> dict[str, object]:
    admin_url = os.environ.get("CREDITNOTES_DATABASE_URL",
                               "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"bench_prune_{uuid.uuid4().hex[:8]}"
    user = f"{name}_app"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(admin_url, name)
    try:
        await migrate(url, MIGRATIONS_DIR)
        await admin.execute(f'CREATE ROLE "{user}" LOGIN IN ROLE creditnotes_app')
        started = time.perf_counter()
        await fill(url, args.rows)
        fill_seconds = time.perf_counter() - started
        print(f"filled {args.rows:,} keys and {args.rows:,} outbox rows in {fill_seconds:.0f} s")

        defaults = Settings()
        policy = Policy(processed_messages_days=defaults.retention_processed_messages_days,
                        outbox_days=defaults.retention_outbox_days,
                        dlq_replays_days=defaults.retention_dlq_replays_days,
                        batch_size=args.batch_size or defaults.retention_batch_size,
                        pause_seconds=(args.pause if args.pause is not None
                                       else defaults.retention_batch_pause_seconds))
        pool = await asyncpg.create_pool(url, min_size=4, max_size=4)
        writer = Writer(pool, args.rate, args.per_transaction)
        tasks = [asyncio.create_task(writer.consumer()) for _ in range(2)]
        tasks.append(asyncio.create_task(writer.relay()))
        before_start = time.perf_counter()
        await asyncio.sleep(args.baseline)
        prune_start = time.perf_counter()
        app = await asyncpg.connect(_with_database(admin_url, name, user))
        try:
            results = await prune_if_leader(app, policy)
        finally:
            await app.close()
        prune_end = time.perf_counter()
        writer.stopping.set()
        await asyncio.gather(*tasks)
        await pool.close()
        assert results is not None
        deleted = {result.table: result.rows for result in results}
        seconds = prune_end - prune_start
        report: dict[str, object] = {
            "rows_per_table": args.rows, "batch_size": policy.batch_size,
            "pause_seconds": policy.pause_seconds,
            "writer": {"transactions_per_second": args.rate * 2,
                       "messages_per_transaction": args.per_transaction},
            "deleted": deleted, "prune_seconds": round(seconds, 1),
            "rows_per_second": round(sum(deleted.values()) / seconds),
            "per_table_seconds": {result.table: round(result.seconds, 1) for result in results},
            "writer_before": summary(writer.between(before_start, prune_start)),
            "writer_during": summary(writer.between(prune_start, prune_end)),
            "load_average_after": [round(load, 2) for load in os.getloadavg()],
            "cores": os.cpu_count(),
        }
        return report
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{user}"')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prune", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="old keys, and as many old published outbox rows (default 1,000,000)")
    parser.add_argument("--batch-size", type=int, help="default: the service's setting")
    parser.add_argument("--pause", type=float, help="seconds between batches; default: setting")
    parser.add_argument("--rate", type=float, default=25.0,
                        help="transactions per second of each of the two writers (default 25)")
    parser.add_argument("--per-transaction", type=int, default=20,
                        help="messages per writer transaction (default 20)")
    parser.add_argument("--baseline", type=float, default=20.0,
                        help="seconds measured before pruning (default 20)")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune-latest.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
