"""``creditnotes outbox list|retry``: see the events the broker refused, and publish them again.

A parked row (service/adapters/outbox_relay.py) waits, with the later events
of its invoice held behind it, until ops fix the cause (a topic's size limit,
an ACL) and un-park it; the relay then publishes it and them, in order.
"""

from __future__ import annotations

import asyncio

from rich.console import Console
from rich.table import Table

from service.adapters.outbox_relay import parked_rows, release
from service.settings import Settings


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
