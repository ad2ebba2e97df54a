"""The audit trail of dead-letter replays (table ``dlq_replays``, migration 0010).

A dead letter is identified by :attr:`Claim.digest`, a digest of its own bytes,
so the identity survives a broker or topic reset that reuses offsets. A row is
claimed, in its own committed statement, before the record is sent, and
confirmed after the broker acknowledged it: a crash in between leaves it
``claimed`` ("maybe sent"), which a later run never re-sends without ``--force``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

CLAIMED = "claimed"
SENT = "sent"


@dataclass(frozen=True)
class Claim:
    digest: str
    content_digest: str
    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    original_topic: str
    original_partition: int
    original_offset: int
    reason: str
    record_key: str | None


@dataclass(frozen=True)
class AuditRow:
    digest: str
    state: str
    reason: str | None
    replay_run: str
    replayed_at: datetime


class ReplayAudit:
    def __init__(self, connection: asyncpg.Connection, run: str, operator: str) -> None:
        self._connection = connection
        self.run = run
        self._operator = operator

    async def rows(self, digests: Sequence[str]) -> dict[str, AuditRow]:
        """The audit rows of these dead letters, by digest."""
        found = await self._connection.fetch(
            """SELECT dead_letter_digest, state, reason, replay_run, replayed_at
               FROM dlq_replays WHERE dead_letter_digest = ANY($1::text[])""", list(digests))
        return {row[0]: AuditRow(*row) for row in found}

    async def replayed_contents(self, content_digests: Sequence[str]
                                ) -> dict[str, list[AuditRow]]:
        """Earlier replays of the same content (any dead letter of it), oldest first."""
        found = await self._connection.fetch(
            """SELECT content_digest, dead_letter_digest, state, reason, replay_run, replayed_at
               FROM dlq_replays WHERE content_digest = ANY($1::text[])
               ORDER BY replayed_at""", list(set(content_digests)))
        replays: dict[str, list[AuditRow]] = {}
        for row in found:
            replays.setdefault(row[0], []).append(AuditRow(*row[1:]))
        return replays

    async def claim(self, claims: Sequence[Claim], *, reclaim: Sequence[str] = ()) -> set[str]:
        """Claim these dead letters for this run, committed before anything is sent.

        Returns the digests this run now holds: new rows, plus the ``claimed``
        ("maybe sent") rows listed in ``reclaim`` (``--force``). A dead letter
        another run claimed or sent first is not returned, so it is not sent.
        """
        held: set[str] = set()
        if claims:
            inserted = await self._connection.fetch(
                """
                INSERT INTO dlq_replays (dead_letter_digest, content_digest, dlq_topic,
                    dlq_partition, dlq_offset, original_topic, original_partition,
                    original_offset, reason, record_key, replay_run, replayed_by, state)
                SELECT d, c, t, p, o, ot, op, oo, r, k, $11, $12, 'claimed'
                FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[],
                            $6::text[], $7::int[], $8::bigint[], $9::text[], $10::text[])
                     AS x(d, c, t, p, o, ot, op, oo, r, k)
                ON CONFLICT (dead_letter_digest) DO NOTHING
                RETURNING dead_letter_digest
                """,
                [c.digest for c in claims], [c.content_digest for c in claims],
                [c.dlq_topic for c in claims], [c.dlq_partition for c in claims],
                [c.dlq_offset for c in claims], [c.original_topic for c in claims],
                [c.original_partition for c in claims], [c.original_offset for c in claims],
                [c.reason for c in claims], [c.record_key for c in claims],
                self.run, self._operator)
            held.update(row[0] for row in inserted)
        if reclaim:
            taken = await self._connection.fetch(
                """UPDATE dlq_replays SET replay_run = $2, replayed_by = $3, replayed_at = now()
                   WHERE dead_letter_digest = ANY($1::text[]) AND state = 'claimed'
                   RETURNING dead_letter_digest""", list(reclaim), self.run, self._operator)
            held.update(row[0] for row in taken)
        return held

    async def confirm(self, digests: Sequence[str]) -> None:
        """The broker acknowledged these: their rows say ``sent``."""
        if digests:
            await self._connection.execute(
                """UPDATE dlq_replays SET state = 'sent', sent_at = now()
                   WHERE dead_letter_digest = ANY($1::text[]) AND replay_run = $2""",
                list(digests), self.run)
