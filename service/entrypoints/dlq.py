"""``creditnotes dlq list|show|replay``: ops tooling for dead-letter topics.

- Every command streams: a topic is read one partition at a time, in chunks
  of at most :data:`CHUNK` records, so memory stays flat however long it is.
  ``list`` and ``show`` join no group and commit nothing.
- ``replay`` republishes a dead letter only to its dead-letter topic's own
  input topic (``returns.dlq`` -> ``returns``), and only if that is one of
  the service's input topics. The ``dlq.original.*`` headers are checked,
  never trusted: a record that names another topic, or whose headers do not
  parse, is refused and reported, never sent.
- A dead letter is identified by a digest of its bytes (key, value, every
  header), which survives a broker or topic reset. Its audit row is claimed
  and committed before the send and confirmed after the broker's ack, so a
  failure in between can never send it twice (``replay_audit``).
- Before sending, a record is re-checked as the service would read it: one
  that cannot be parsed, would be refused again, was sent by a run that did
  not confirm it, or was replayed before and dead-lettered again for the same
  reason is held back unless ``--force``.
- Every byte of a record shown is escaped: no terminal control characters,
  and nothing is ever interpreted as rich markup.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import json
import logging
import os
import re
import secrets
import struct
import sys
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import IO, Any
from urllib.parse import urlsplit

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from service.adapters.kafka_producer import KafkaProducer, connection_options
from service.adapters.replay_audit import CLAIMED, AuditRow, Claim, ReplayAudit
from service.settings import Settings

#: Records read (and, for replay, checked against the audit table) at a time.
CHUNK = 500
#: This many empty polls this long in a row, once past the reported end offset, end a
#: partition (a single slow fetch on a busy broker must not end it early).
_QUIET_MS = 400
_QUIET_POLLS = 2
DLQ_SUFFIX = ".dlq"

EXIT_OK = 0
EXIT_NO_MATCH = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NO_TOPIC = 4
EXIT_NOT_DEAD_LETTER_TOPIC = 5
EXIT_HELD = 6

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}  done
  {EXIT_NO_MATCH}  show: no dead letter matches
  {EXIT_USAGE}  usage error or invalid configuration
  {EXIT_UNREACHABLE}  cannot reach the broker or PostgreSQL
  {EXIT_NO_TOPIC}  no such topic on the broker
  {EXIT_NOT_DEAD_LETTER_TOPIC}  not a dead-letter topic (replay: not one of an input topic)
  {EXIT_HELD}  replay: some records were refused or held back (listed; see --force)"""


class DlqError(Exception):
    """An expected failure: one line for the operator and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- showing bytes

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def shown(text: str) -> str:
    """``text`` with every control, bidi or invisible formatting character escaped."""
    return _UNSAFE.sub(lambda match: _escape(match.group()), text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


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
    headers: tuple[tuple[str, bytes], ...]

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

    def original_headers(self) -> list[tuple[str, bytes]]:
        """The headers the record had before it was dead-lettered (what a replay sends)."""
        return list(self._original_headers)

    @cached_property
    def _original_headers(self) -> tuple[tuple[str, bytes], ...]:
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


def _flat(headers: Iterable[tuple[str, bytes]]) -> list[bytes | None]:
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
        raise DlqError(f"{dlq_topic!r} is not a dead-letter topic (those end in "
                       f"{DLQ_SUFFIX!r}, e.g. 'returns.dlq')", EXIT_NOT_DEAD_LETTER_TOPIC)
    return dlq_topic[: -len(DLQ_SUFFIX)]


@contextlib.asynccontextmanager
async def _consumer(settings: Settings) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer in no group: reading commits nothing and changes nothing."""
    consumer = AIOKafkaConsumer(**connection_options(settings), enable_auto_commit=False,
                                auto_offset_reset="earliest",
                                max_partition_fetch_bytes=1_048_576)
    try:
        try:
            await consumer.start()
        except KafkaError as error:
            raise DlqError(f"cannot reach the broker at {settings.kafka_bootstrap_servers} "
                           f"({type(error).__name__})", EXIT_UNREACHABLE) from error
        yield consumer
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str,
                      settings: Settings) -> list[TopicPartition]:
    await consumer.topics()  # fresh metadata: a topic created a moment ago is seen
    found = consumer.partitions_for_topic(topic)
    if not found:
        raise DlqError(f"no topic {topic!r} on the broker at {settings.kafka_bootstrap_servers}",
                       EXIT_NO_TOPIC)
    return [TopicPartition(topic, partition) for partition in sorted(found)]


async def _chunks(consumer: AIOKafkaConsumer, tp: TopicPartition,
                  start: int | None = None) -> AsyncIterator[list[DeadLetter]]:
    """One partition from ``start`` (its beginning when None) to its end, in chunks.

    Reads past the reported end offset until the broker has nothing more:
    some Kafka-protocol brokers (tansu) report the end of the last record
    batch's first record, not of its last.
    """
    consumer.assign([tp])
    if start is None:
        await consumer.seek_to_beginning(tp)
    else:
        consumer.seek(tp, start)
    end = (await consumer.end_offsets([tp]))[tp]
    quiet = 0
    while True:
        batches = await consumer.getmany(tp, timeout_ms=_QUIET_MS, max_records=CHUNK)
        records = batches.get(tp, [])
        if records:
            quiet = 0
            yield [DeadLetter(tp.topic, r.partition, r.offset, r.timestamp, r.key, r.value,
                              tuple(r.headers)) for r in records]
        elif await consumer.position(tp) >= end:
            quiet += 1
            if quiet >= _QUIET_POLLS:
                return


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


def show_panel(record: DeadLetter) -> Panel:
    headers = Table.grid(padding=(0, 2))
    for name, value in record.headers:
        headers.add_row(Text(shown(name)), Text(shown_bytes(value)))
    body = (record.value.decode("utf-8", "replace") if record.value is not None
            else "(no value)")
    with contextlib.suppress(ValueError, RecursionError):
        body = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    table = Table.grid(padding=(0, 1))
    table.add_row(Text("key"), Text(shown(record.key_text)))
    table.add_row(Text("timestamp"), Text(str(record.timestamp)))
    table.add_row(Text("digest"), Text(record.digest))
    table.add_row(Text("headers"), headers)
    table.add_row(Text("value"), Text("\n".join(shown(line) for line in body.split("\n"))))
    title = Text(f"partition {record.partition}, offset {record.offset}: {shown(record.reason)}")
    return Panel(table, title=title, title_align="left", expand=False)


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
                        console.print(show_panel(record))
                        count += 1
                if offset is not None and chunk[-1].offset >= offset:
                    break
    return count


# --------------------------------------------------------------------------- replay checks

#: Headers every dead letter written by the service carries exactly once.
_REQUIRED = ("dlq.original.topic", "dlq.original.partition", "dlq.original.offset",
             "dlq.error.reason", "dlq.failed_at")
_NUMBER = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class Checked:
    """A dead letter whose headers hold up: where it came from, as integers."""

    partition: int
    offset: int


def check_headers(record: DeadLetter, input_topic: str) -> Checked | str:
    """The record's origin, or why it must never be replayed (a refusal, in words)."""
    names = [name for name, _ in record.headers]
    for name in sorted({name for name in names if name.startswith("dlq.")}):
        if names.count(name) > 1:
            return f"header {name} appears {names.count(name)} times"
    for name in _REQUIRED:
        if record.header(name) in (None, ""):
            return f"header {name} is missing"
    original = record.header("dlq.original.topic")
    if original != input_topic:
        return (f"header dlq.original.topic names {shown(original or '')!r}, but records of "
                f"{record.topic!r} may only go back to {input_topic!r}")
    numbers = {}
    for name in ("dlq.original.partition", "dlq.original.offset"):
        text = record.header(name) or ""
        if not _NUMBER.fullmatch(text):
            return f"header {name} is not a non-negative integer"
        numbers[name] = int(text)
    if record.failed_at is None:
        return "header dlq.failed_at is not an ISO 8601 time with a zone"
    return Checked(numbers["dlq.original.partition"], numbers["dlq.original.offset"])


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
        from service.entrypoints.translators import routes
        self.routes = routes(settings)

    def say(self, record: DeadLetter, verdict: str) -> None:
        self.out.write(f"{record.partition}:{record.offset}  "
                       f"{shown(record.header('dlq.failed_at') or '')}  "
                       f"{shown(record.reason)}  key={shown(record.key_text)}  {verdict}\n")

    async def chunk(self, records: list[DeadLetter]) -> None:
        """Decide every record of one chunk (two audit queries), then send what may go."""
        rows = await self.audit.rows([record.digest for record in records])
        contents = await self.audit.replayed_contents(
            [record.content_digest for record in records])
        to_send: list[tuple[DeadLetter, Claim]] = []
        reclaim: list[str] = []
        seen: set[str] = set()
        for record in records:
            self._decide(record, rows.get(record.digest), contents, seen, to_send, reclaim)
        if to_send:
            await self._send(to_send, reclaim)

    def _decide(self, record: DeadLetter, row: AuditRow | None,
                contents: dict[str, list[AuditRow]], seen: set[str],
                to_send: list[tuple[DeadLetter, Claim]], reclaim: list[str]) -> None:
        """Replay now, hold back, refuse or skip one record; say so unless it is routine."""
        summary, force = self.summary, self.options.force
        digest = record.digest
        if digest in seen or (row is not None and row.state != CLAIMED):
            summary.already_replayed += 1  # (or an exact copy of one replayed just now)
            return
        if not self.options.filters.match(record):
            summary.filtered_out += 1
            return
        checked = check_headers(record, self.input_topic)
        if isinstance(checked, str):
            summary.refused += 1
            self.say(record, f"REFUSED, never replayed: {checked}")
            return
        earlier = contents.get(record.content_digest, [])
        if any(replayed.replay_run == self.audit.run for replayed in earlier):
            summary.held += 1  # even with --force: a replay must not chase its own failures
            self.say(record, "held back: this run already replayed the same record "
                             "(a copy, or its dead letter after that replay)")
            return
        held: str | None = None
        if row is not None:
            held = (f"maybe sent already: run {row.replay_run} claimed it at "
                    f"{row.replayed_at:%Y-%m-%dT%H:%M:%SZ} and never confirmed the send")
        else:
            failed_at = record.failed_at
            again = [replayed for replayed in earlier if replayed.reason == record.reason
                     and failed_at is not None and failed_at > replayed.replayed_at]
            if again:
                held = (f"replayed before (run {again[-1].replay_run}) and dead-lettered again "
                        f"for the same reason")
        if held is None:
            held = would_fail_again(record, self.input_topic, self.routes)
        if held is not None and not force:
            summary.held += 1
            self.say(record, f"held back: {held} (--force replays it)")
            return
        if self.options.dry_run:
            seen.add(digest)
            summary.would_replay += 1
            self.say(record, f"would replay to {self.input_topic}"
                             + (f" (forced: {held})" if held else ""))
            return
        seen.add(digest)
        if row is not None:
            reclaim.append(digest)
        to_send.append((record, Claim(
            digest=digest, content_digest=record.content_digest,
            dlq_topic=self.dlq_topic, dlq_partition=record.partition, dlq_offset=record.offset,
            original_topic=self.input_topic, original_partition=checked.partition,
            original_offset=checked.offset, reason=record.reason,
            record_key=record.key_text or None)))

    async def _send(self, to_send: list[tuple[DeadLetter, Claim]], reclaim: list[str]) -> None:
        """Claim (committed), send, confirm; a record another run claimed first stays put."""
        assert self.producer is not None
        reclaimed = set(reclaim)
        held = await self.audit.claim([claim for _, claim in to_send
                                       if claim.digest not in reclaimed], reclaim=reclaim)
        mine = [(record, claim) for record, claim in to_send if claim.digest in held]
        for record, claim in to_send:
            if claim.digest not in held:
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


async def replay(settings: Settings, dlq_topic: str, options: ReplayOptions,
                 out: IO[str] = sys.stdout) -> ReplaySummary:
    """Republish matching dead letters to their own input topic, each at most once."""
    input_topic = input_topic_of(dlq_topic)
    if input_topic not in settings.topics.inputs():
        raise DlqError(f"{dlq_topic!r} is not the dead-letter topic of an input topic of this "
                       f"service ({', '.join(settings.topics.inputs())}); refusing to replay",
                       EXIT_NOT_DEAD_LETTER_TOPIC)
    connection = await _connect(settings)
    producer: KafkaProducer | None = None
    try:
        audit = ReplayAudit(connection, run=secrets.token_hex(6), operator=getpass.getuser())
        async with _consumer(settings) as consumer:
            partitions = await _partitions(consumer, dlq_topic, settings)
            if input_topic not in await consumer.topics():
                raise DlqError(f"no topic {input_topic!r} on the broker at "
                               f"{settings.kafka_bootstrap_servers}", EXIT_NO_TOPIC)
            if not options.dry_run:
                producer = KafkaProducer(settings)
                await producer.start()
            run = _Replay(settings, dlq_topic, input_topic, options, audit, producer, out)
            for tp in partitions:
                async for chunk in _chunks(consumer, tp):
                    await run.chunk(chunk)
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
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise DlqError(f"cannot reach PostgreSQL at {database_location(settings.database_url)} "
                       f"({type(error).__name__})", EXIT_UNREACHABLE) from error
    return connection


def database_location(url: str) -> str:
    """host:port/database of a URL, never its user or password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


# --------------------------------------------------------------------------- the command


def command(args: Any, settings: Settings) -> int:
    """``creditnotes dlq ...``: run it, turning expected failures into one line and a code."""
    if not args.debug:
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    out = sys.stdout
    try:
        return asyncio.run(_command(args, settings, out))
    except DlqError as error:
        if args.debug:
            raise
        out.flush()
        print(f"creditnotes dlq: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (KafkaError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        if args.debug:
            raise
        print(f"creditnotes dlq: the broker at {settings.kafka_bootstrap_servers} or PostgreSQL "
              f"at {database_location(settings.database_url)} failed ({type(error).__name__}); "
              "a record sent but not confirmed is held back as 'maybe sent' by the next replay; "
              "--debug shows the traceback", file=sys.stderr)
        return EXIT_UNREACHABLE


async def _command(args: Any, settings: Settings, out: IO[str]) -> int:
    filters = Filters(reason=args.reason, since=args.since, key=args.key)
    print(f"creditnotes dlq: broker {settings.kafka_bootstrap_servers}"
          + (f", PostgreSQL {database_location(settings.database_url)}"
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
