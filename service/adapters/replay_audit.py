"""The audit trail of dead-letter replays (table ``dlq_replays``)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class ReplayedRecord:
    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    original_topic: str
    original_partition: int | None
    original_offset: int | None
    reason: str | None
    record_key: str | None


class ReplayAudit:
    def __init__(self, connection: asyncpg.Connection, run: str, operator: str) -> None:
        self._connection = connection
        self._run = run
        self._operator = operator

    async def replayed_before(self, dlq_topic: str, partition: int, offset: int) -> bool:
        return bool(await self._connection.fetchval(
            """SELECT true FROM dlq_replays
               WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3""",
            dlq_topic, partition, offset))

    async def record(self, replayed: ReplayedRecord) -> None:
        await self._connection.execute(
            """
            INSERT INTO dlq_replays (dlq_topic, dlq_partition, dlq_offset, original_topic,
                original_partition, original_offset, reason, record_key, replay_run, replayed_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            ON CONFLICT DO NOTHING
            """,
            replayed.dlq_topic, replayed.dlq_partition, replayed.dlq_offset,
            replayed.original_topic, replayed.original_partition, replayed.original_offset,
            replayed.reason, replayed.record_key, self._run, self._operator,
        )
