"""``creditnotes dlq list|show|replay``: ops tooling for dead-letter topics.

- Every command streams: a topic is read one partition at a time, in chunks
  of at most :data:`CHUNK` records, so memory stays flat however long it is,
  up to the end it had when the read began (a steady writer cannot keep a run
  going). ``list`` and ``show`` join no group and commit nothing.
- ``replay`` republishes a dead letter only to its dead-letter topic's own
  input topic (``returns.dlq`` -> ``returns``), and only if that is one of
  the service's input topics. The ``dlq.original.*`` headers are checked,
  never trusted: a record that names another topic, whose headers do not
  parse, or that the audit table could not hold, is refused and reported,
  never sent; it never stops the others.
- A dead letter is identified by a digest of its bytes (key, value, every
  header), which survives a broker or topic reset. Its audit row is claimed
  and committed before the send and confirmed after the broker's ack, so a
  failure in between can never send it twice (``replay_audit``).
- Before sending, a record is re-checked as the service would read it: one
  that cannot be parsed, would be refused again, was sent by a run that did
  not confirm it, or whose record (another dead letter of it) was replayed
  before is held back unless ``--force``. A run sends one record once.
- Every byte of a record shown is escaped: no terminal control or invisible
  characters, and nothing is ever interpreted as rich markup; a verdict is
  printed before the record's (quoted) fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import hashlib
import json
import logging
import os
import re
import secrets
import struct
import sys
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import IO, Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from service.adapters.kafka_producer import KafkaProducer, connection_options
from service.adapters.replay_audit import CLAIMED, AuditRow, Claim, ReplayAudit
from service.adapters.unavailable import (
    BROKER_ERRORS,
    DATABASE_ERRORS,
    DRIVER_ERRORS,
    NETWORK_ERRORS,
)
from service.entrypoints import ops_context
from service.entrypoints.ops_context import OpsError, database_address
from service.headers import Header
from service.settings import Settings

#: Records read (and, for replay, checked against the audit table) at a time.
CHUNK = 500
#: How long one poll waits for records (and the last one, past the end offset).
_QUIET_MS = 400
DLQ_SUFFIX = ".dlq"

# the exit codes every ops command shares (``ops_context``), as the dlq commands use them
EXIT_OK = ops_context.OK
EXIT_NO_MATCH = ops_context.ANSWER_NO
EXIT_USAGE = ops_context.INVALID
EXIT_UNREACHABLE = ops_context.UNREACHABLE
EXIT_NO_TOPIC = ops_context.NOT_THERE
EXIT_NOT_DEAD_LETTER_TOPIC = ops_context.NOT_DEAD_LETTER_TOPIC
EXIT_HELD = ops_context.HELD_BACK

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}  done
  {EXIT_NO_MATCH}  show: no dead letter matches
  {EXIT_USAGE}  usage error or invalid configuration
  {EXIT_UNREACHABLE}  cannot reach the broker or PostgreSQL
  {EXIT_NO_TOPIC}  no such topic on the broker
  {EXIT_NOT_DEAD_LETTER_TOPIC}  not a dead-letter topic (replay: not one of an input topic)
  {EXIT_HELD}  replay: some records were refused or held back (listed; see --force)"""


# --------------------------------------------------------------------------- showing bytes

#: Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): drawn as nothing.
_IGNORABLE = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
              (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
              (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
              (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
              (0xE0000, 0xE0FFF))
#: Controls, formats, surrogates, private use, unassigned, line/paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_PRINTABLE_ASCII = re.compile("[\x20-\x7e]*")


@functools.lru_cache(maxsize=4096)
def _unsafe(char: str) -> bool:
    code = ord(char)
    category = unicodedata.category(char)
    return (category in _UNSAFE_CATEGORIES or (category == "Zs" and char != " ")
            or any(low <= code <= high for low, high in _IGNORABLE))


def shown(text: str) -> str:
    """``text`` with every character that is not plainly visible escaped: controls,
    bidi, format and tag characters, invisible fillers and selectors, spaces other
    than U+0020, private-use and unassigned code points (by Unicode category plus
    Default_Ignorable_Code_Point)."""
    if _PRINTABLE_ASCII.fullmatch(text):
        return text
    return "".join(_escape(char) if _unsafe(char) else char for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def quoted(text: str, limit: int = 80) -> str:
    """``text`` shown, in double quotes (a quote inside escaped), cut to ``limit``
    characters with the count of the rest: a field cannot pass for the tool's words."""
    escaped = shown(text).replace('"', "\\x22")
    if len(escaped) > limit:
        escaped = f"{escaped[:limit]}...(+{len(escaped) - limit} chars)"
    return f'"{escaped}"'


def shown_bytes(data: bytes | None) -> str:
    return shown(data.decode("utf-8", "replace")) if data is not None else ""


# --------------------------------------------------------------------------- dead letters


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]

    def header(self, name: str) -> str | None:
        """The first header of this name, as text."""
        value = self._first.get(name)
        return value.decode("utf-8", "replace") if value is not None else None

    @cached_property
    def _first(self) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for name, value in self.headers:
            found.setdefault(name, value)
        return found

    @property
    def reason(self) -> str:
        return self.header("dlq.error.reason") or "?"

    @property
    def failed_at(self) -> datetime | None:
        return _moment(self.header("dlq.failed_at"))

    @property
    def key_text(self) -> str:
        return self.key.decode("utf-8", "replace") if self.key is not None else ""

    @property
    def origin(self) -> str:
        return (f"{self.header('dlq.original.topic') or '?'}"
                f"[{self.header('dlq.original.partition') or '?'}]"
                f"@{self.header('dlq.original.offset') or '?'}")

    def original_headers(self) -> list[Header]:
        """The headers the record had before it was dead-lettered (what a replay sends)."""
        return list(self._original_headers)

    @cached_property
    def _original_headers(self) -> tuple[Header, ...]:
        return tuple((name, value) for name, value in self.headers
                     if not name.startswith("dlq."))

    @cached_property
    def digest(self) -> str:
        """This dead letter's identity: its key, value and every header (dlq.* included)."""
        return _digest([self.key, self.value, *_flat(self.headers)])

    @cached_property
    def content_digest(self) -> str:
        """What a replay sends (to ``dlq.original.topic``, checked before any send): the
        same for every dead letter of one replayed record."""
        return _digest([self._first.get("dlq.original.topic"), self.key, self.value,
                        *_flat(self.original_headers())])


def _flat(headers: Iterable[Header]) -> list[bytes | None]:
    return [part for name, value in headers for part in (name.encode(), value)]


def _digest(parts: Sequence[bytes | None]) -> str:
    """SHA-256 of length-prefixed parts (None distinct from empty), hex."""
    return hashlib.sha256(b"".join(
        _LENGTH.pack(-1) if part is None else _LENGTH.pack(len(part)) + part
        for part in parts)).hexdigest()


_LENGTH = struct.Struct(">q")


def _moment(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else None


@dataclass(frozen=True)
class Filters:
    reason: str | None = None
    since: datetime | None = None
    key: str | None = None

    def match(self, record: DeadLetter) -> bool:
        if self.reason is not None and record.reason != self.reason:
            return False
        if self.key is not None and record.key_text != self.key:
            return False
        if self.since is not None:
            failed_at = record.failed_at
            if failed_at is None or failed_at < self.since:
                return False
        return True


# --------------------------------------------------------------------------- reading


def input_topic_of(dlq_topic: str) -> str:
    if not dlq_topic.endswith(DLQ_SUFFIX) or len(dlq_topic) == len(DLQ_SUFFIX):
        raise OpsError(f"{dlq_topic!r} is not a dead-letter topic (those end in "
                       f"{DLQ_SUFFIX!r}, e.g. 'returns.dlq')", EXIT_NOT_DEAD_LETTER_TOPIC)
    return dlq_topic[: -len(DLQ_SUFFIX)]


@contextlib.asynccontextmanager
async def _consumer(settings: Settings, fetch_max_wait_ms: int | None = None
                    ) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer in no group: reading commits nothing and changes nothing.

    It fetches with the service's own wait (``kafka_fetch_max_wait_ms``: Kafka's 500 ms
    in production, 10 ms on tansu, which holds every fetch that long even when there is
    nothing to read: 500 ms made an empty 8-partition replay take 12 s there, 3.5 s now).
    """
    consumer = AIOKafkaConsumer(**connection_options(settings), enable_auto_commit=False,
                                auto_offset_reset="earliest",
                                max_partition_fetch_bytes=1_048_576,
                                fetch_max_wait_ms=(settings.kafka_fetch_max_wait_ms
                                                   if fetch_max_wait_ms is None
                                                   else fetch_max_wait_ms))
    try:
        try:
            await consumer.start()
        except BROKER_ERRORS as error:
            raise OpsError(f"cannot reach the broker at {settings.kafka_bootstrap_servers} "
                           f"({type(error).__name__})", EXIT_UNREACHABLE) from error
        yield consumer
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str,
                      settings: Settings) -> list[TopicPartition]:
    await consumer.topics()  # fresh metadata: a topic created a moment ago is seen
    found = consumer.partitions_for_topic(topic)
    if not found:
        raise OpsError(f"no topic {topic!r} on the broker at {settings.kafka_bootstrap_servers}",
                       EXIT_NO_TOPIC)
    return [TopicPartition(topic, partition) for partition in sorted(found)]


async def _chunks(consumer: AIOKafkaConsumer, tp: TopicPartition,
                  start: int | None = None, quiet: int = _QUIET_MS
                  ) -> AsyncIterator[list[DeadLetter]]:
    """One partition from ``start`` (its beginning when None) to the end it had when
    the read began, in chunks: records written meanwhile are not chased, so a steady
    writer (the service during a poison flood, or anyone) cannot keep a run going.

    The end offset is asked for once more on reaching it, and one last poll takes
    what the broker already has past it: some Kafka-protocol brokers (tansu) report
    the end of the last record batch's first record, not of its last.
    """
    consumer.assign([tp])
    if start is None:
        await consumer.seek_to_beginning(tp)
    else:
        consumer.seek(tp, start)
    end = (await consumer.end_offsets([tp]))[tp]
    asked_again = False
    while True:
        if await consumer.position(tp) >= end:
            if asked_again:
                break
            asked_again = True
            end = max(end, (await consumer.end_offsets([tp]))[tp])
            continue
        records = (await consumer.getmany(tp, timeout_ms=quiet, max_records=CHUNK)
                   ).get(tp, [])
        if records:
            yield _letters(tp, records)
    rest = (await consumer.getmany(tp, timeout_ms=quiet)).get(tp, [])
    for first in range(0, len(rest), CHUNK):
        yield _letters(tp, rest[first:first + CHUNK])


def _letters(tp: TopicPartition, records: Sequence[Any]) -> list[DeadLetter]:
    return [DeadLetter(tp.topic, r.partition, r.offset, r.timestamp, r.key, r.value,
                       tuple(r.headers)) for r in records]


# --------------------------------------------------------------------------- the console's reads


@contextlib.asynccontextmanager
async def reader(settings: Settings) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer in no group for the console's reads: its fetches held no longer than the
    service's own (``kafka_fetch_max_wait_ms``), so a read ends soon after the end."""
    async with _consumer(settings, settings.kafka_fetch_max_wait_ms) as consumer:
        yield consumer


def quiet_ms(settings: Settings) -> int:
    """How long a console read waits for records that may still come past the end."""
    return min(_QUIET_MS, max(100, 4 * settings.kafka_fetch_max_wait_ms))


async def partitions_of(consumer: AIOKafkaConsumer, dlq_topic: str,
                        settings: Settings) -> list[TopicPartition]:
    """The partitions of a dead-letter topic (``OpsError`` if it is none, or not there)."""
    input_topic_of(dlq_topic)
    return await _partitions(consumer, dlq_topic, settings)


async def read_from(consumer: AIOKafkaConsumer, tp: TopicPartition, start: int | None,
                    quiet: int) -> AsyncGenerator[list[DeadLetter], None]:
    """One partition from ``start`` to its end, in chunks (as ``list`` reads it)."""
    async for chunk in _chunks(consumer, tp, start, quiet):
        yield chunk


async def scan(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition],
               quiet: int) -> AsyncGenerator[list[DeadLetter], None]:
    """Every record of these partitions, all read together (one wait at the end, not one
    per partition), up to the ends they had when the scan began; in chunks."""
    if not tps:
        return
    consumer.assign(list(tps))
    await consumer.seek_to_beginning(*tps)
    ends = await consumer.end_offsets(list(tps))
    idle = 0
    while idle < 3:
        behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
        if not behind:
            break
        found = await consumer.getmany(*behind, timeout_ms=quiet, max_records=CHUNK)
        idle = 0 if any(found.values()) else idle + 1
        for tp, records in found.items():
            if records:
                yield _letters(tp, records)
    # one last poll takes what the broker already has past the ends (see _chunks)
    found = await consumer.getmany(*tps, timeout_ms=quiet)
    for tp, records in found.items():
        for first in range(0, len(records), CHUNK):
            yield _letters(tp, records[first:first + CHUNK])


# --------------------------------------------------------------------------- list and show

LIST_HEADER = ("partition:offset", "failed at", "reason", "from", "key", "attempts", "message")


def list_line(record: DeadLetter) -> str:
    """One dead letter on one line: never wrapped, every record byte escaped."""
    return "  ".join([
        f"{record.partition}:{record.offset}".ljust(16),
        shown(record.header("dlq.failed_at") or "").ljust(27),
        shown(record.reason).ljust(22),
        shown(record.origin),
        f"key={shown(record.key_text)}",
        f"attempts={shown(record.header('dlq.attempts') or '')}",
        shown((record.header("dlq.error.message") or "")[:200]),
    ])


async def list_records(settings: Settings, dlq_topic: str, filters: Filters,
                       out: IO[str]) -> int:
    """Print one line per matching dead letter as it is read; returns how many."""
    input_topic_of(dlq_topic)
    count = 0
    async with _consumer(settings) as consumer:
        partitions = await _partitions(consumer, dlq_topic, settings)
        out.write("  ".join(LIST_HEADER) + "\n")
        for tp in partitions:
            async for chunk in _chunks(consumer, tp):
                for record in chunk:
                    if filters.match(record):
                        out.write(list_line(record) + "\n")
                        count += 1
    return count


#: Headers ``show`` prints of one record; the rest are counted (a record may carry
#: tens of thousands).
SHOWN_HEADERS = 1_000


def show_panel(record: DeadLetter) -> Group:
    """One record in full, as one renderable: :func:`summary_panel`, then
    :func:`detail_lines` folded (a long unbroken value wraps, it is never cut)."""
    return Group(summary_panel(record), Text("\n".join(detail_lines(record)), overflow="fold"))


def summary_panel(record: DeadLetter) -> Panel:
    """Where the record sits, why it failed, its key and digest: plain text (no markup
    parsed), folded, every byte escaped."""
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row(Text("key"), Text(shown(record.key_text), overflow="fold"))
    table.add_row(Text("timestamp"), Text(str(record.timestamp)))
    table.add_row(Text("digest"), Text(record.digest))
    title = Text(f"partition {record.partition}, offset {record.offset}: "
                 f"{quoted(record.reason, 200)}", overflow="fold")
    return Panel(table, title=title, title_align="left", expand=False)


def detail_lines(record: DeadLetter) -> list[str]:
    """The headers (at most :data:`SHOWN_HEADERS`, then a count) and the value (JSON
    pretty-printed), one escaped plain line each: laying out thousands of lines in a
    table would take rich seconds per record."""
    lines = [f"headers ({len(record.headers)}):"]
    lines += [f"  {shown(name)}: {shown_bytes(value)}"
              for name, value in record.headers[:SHOWN_HEADERS]]
    if len(record.headers) > SHOWN_HEADERS:
        lines.append(f"  ... and {len(record.headers) - SHOWN_HEADERS} more header(s), "
                     "not shown")
    body = (record.value.decode("utf-8", "replace") if record.value is not None
            else "(no value)")
    with contextlib.suppress(ValueError, RecursionError):
        body = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    lines.append("value:")
    lines += [f"  {shown(line)}" for line in body.split("\n")]
    return lines


async def show_records(settings: Settings, dlq_topic: str, filters: Filters,
                       partition: int | None, offset: int | None, console: Console) -> int:
    """Print each matching dead letter in full as it is read; returns how many."""
    input_topic_of(dlq_topic)
    count = 0
    async with _consumer(settings) as consumer:
        for tp in await _partitions(consumer, dlq_topic, settings):
            if partition is not None and tp.partition != partition:
                continue
            async for chunk in _chunks(consumer, tp, offset):
                for record in chunk:
                    if (offset is None or record.offset == offset) and filters.match(record):
                        console.print(summary_panel(record))
                        console.file.write("".join(f"{line}\n"
                                                   for line in detail_lines(record)))
                        count += 1
                if offset is not None and chunk[-1].offset >= offset:
                    break
    return count


# --------------------------------------------------------------------------- replay checks

#: Headers every dead letter written by the service carries exactly once.
_REQUIRED = ("dlq.original.topic", "dlq.original.partition", "dlq.original.offset",
             "dlq.error.reason", "dlq.failed_at")
_NUMBER = re.compile(r"[0-9]{1,19}")
#: What the audit row's columns hold (``integer`` partition, ``bigint`` offset).
_LIMITS = {"dlq.original.partition": 2**31 - 1, "dlq.original.offset": 2**63 - 1}
#: The longest ``dlq.error.reason`` accepted (the service writes short snake_case codes).
REASON_LIMIT = 100
#: The audit row keeps the key escaped (:func:`shown`) and cut to this many characters.
KEY_LIMIT = 200


@dataclass(frozen=True)
class Checked:
    """A dead letter whose headers hold up: where it came from, as integers."""

    partition: int
    offset: int


def check_headers(record: DeadLetter, input_topic: str) -> Checked | str:
    """The record's origin, or why it must never be replayed (a refusal, in words).

    Everything accepted fits the audit row: a record the table cannot hold would
    otherwise fail the claim of every record read with it."""
    names = [name for name, _ in record.headers]
    for name in sorted({name for name in names if name.startswith("dlq.")}):
        if names.count(name) > 1:
            return f"header {shown(name)} appears {names.count(name)} times"
    for name in _REQUIRED:
        if record.header(name) in (None, ""):
            return f"header {name} is missing"
    original = record.header("dlq.original.topic")
    if original != input_topic:
        return (f"header dlq.original.topic names {quoted(original or '')}, but records of "
                f"{record.topic!r} may only go back to {input_topic!r}")
    numbers = {}
    for name, limit in _LIMITS.items():
        text = record.header(name) or ""
        if not _NUMBER.fullmatch(text):
            return f"header {name} is not a non-negative integer"
        if int(text) > limit:
            return f"header {name} is over {limit}"
        numbers[name] = int(text)
    reason = record.header("dlq.error.reason") or ""
    if len(reason) > REASON_LIMIT:
        return f"header dlq.error.reason is longer than {REASON_LIMIT} characters"
    if shown(reason) != reason or "\ufffd" in reason:
        return "header dlq.error.reason holds invalid UTF-8 or invisible or control characters"
    if record.failed_at is None:
        return "header dlq.failed_at is not an ISO 8601 time with a zone"
    return Checked(numbers["dlq.original.partition"], numbers["dlq.original.offset"])


def audit_key(record: DeadLetter) -> str | None:
    """The key as the audit row keeps it: escaped (no NUL or invalid UTF-8 reaches
    PostgreSQL) and cut (bounded), so any key can be recorded."""
    if not record.key:
        return None
    text = shown(record.key_text)
    return text if len(text) <= KEY_LIMIT else f"{text[:KEY_LIMIT]}..."


def would_fail_again(record: DeadLetter, input_topic: str,
                     routes: Mapping[str, Any]) -> str | None:
    """Why the service would refuse this record again at once, if it can tell now
    (``routes``: :func:`service.entrypoints.translators.routes` of the settings)."""
    from service.domain import errors
    from service.entrypoints import translators

    try:
        event = translators.decode_envelope(record.value, record.original_headers())
    except errors.CreditNoteError as error:
        return f"cannot be parsed as a CloudEvent ({error.code}: {shown(error.message)})"
    try:
        translators.translate(event, input_topic, routes)
    except errors.CreditNoteError as error:
        return f"would be refused again ({error.code}: {shown(error.message)})"
    except Exception as error:
        return f"would be refused again ({type(error).__name__})"
    return None


# --------------------------------------------------------------------------- replay


@dataclass
class ReplaySummary:
    republished: int = 0
    would_replay: int = 0
    already_replayed: int = 0
    filtered_out: int = 0
    refused: int = 0
    held: int = 0
    lines: list[str] = field(default_factory=list)  # for callers without an output

    def text(self, dry_run: bool) -> str:
        parts = [f"republished {self.republished}", f"already replayed {self.already_replayed}",
                 f"left by the filters {self.filtered_out}"]
        if dry_run:
            parts.append(f"would replay {self.would_replay}")
        parts += [f"refused {self.refused}", f"held back {self.held}"]
        return ", ".join(parts)


@dataclass(frozen=True)
class ReplayOptions:
    filters: Filters = Filters()
    dry_run: bool = False
    force: bool = False
    #: Only these dead letters, by ``(partition, offset)`` (the console's selection);
    #: None: every one the filters match. Both apply.
    positions: frozenset[tuple[int, int]] | None = None

    def selects(self, record: DeadLetter) -> bool:
        return self.filters.match(record) and (
            self.positions is None or (record.partition, record.offset) in self.positions)


class _Replay:
    """One run over one dead-letter topic; see the module docstring for the rules."""

    def __init__(self, settings: Settings, dlq_topic: str, input_topic: str,
                 options: ReplayOptions, audit: ReplayAudit, producer: KafkaProducer | None,
                 out: IO[str]) -> None:
        self.settings = settings
        self.dlq_topic = dlq_topic
        self.input_topic = input_topic
        self.options = options
        self.audit = audit
        self.producer = producer
        self.out = out
        self.summary = ReplaySummary()
        #: The content digests (first 16 bytes: ~80 bytes of memory each) of what this
        #: run replayed or, on a dry run, would: one record goes once per run, however
        #: many dead letters of it there are (a real run also finds its own earlier
        #: chunks' claims in the audit table; a dry run writes none).
        self.contents: set[bytes] = set()
        #: Dead letters replayed in the chunk being decided: an exact copy is "already
        #: replayed" (in a later chunk, its audit row says so).
        self.digests: set[str] = set()
        from service.entrypoints.translators import routes
        self.routes = routes(settings)

    def say(self, record: DeadLetter, verdict: str) -> None:
        """One line: where, the verdict, then the record's own fields, quoted and cut, so
        no field can read as (or push away) the tool's verdict."""
        self.out.write(f"{record.partition}:{record.offset}  {verdict}  "
                       f"failed_at={quoted(record.header('dlq.failed_at') or '', 40)}  "
                       f"reason={quoted(record.reason, 40)}  key={quoted(record.key_text)}\n")

    async def chunk(self, records: list[DeadLetter]) -> None:
        """Decide every record of one chunk (two audit queries), then send what may go."""
        rows = await self.audit.rows([record.digest for record in records])
        contents = await self.audit.replayed_contents(
            [record.content_digest for record in records])
        to_send: list[tuple[DeadLetter, Claim]] = []
        reclaim: dict[str, str] = {}
        for record in records:
            self._decide(record, rows.get(record.digest), contents, to_send, reclaim)
        self.digests.clear()
        if to_send:
            await self._send(to_send, reclaim)

    def _decide(self, record: DeadLetter, row: AuditRow | None,
                contents: dict[str, list[AuditRow]],
                to_send: list[tuple[DeadLetter, Claim]], reclaim: dict[str, str]) -> None:
        """Replay now, hold back, refuse or skip one record; say so unless it is routine."""
        summary, force = self.summary, self.options.force
        digest, content = record.digest, record.content_digest
        if digest in self.digests or (row is not None and row.state != CLAIMED):
            summary.already_replayed += 1  # (or an exact copy of one replayed just now)
            return
        if not self.options.selects(record):
            summary.filtered_out += 1
            return
        checked = check_headers(record, self.input_topic)
        if isinstance(checked, str):
            summary.refused += 1
            self.say(record, f"REFUSED, never replayed: {checked}")
            return
        earlier = [replayed for replayed in contents.get(content, [])
                   if replayed.digest != digest]
        if _short(content) in self.contents or any(replayed.replay_run == self.audit.run
                                           for replayed in earlier):
            summary.held += 1  # even with --force: a replay must not chase its own failures
            self.say(record, "held back: this run already replayed the same record "
                             "(a copy, or its dead letter after that replay)")
            return
        held: str | None = None
        if row is not None:
            held = (f"maybe sent already: run {row.replay_run} claimed it at "
                    f"{row.replayed_at:%Y-%m-%dT%H:%M:%SZ} and never confirmed the send")
        elif earlier:  # the same record, another dead letter of it: no clocks compared
            held = (f"replayed before and dead-lettered again (run {earlier[-1].replay_run} "
                    f"replayed another dead letter of the same record at "
                    f"{earlier[-1].replayed_at:%Y-%m-%dT%H:%M:%SZ})")
        if held is None:
            held = would_fail_again(record, self.input_topic, self.routes)
        if held is not None and not force:
            summary.held += 1
            self.say(record, f"held back: {held} (--force replays it)")
            return
        self.digests.add(digest)
        self.contents.add(_short(content))
        if self.options.dry_run:
            summary.would_replay += 1
            self.say(record, f"would replay to {self.input_topic}"
                             + (f" (forced: {held})" if held else ""))
            return
        if row is not None:
            reclaim[digest] = row.replay_run  # taken only if that run still holds it
        to_send.append((record, Claim(
            digest=digest, content_digest=content,
            dlq_topic=self.dlq_topic, dlq_partition=record.partition, dlq_offset=record.offset,
            original_topic=self.input_topic, original_partition=checked.partition,
            original_offset=checked.offset, reason=record.reason,
            record_key=audit_key(record))))

    async def _send(self, to_send: list[tuple[DeadLetter, Claim]],
                    reclaim: dict[str, str]) -> None:
        """Claim (committed), send, confirm; a record another run claimed first stays put,
        one the audit table cannot hold is refused (never the whole run)."""
        assert self.producer is not None
        claimed = await self.audit.claim([claim for _, claim in to_send
                                          if claim.digest not in reclaim], reclaim=reclaim)
        mine = []
        for record, claim in to_send:
            if claim.digest in claimed.held:
                mine.append((record, claim))
            elif claim.digest in claimed.refused:
                self.summary.refused += 1
                self.say(record, "REFUSED, never replayed: the audit table cannot record it "
                                 f"({claimed.refused[claim.digest]})")
            else:
                self.summary.held += 1
                self.say(record, "held back: another replay run claimed it first")
        acked: list[str] = []
        try:
            for record, claim in mine:
                await self.producer.send(self.input_topic, value=record.value, key=record.key,
                                         headers=record.original_headers())
                acked.append(claim.digest)
                self.summary.republished += 1
                self.say(record, f"replayed to {self.input_topic}")
        finally:  # what the broker acknowledged is confirmed even if a later send failed
            await self.audit.confirm(acked)


def _selected(partitions: Sequence[TopicPartition],
              positions: frozenset[tuple[int, int]] | None
              ) -> list[tuple[TopicPartition, int | None, int | None]]:
    """Each partition to read, from where and to which offset (None: all of it): with a
    selection, only its partitions, from its first offset there to its last."""
    if positions is None:
        return [(tp, None, None) for tp in partitions]
    spans: list[tuple[TopicPartition, int | None, int | None]] = []
    for tp in partitions:
        offsets = [offset for partition, offset in positions if partition == tp.partition]
        if offsets:
            spans.append((tp, min(offsets), max(offsets)))
    return spans


def _short(digest: str) -> bytes:
    return bytes.fromhex(digest[:32])


async def replay(settings: Settings, dlq_topic: str, options: ReplayOptions,
                 out: IO[str] = sys.stdout, operator: str | None = None) -> ReplaySummary:
    """Republish matching dead letters to their own input topic, each at most once.

    ``operator`` is who the audit rows name (``replayed_by``): the console passes
    ``console:<user>``; the command line, the login name of whoever runs it.
    """
    input_topic = input_topic_of(dlq_topic)
    if input_topic not in settings.topics.inputs():
        raise OpsError(f"{dlq_topic!r} is not the dead-letter topic of an input topic of this "
                       f"service ({', '.join(settings.topics.inputs())}); refusing to replay",
                       EXIT_NOT_DEAD_LETTER_TOPIC)
    connection = await _connect(settings)
    producer: KafkaProducer | None = None
    try:
        audit = ReplayAudit(connection, run=secrets.token_hex(6),
                            operator=operator if operator is not None else getpass.getuser())
        async with _consumer(settings) as consumer:
            partitions = await _partitions(consumer, dlq_topic, settings)
            if input_topic not in await consumer.topics():
                raise OpsError(f"no topic {input_topic!r} on the broker at "
                               f"{settings.kafka_bootstrap_servers}", EXIT_NO_TOPIC)
            if not options.dry_run:
                producer = KafkaProducer(settings)
                await producer.start()
            run = _Replay(settings, dlq_topic, input_topic, options, audit, producer, out)
            for tp, start, last in _selected(partitions, options.positions):
                async for chunk in _chunks(consumer, tp, start):
                    await run.chunk(chunk)
                    if last is not None and chunk[-1].offset >= last:
                        break
        return run.summary
    finally:
        try:
            if producer is not None:
                await producer.stop()
        finally:
            await connection.close()


async def _connect(settings: Settings) -> asyncpg.Connection:
    try:
        connection: asyncpg.Connection = await asyncpg.connect(settings.database_url,
                                                               timeout=15)
    except (*NETWORK_ERRORS, *DATABASE_ERRORS) as error:
        raise OpsError(f"cannot reach PostgreSQL at {database_address(settings.database_url)} "
                       f"({type(error).__name__})", EXIT_UNREACHABLE) from error
    return connection


# --------------------------------------------------------------------------- the command


def command(args: Any, settings: Settings) -> int:
    """``creditnotes dlq ...``: run it, turning expected failures into one line and a code."""
    if not args.debug:
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    out = sys.stdout
    try:
        return asyncio.run(_command(args, settings, out))
    except OpsError as error:
        if args.debug:
            raise
        out.flush()
        print(f"creditnotes dlq: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except DRIVER_ERRORS as error:
        if args.debug:
            raise
        print(f"creditnotes dlq: the broker at {settings.kafka_bootstrap_servers} or PostgreSQL "
              f"at {database_address(settings.database_url)} failed ({type(error).__name__}); "
              "a record sent but not confirmed is held back as 'maybe sent' by the next replay; "
              "--debug shows the traceback", file=sys.stderr)
        return EXIT_UNREACHABLE


async def _command(args: Any, settings: Settings, out: IO[str]) -> int:
    filters = Filters(reason=args.reason, since=args.since, key=args.key)
    print(f"creditnotes dlq: broker {settings.kafka_bootstrap_servers}"
          + (f", PostgreSQL {database_address(settings.database_url)}"
             if args.dlq_command == "replay" else ""), file=sys.stderr)
    if args.dlq_command == "list":
        count = await list_records(settings, args.topic, filters, out)
        out.write(f"{count} dead letter(s)\n")
        return EXIT_OK
    if args.dlq_command == "show":
        console = Console(file=out, soft_wrap=False,
                          width=None if out.isatty() else 1_000, highlight=False)
        count = await show_records(settings, args.topic, filters, args.partition,
                                   args.offset, console)
        if not count:
            out.write("no dead letter matches\n")
        return EXIT_OK if count else EXIT_NO_MATCH
    options = ReplayOptions(filters=filters, dry_run=args.dry_run, force=args.force)
    summary = await replay(settings, args.topic, options, out)
    out.write(summary.text(args.dry_run) + "\n")
    return EXIT_HELD if summary.refused or summary.held else EXIT_OK
