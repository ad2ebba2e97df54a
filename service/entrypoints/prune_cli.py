"""``creditnotes prune [--dry-run]``: one retention run now, printing what it deleted per table."""

from __future__ import annotations

import asyncio

import asyncpg
from rich.console import Console

from service.adapters.retention import Policy, Pruned, prune_if_leader
from service.settings import Settings


def prune_command(settings: Settings, policy: Policy, *, dry_run: bool,
                  console: Console | None = None) -> int:
    console = console or Console()
    results = asyncio.run(_prune(settings.database_url, policy, dry_run))
    if results is None:
        console.print("another replica is pruning right now; nothing done")
        return 1
    console.print(render(results, dry_run))
    return 0


async def _prune(database_url: str, policy: Policy, dry_run: bool) -> list[Pruned] | None:
    connection = await asyncpg.connect(database_url)
    try:
        return await prune_if_leader(connection, policy, dry_run=dry_run)
    finally:
        await connection.close()


def render(results: list[Pruned], dry_run: bool) -> str:
    verb = "would delete" if dry_run else "deleted"
    what = {"outbox": "published outbox rows", "processed_messages": "processed-message keys",
            "dlq_replays": "replay audit rows"}
    return "\n".join(
        f"{result.table}: {verb} {result.rows} {what.get(result.table, 'rows')} older than "
        f"{result.cutoff.isoformat(timespec='seconds')} ({result.seconds:.1f} s)"
        for result in results)

