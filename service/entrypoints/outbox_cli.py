"""``creditnotes outbox list|retry``: see the events the broker refused, and publish them again.

A parked row (service/adapters/outbox_relay.py) waits, with the later events
of its invoice held behind it, until ops fix the cause (a topic's size limit,
an ACL) and un-park it; the relay then publishes it and them, in order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from rich.console import Console
from rich.table import Table

from service.settings import Settings

_CHANNEL = "creditnotes_outbox"


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


def outbox_command(action: str, settings: Settings, *, seq: int | None = None,
                   every: bool = False, console: Console | None = None) -> int:
    console = console or Console()
    if action == "list":
        parked = asyncio.run(parked_rows(settings.database_url))
        if not parked:
            console.print("no parked outbox rows")
            return 0
        table = Table(title="parked outbox rows (refused by the broker; waiting: rows of the"
                      " same key held behind it, released with it)", title_justify="left")
        for column in ("seq", "topic", "key", "type", "error", "parked_at", "size", "waiting"):
            table.add_column(column, overflow="fold")
        for row in parked:
            table.add_row(str(row.seq), row.topic, row.key or "", row.type, row.error,
                          row.parked_at.isoformat(timespec="seconds"), str(row.size),
                          str(row.waiting))
        console.print(table)
        return 0
    if seq is None and not every:
        console.print("say which rows: --seq N or --all")
        return 2
    done, held = asyncio.run(release(settings.database_url, None if every else seq))
    if not done:
        console.print("no parked outbox row matched; nothing done (a held row is released"
                      " with the parked row it waits behind)")
        return 1
    console.print(f"un-parked {len(done)} row(s) (seq {', '.join(map(str, done))}) and released"
                  f" the {held} held behind them; the relay publishes them, then the events"
                  " waiting behind them")
    return 0
