"""The audit trail of dead-letter replays (table ``dlq_replays``, migrations 0010, 0014).

A dead letter is identified by :attr:`Claim.digest`, a digest of its own bytes,
so the identity survives a broker or topic reset that reuses offsets. A row is
claimed, in its own committed statement, before the record is sent, and
confirmed after the broker acknowledged it: a crash in between leaves it
``claimed`` ("maybe sent"), which a later run never re-sends without ``--force``.

A record the table cannot hold (a value out of a column's range, a character
PostgreSQL refuses, a row too big) must refuse that record only, never the
run: a chunk whose one-statement claim fails so is claimed again row by row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
from asyncpg.exceptions import _base

CLAIMED = "claimed"
SENT = "sent"

#: What a row's own values can make PostgreSQL (or the driver, encoding them) refuse:
#: class 22 (data), 23514 (a check), 54 (a program limit, e.g. an index row too big).
_ROW_ERRORS = (asyncpg.DataError, _base.DataError, asyncpg.CheckViolationError,
               asyncpg.ProgramLimitExceededError)


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


@dataclass
class Claimed:
    """The outcome of :meth:`ReplayAudit.claim`."""

    held: set[str] = field(default_factory=set)  # digests this run may send now
    refused: dict[str, str] = field(default_factory=dict)  # digest -> why the table refused it


_INSERT = """
    INSERT INTO dlq_replays (dead_letter_digest, content_digest, dlq_topic,
        dlq_partition, dlq_offset, original_topic, original_partition,
        original_offset, reason, record_key, replay_run, replayed_by, state)
    SELECT d, c, t, p, o, ot, op, oo, r, k, $11, $12, 'claimed'
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[],
                $6::text[], $7::int[], $8::bigint[], $9::text[], $10::text[])
         AS x(d, c, t, p, o, ot, op, oo, r, k)
    ON CONFLICT (dead_letter_digest) DO NOTHING
    RETURNING dead_letter_digest
"""


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

    async def claim(self, claims: Sequence[Claim], *,
                    reclaim: Mapping[str, str] | None = None) -> Claimed:
        """Claim these dead letters for this run, committed before anything is sent.

        ``held``: the digests this run now holds: new rows, plus the ``claimed``
        ("maybe sent") rows of ``reclaim`` (``--force``; digest -> the run that
        held it when this run decided) still held by that same run, so of two
        forced runs only one takes it. A dead letter another run claimed or
        sent first is not held, so it is not sent. ``refused``: the claims whose
        row PostgreSQL would not store, with why.
        """
        claimed = Claimed()
        try:
            claimed.held.update(await self._insert(claims))
        except _ROW_ERRORS:
            for claim in claims:  # one record's bad value must not stop the others
                try:
                    claimed.held.update(await self._insert([claim]))
                except _ROW_ERRORS as error:
                    claimed.refused[claim.digest] = type(error).__name__
        if reclaim:
            taken = await self._connection.fetch(
                """UPDATE dlq_replays AS r
                      SET replay_run = $3, replayed_by = $4, replayed_at = now()
                     FROM unnest($1::text[], $2::text[]) AS x(digest, seen_run)
                    WHERE r.dead_letter_digest = x.digest AND r.replay_run = x.seen_run
                      AND r.state = 'claimed'
                RETURNING r.dead_letter_digest""",
                list(reclaim), list(reclaim.values()), self.run, self._operator)
            claimed.held.update(row[0] for row in taken)
        return claimed

    async def _insert(self, claims: Sequence[Claim]) -> list[str]:
        if not claims:
            return []
        inserted = await self._connection.fetch(
            _INSERT,
            [c.digest for c in claims], [c.content_digest for c in claims],
            [c.dlq_topic for c in claims], [c.dlq_partition for c in claims],
            [c.dlq_offset for c in claims], [c.original_topic for c in claims],
            [c.original_partition for c in claims], [c.original_offset for c in claims],
            [c.reason for c in claims], [c.record_key for c in claims],
            self.run, self._operator)
        return [row[0] for row in inserted]

    async def confirm(self, digests: Sequence[str]) -> None:
        """The broker acknowledged these: their rows say ``sent``."""
        if digests:
            await self._connection.execute(
                """UPDATE dlq_replays SET state = 'sent', sent_at = now()
                   WHERE dead_letter_digest = ANY($1::text[]) AND replay_run = $2""",
                list(digests), self.run)
