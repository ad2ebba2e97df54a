"""What the JSON API and the pages share: every read and every action of the console.

No FastAPI here: the routes of ``api.py`` and ``pages.py`` call these and turn a
:class:`~.errors.ConsoleError` into their answer. Writes are commands, never SQL:

- issue, void and update build the contract's CloudEvent (``id`` = the
  Idempotency-Key, ``source`` = ``<console_source_prefix>/<user>``), check it
  exactly as the service will read it (``translators.decode_envelope`` and
  ``translate``: a body that would be dead-lettered is refused with 422 and
  nothing is sent), publish it on ``credit-note-commands`` keyed by its invoice,
  and wait a bounded time for the ledger's outcome (``processed_messages``);
- replay goes through ``dlq.replay``, the code of ``creditnotes dlq replay``,
  with ``console:<user>`` as the operator its audit rows name;
- preview prices the credit note with the domain's own ``issue_credit_note`` on
  the invoice as stored now, in memory: nothing is saved or sent.

The console's only rows are its audit's (``console_audit``): every write
attempt, its refusals included, with who, what, the Idempotency-Key, a digest
of the request and the outcome.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import io
import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, cast
from urllib.parse import quote

import asyncpg
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from service.adapters import console_audit, console_queries, queries, verify_runs
from service.adapters.kafka_producer import KafkaProducer, connection_options
from service.adapters.unavailable import (
    BROKER_ERRORS,
    DATABASE_ERRORS,
    NETWORK_ERRORS,
    is_unavailable,
)
from service.domain import errors, issuing
from service.domain.commands import IssueCreditNote, Trigger
from service.domain.invoice import InvoiceStatus
from service.entrypoints import dlq, translators, wire
from service.entrypoints.console import views
from service.entrypoints.console.auth import User
from service.entrypoints.console.errors import ConsoleError, refused
from service.entrypoints.console.views import (
    CommandResult,
    CreditNoteSummary,
    CreditNoteView,
    DeadLetterView,
    FlowHealth,
    InvoiceView,
    Page,
    PreviewResult,
    ReasonGroup,
    ReplayResult,
    ReplayRowView,
)
from service.entrypoints.ops_context import OpsError
from service.settings import Settings

__all__ = [
    "CommandResult", "CreditNoteSummary", "CreditNoteView", "DeadLetterFilters",
    "DeadLetterView", "Deps", "FlowHealth", "InvoiceView", "NoteFilters", "Page",
    "PreviewResult", "ReasonGroup", "ReplayResult", "ReplayRowView", "ReplaySelection",
    "Unreadable",
    "command_status", "credit_note_view", "dead_letter", "dead_letter_groups", "dead_letters",
    "dead_letters_for_key", "flow_health", "invoice_view", "issue", "list_credit_notes",
    "preview", "replay", "replay_history", "update", "void",
]

#: The content type of a structured-mode CloudEvent, as ``creditnotes publish`` sends it.
CONTENT_TYPE = ("content-type", b"application/cloudevents+json")
#: An Idempotency-Key: 1-200 letters, digits and ``. _ : -``, not ``.`` first: it is
#: routed back as one path segment (``/api/v1/commands/{key}``), so no ``/``, no ``%``,
#: never ``.`` or ``..`` (the pages' keys, ``secrets.token_urlsafe``, fit).
KEY_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._:-]{0,199}$"
_KEY = re.compile(KEY_PATTERN)
#: Topic names when no settings are given (a preview from a page without them).
_DEFAULTS = Settings.model_construct()
#: The most dead letters one list request reads past (it answers with a cursor to go on).
MAX_SCANNED = 10_000


class Unreadable:
    """A request body that is not JSON (the API hands it on, so its refusal is audited)."""


class Deps(Protocol):
    """What the actions need of ``deps.ConsoleDeps``."""

    @property
    def settings(self) -> Settings: ...

    @property
    def pool(self) -> asyncpg.Pool: ...

    @property
    def producer(self) -> KafkaProducer: ...

    @property
    def metrics(self) -> Any: ...  # ConsoleMetrics: commands_published counts by type


#: What PostgreSQL answers to text it cannot hold (a NUL character, an unpaired surrogate).
_UNSTORABLE_TEXT = (asyncpg.exceptions.CharacterNotInRepertoireError,
                    asyncpg.exceptions.UntranslatableCharacterError)


@asynccontextmanager
async def _acquire(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection, typed as the queries take it. Text PostgreSQL refuses is a
    ``bad_request``; PostgreSQL out of reach is ``unavailable`` (never a 500)."""
    acquired = False
    try:
        async with pool.acquire() as connection:
            acquired = True
            yield cast(asyncpg.Connection, connection)
    except _UNSTORABLE_TEXT:
        raise refused("bad_request", "the request holds text PostgreSQL cannot hold (a NUL "
                      "character)") from None
    except (*DATABASE_ERRORS, *NETWORK_ERRORS) as error:
        if acquired and not is_unavailable(error):
            raise  # the statement's fault, not the server's: a bug to see
        raise refused("unavailable", f"PostgreSQL cannot be reached ({type(error).__name__})"
                      ) from None


def _text(value: str | None, field: str) -> None:
    """Refuse, naming the field, text PostgreSQL cannot hold (before it is asked)."""
    if value is not None and ("\x00" in value or any(
            "\ud800" <= char <= "\udfff" for char in value)):
        raise refused("bad_request", f"{field} holds a character PostgreSQL text cannot hold "
                      "(NUL or an unpaired surrogate)", field)


#: What reading the broker may raise besides ``OpsError``.
_READ_ERRORS: tuple[type[Exception], ...] = (*BROKER_ERRORS, *NETWORK_ERRORS)


# --------------------------------------------------------------------------- inputs


class NoteFilters(BaseModel):
    """What a list of credit notes is narrowed to (each None: any)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    invoice_id: str | None = Field(default=None, max_length=255)
    customer_id: str | None = Field(default=None, max_length=255)
    reason: wire.Reason | None = None
    status: Literal["issued", "void"] | None = None
    issued_from: AwareDatetime | None = None
    issued_to: AwareDatetime | None = None


class DeadLetterFilters(BaseModel):
    """Those of ``creditnotes dlq list|replay``: ``--reason``, ``--key``, ``--since``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str | None = Field(default=None, max_length=200)
    key: str | None = Field(default=None, max_length=1000)
    since: AwareDatetime | None = None

    def dlq(self) -> dlq.Filters:
        return dlq.Filters(reason=self.reason, since=self.since, key=self.key)


class ReplaySelection(BaseModel):
    """Which dead letters a replay takes: the ``positions`` chosen (``"partition:offset"``),
    or, with ``all_matching``, every one the filters match (both: those of the positions
    the filters match)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    positions: list[str] | None = Field(default=None, max_length=1000)
    all_matching: bool = False
    filters: DeadLetterFilters = DeadLetterFilters()
    dry_run: bool = False


# --------------------------------------------------------------------------- reads


async def invoice_view(pool: asyncpg.Pool, invoice_id: str) -> InvoiceView | None:
    """The invoice with its lines (credited and remaining), payments, credit notes,
    refunds and events out (with their outbox state), read in one snapshot. Its dead
    letters are on the broker: :func:`dead_letters_for_key`."""
    _text(invoice_id, "invoice_id")
    async with _acquire(pool) as connection, connection.transaction(
            isolation="repeatable_read", readonly=True):
        invoice = await queries.load_invoice(connection, invoice_id)
        if invoice is None:
            return None
        notes = await queries.credit_notes_of(connection, invoice_id)
        events = await console_queries.events_of(connection, invoice_id, invoice.customer_id)
        received_at, arrivals = await console_queries.arrivals(connection, invoice_id)
    return views.invoice_view(invoice, notes, events, received_at, arrivals)


async def credit_note_view(pool: asyncpg.Pool, id_or_number: str) -> CreditNoteView | None:
    """A credit note by id or number: lines, journal, trigger, policy, refunds, and whether
    it can be voided or edited now (and why not)."""
    _text(id_or_number, "id_or_number")
    async with _acquire(pool) as connection, connection.transaction(
            isolation="repeatable_read", readonly=True):
        note = await console_queries.credit_note(connection, id_or_number)
        if note is None:
            return None
        status = await connection.fetchval("SELECT status FROM invoices WHERE id = $1",
                                           note.invoice_id)
    return views.credit_note_view(note, InvoiceStatus(status) if status else None)


async def list_credit_notes(pool: asyncpg.Pool, filters: NoteFilters, page: str | None,
                            limit: int = 50) -> Page[CreditNoteSummary]:
    """Newest first; ``page`` is the ``next`` of the previous page (None: the first)."""
    if not 1 <= limit <= console_queries.MAX_PAGE:
        raise refused("invalid_request", f"limit must be 1-{console_queries.MAX_PAGE}",
                      "limit")
    after = _note_cursor(page) if page else None
    for name in ("invoice_id", "customer_id"):
        _text(getattr(filters, name), name)
    query = console_queries.NoteQuery(**filters.model_dump())
    async with _acquire(pool) as connection:
        rows = await console_queries.list_credit_notes(connection, query, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return Page[CreditNoteSummary](
        items=[views.summary_view(row) for row in rows],
        next=_encode_cursor(rows[-1].issued_at, rows[-1].id) if more and rows else None)


def _encode_cursor(issued_at: datetime, note_id: str) -> str:
    raw = json.dumps([issued_at.isoformat(), note_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _note_cursor(page: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(page + "=" * (-len(page) % 4))
        moment, note_id = json.loads(raw)
        at = datetime.fromisoformat(moment)
        if not isinstance(note_id, str) or at.tzinfo is None or "\x00" in note_id:
            raise ValueError(page)
    except (ValueError, TypeError, binascii.Error):
        raise refused("invalid_request", "page is not a cursor this list gave", "page") from None
    return at, note_id


async def preview(pool: asyncpg.Pool, invoice_id: str, data: Mapping[str, Any], *,
                  settings: Settings | None = None, user: User | None = None,
                  key: str | None = None) -> PreviewResult:
    """What issuing ``data`` on the invoice would do now, saving nothing.

    The same code as issuing: the body is checked as a ``credit_note.issue`` the
    service would read, then priced by ``issuing.issue_credit_note`` on the invoice as
    stored. With ``user`` and ``key`` the preview names the very trigger the issue
    will (``source`` and ``id``), so its credit note and refund ids are those the
    issue gets.
    """
    _text(invoice_id, "invoice_id")
    full = _issue_data(invoice_id, data)
    if settings is not None and user is not None:
        command = _checked(settings, source_of(settings, user), key or "preview",
                           "credit_note.issue", full, invoice_id)
    else:
        command = _checked(None, "/console/preview", key or "preview", "credit_note.issue",
                           full, invoice_id)
    assert isinstance(command, IssueCreditNote)
    async with _acquire(pool) as connection, connection.transaction(
            isolation="repeatable_read", readonly=True):
        invoice = await queries.load_invoice(connection, invoice_id)
        if invoice is None:
            raise refused("invoice_not_found", f"no invoice {invoice_id!r}", "invoice_id")
        taken = await queries.taken_refund_ids(
            connection, [refund.refund_id for refund in command.linked_refunds])
    before = invoice.amount_remaining
    limits = {"max_creditable": invoice.creditable,
              "max_refundable": min(invoice.refundable, max(invoice.creditable - before, 0))}
    try:
        note = issuing.issue_credit_note(invoice, command, taken_refund_ids=taken)
    except errors.Rejection as rejection:
        return PreviewResult(invoice_id=invoice_id, currency=invoice.currency,
                             rejection=views.Rejection(code=rejection.code,
                                                       message=rejection.message),
                             amount_remaining_before=before, amount_remaining_after=before,
                             invoice_status_after=invoice.status.value, **limits)
    except errors.InvalidMessage as error:
        raise refused("invalid_message", error.message) from None
    from service.adapters.event_codec import encode

    return PreviewResult(
        invoice_id=invoice_id, currency=invoice.currency,
        credit_note=views.credit_note_view(note, invoice.status),
        amount_remaining_before=before, amount_remaining_after=invoice.amount_remaining,
        invoice_status_after=invoice.status.value,
        events=[encode(event, (settings or _DEFAULTS).topics).type
                for event in invoice.events], **limits)


async def dead_letters_for_key(settings: Settings, key: str, limit: int = 100
                               ) -> list[DeadLetterView]:
    """The dead letters keyed ``key`` (an invoice id) on every dead-letter topic: the
    service keys a dead letter as its record, so only the partition the key hashes to
    is read on each. Raises ``unavailable`` when the broker cannot be read."""
    wanted = key.encode()
    found: list[DeadLetterView] = []
    try:
        async with dlq.reader(settings) as consumer:
            existing = await consumer.topics()
            tps = []
            for topic in (f"{name}{dlq.DLQ_SUFFIX}" for name in settings.topics.inputs()):
                partitions = sorted(consumer.partitions_for_topic(topic) or ()) \
                    if topic in existing else []
                if partitions:
                    tps.append(TopicPartition(
                        topic, DefaultPartitioner()(wanted, partitions, partitions)))
            async with aclosing(dlq.scan(consumer, tps, dlq.quiet_ms(settings))) as chunks:
                async for chunk in chunks:
                    found += [views.dead_letter_view(record) for record in chunk
                              if record.key == wanted]
    except OpsError as error:
        raise _ops_refusal(error) from None
    except _READ_ERRORS as error:
        raise refused("unavailable", f"the broker cannot be read ({type(error).__name__})") \
            from None
    found.sort(key=lambda view: (view.failed_at or datetime.min.replace(tzinfo=UTC),
                                 view.topic, view.partition, view.offset))
    return found[-limit:]


# --------------------------------------------------------------------------- writes


def source_of(settings: Settings, user: User) -> str:
    """A console command's CloudEvents ``source``: ``<prefix>/<user, percent-encoded>``."""
    return f"{settings.console_source_prefix.rstrip('/')}/{quote(user.name, safe='')}"


def check_key(key: str | None) -> str:
    """The Idempotency-Key, or the refusal of a missing or malformed one."""
    if key is None or key == "":
        raise refused("idempotency_key_required",
                      "send an Idempotency-Key header (1-200 letters, digits, '.', '_', ':' "
                      "or '-', not '.' first): a retried request with the same key "
                      "has one effect")
    if not _KEY.fullmatch(key):
        raise refused("idempotency_key_invalid", "an Idempotency-Key is 1-200 letters, "
                      "digits, '.', '_', ':' or '-', not '.' first (no '/': the "
                      "key is polled at /api/v1/commands/{key})")
    return key


async def issue(deps: Deps, user: User, key: str | None, data: Any) -> CommandResult:
    """``credit_note.issue`` with ``data`` (the contract's, ``invoice_id`` included)."""
    invoice_id = data.get("invoice_id") if isinstance(data, Mapping) else None
    target = invoice_id if isinstance(invoice_id, str) else None
    async with _audited(deps, user, "issue", target, key, data) as attempt:
        key = check_key(key)
        _require_object(data)
        if target is None:
            raise refused("invalid_message", "invoice_id is required: a string", "invoice_id")
        _checked(deps.settings, source_of(deps.settings, user), key, "credit_note.issue",
                 dict(data), target)
        async with _acquire(deps.pool) as connection:
            if await connection.fetchval("SELECT 1 FROM invoices WHERE id = $1", target) is None:
                raise refused("invoice_not_found", "no invoice has this id: a command for it "
                              "would wait, then be dead-lettered", "invoice_id")
        return await attempt.submit(key, "credit_note.issue", dict(data), target, None)
    raise AssertionError("unreachable")  # pragma: no cover  (_audited re-raises)


async def void(deps: Deps, user: User, key: str | None, credit_note_id: str) -> CommandResult:
    """``credit_note.void`` of a credit note (by id)."""
    return await _on_credit_note(deps, user, key, "void", "credit_note.void", credit_note_id,
                                 {"credit_note_id": credit_note_id})


async def update(deps: Deps, user: User, key: str | None, credit_note_id: str,
                 changes: Any) -> CommandResult:
    """``credit_note.update``: ``changes`` holds ``memo`` (null clears it) and/or
    ``metadata`` (merged key by key; a key set to null is removed), as the contract says."""
    return await _on_credit_note(deps, user, key, "update", "credit_note.update",
                                 credit_note_id,
                                 {**(changes if isinstance(changes, Mapping) else {}),
                                  "credit_note_id": credit_note_id},
                                 body=changes)


async def _on_credit_note(deps: Deps, user: User, key: str | None, action: str,
                          event_type: str, credit_note_id: str, data: dict[str, Any],
                          body: Any = None) -> CommandResult:
    async with _audited(deps, user, action, credit_note_id, key,
                        data if body is None else body) as attempt:
        key = check_key(key)
        _text(credit_note_id, "credit_note_id")
        if body is not None:
            _require_object(body)
            if body.get("credit_note_id", credit_note_id) != credit_note_id:
                raise refused("invalid_message", "credit_note_id differs from the path's",
                              "credit_note_id")
        settings = deps.settings
        _checked(settings, source_of(settings, user), key, event_type, data, credit_note_id)
        async with _acquire(deps.pool) as connection:
            invoice_id = await console_queries.invoice_of_credit_note(connection,
                                                                      credit_note_id)
        if invoice_id is None:
            raise refused("credit_note_not_found", f"no credit note has the id "
                          f"{credit_note_id!r}", "credit_note_id")
        return await attempt.submit(key, event_type, data, invoice_id, credit_note_id)
    raise AssertionError("unreachable")  # pragma: no cover


def _require_object(data: Any) -> None:
    if isinstance(data, Unreadable):
        raise refused("invalid_message", "the body is not JSON")
    if not isinstance(data, Mapping):
        raise refused("invalid_message", "the body is a JSON object")


async def command_status(deps: Deps, user: User, key: str) -> CommandResult:
    """What became of this user's command with this Idempotency-Key (``pending``: no
    outcome yet); ``command_not_found`` if this user sent none."""
    check_key(key)
    source = source_of(deps.settings, user)
    async with _acquire(deps.pool) as connection:
        earlier = await console_audit.find(connection, user.name, key)
        if earlier is None:  # an outcome under the user's source is not theirs: not sent here
            raise refused("command_not_found")
        outcome = await console_queries.command_outcome(connection, source, key)
        outcome = _remembered(earlier, outcome, earlier.action, deps.settings) or outcome
        if (outcome is None or outcome.outcome.startswith("released:")) \
                and earlier.outcome.startswith(UNKNOWN):
            return CommandResult(
                key=key, source=source, status="unknown", location=_location(key),
                reason=earlier.outcome.removeprefix(UNKNOWN) or None, message=MAYBE_SENT)
        note_id = earlier.target if earlier is not None and earlier.action in (
            "void", "update") else None
        invoice_id = earlier.target if earlier is not None and earlier.action == "issue" \
            else None
        result = await _result(connection, source, key, outcome, note_id, invoice_id)
        if earlier is not None and result.status != "pending" and (
                earlier.outcome == console_audit.PENDING
                or earlier.outcome.startswith(UNKNOWN)):  # its audit row learns it now
            await console_audit.finish(connection, earlier.id, _answered(result))
        return result


async def _result(connection: asyncpg.Connection, source: str, key: str,
                  outcome: console_queries.CommandOutcome | None,
                  note_id: str | None, invoice_id: str | None = None) -> CommandResult:
    location = _location(key)
    if outcome is None or outcome.outcome.startswith("released:"):
        return CommandResult(key=key, source=source, status="pending", location=location)
    kind, _, reason = outcome.outcome.partition(":")
    note: CreditNoteView | None = None
    message: str | None = None
    if kind == "applied" and note_id is None:
        note_id = await console_queries.credit_note_issued_by(connection, source, key)
    if kind in ("applied", "duplicate") and note_id is not None:
        found = await console_queries.credit_note(connection, note_id)
        if found is not None:
            status = await connection.fetchval("SELECT status FROM invoices WHERE id = $1",
                                               found.invoice_id)
            note = views.credit_note_view(found, InvoiceStatus(status) if status else None)
    if kind == "rejected":
        rejection = await console_queries.rejection_of(connection, source, key, invoice_id)
        message = rejection[1] if rejection else None
    status_name: Literal["applied", "rejected", "dead_lettered", "duplicate"] = (
        kind if kind in ("applied", "rejected", "dead_lettered", "duplicate")  # type: ignore[assignment]
        else "applied")
    return CommandResult(key=key, source=source, status=status_name, reason=reason or None,
                         message=message, credit_note=note, location=location)


def _location(key: str) -> str:
    return f"/api/v1/commands/{quote(key, safe='')}"


def _issue_data(invoice_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise refused("invalid_message", "the body is a JSON object")
    if "invoice_id" in data and data["invoice_id"] != invoice_id:
        raise refused("invalid_message", "invoice_id differs from the invoice of the path",
                      "invoice_id")
    return {**data, "invoice_id": invoice_id}


def _event(source: str, key: str, event_type: str, data: Mapping[str, Any],
           subject: str) -> dict[str, Any]:
    return {"specversion": "1.0", "id": key, "source": source, "type": event_type,
            "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "subject": subject, "datacontenttype": "application/json", "data": dict(data)}


def _checked(settings: Settings | None, source: str, key: str, event_type: str,
             data: Mapping[str, Any], subject: str) -> Any:
    """The command the service would make of this event, or the refusal it would meet
    (``invalid_message`` naming the field, ``source_not_allowed``, ``message_too_large``)."""
    try:
        value = json.dumps(_event(source, key, event_type, data, subject),
                           ensure_ascii=False, separators=(",", ":"),
                           allow_nan=False).encode()
    except (TypeError, ValueError):
        raise refused("invalid_message", "the body is not plain JSON") from None
    if settings is not None and len(value) > settings.max_message_bytes:
        raise refused("message_too_large", f"the command would take {len(value)} bytes; the "
                      f"service accepts {settings.max_message_bytes}")
    topic = (settings or _DEFAULTS).topics.credit_note_commands
    try:
        event = translators.decode_envelope(value, [CONTENT_TYPE])
        if settings is None:  # a preview without a user: no allow-list to pass
            return translators.issue(event, Trigger(event.source, event.id, event.type,
                                                    event.time))
        return translators.translate(event, topic, translators.routes(settings))
    except errors.UnauthorizedSource:
        raise refused("source_not_allowed", f"the service would dead-letter a command from "
                      f"{source!r} as unauthorized_source: its allow-list for {topic} must "
                      f"admit the console (e.g. \"{source.rsplit('/', 1)[0]}/*\")") from None
    except errors.InvalidMessage as error:
        raise refused("invalid_message", error.message,
                      _field_of(event_type, data) or _nul_field(data)
                      or _named_field(error.message)) from None
    except errors.Undeliverable as error:
        raise refused("invalid_message", f"{error.code}: {error.message}") from None


def _field_of(event_type: str, data: Mapping[str, Any]) -> str | None:
    """The first field the contract's model refuses in ``data`` (its path, no values)."""
    models: dict[str, type[BaseModel]] = {"credit_note.issue": wire.CreditNoteIssue,
                                          "credit_note.void": wire.CreditNoteVoid,
                                          "credit_note.update": wire.CreditNoteUpdate}
    model = models[event_type]
    try:
        model.model_validate(dict(data))
    except ValidationError as error:
        return translators.first_field(error)
    except (ValueError, TypeError, ArithmeticError, RecursionError):
        return None
    return None


def _nul_field(data: Any, path: str = "", keys: bool = False) -> str | None:
    """Where a NUL character is (PostgreSQL text cannot hold one): ``memo``,
    ``metadata.<key>`` (a key from the body is never shown), ``lines.0.description``;
    ``keys``: ``data``'s keys are the body's own (a dictionary field's)."""
    def under(name: str) -> str:
        return f"{path}.{name}" if path else name

    if isinstance(data, str):
        return (path or "message") if "\x00" in data else None
    if isinstance(data, Mapping):
        for key, value in data.items():
            known = not keys and isinstance(key, str) and key in wire.FIELD_NAMES
            if isinstance(key, str) and "\x00" in key:
                return under("<key>")
            found = _nul_field(value, under(key if known else "<key>"),
                               keys=known and key in wire.DICTIONARY_FIELDS)
            if found:
                return found
    if isinstance(data, list):
        for index, value in enumerate(data):
            found = _nul_field(value, under(str(index)))
            if found:
                return found
    return None


def _named_field(message: str) -> str | None:
    return views.failing_field(message)


def _digest(action: str, target: str | None, body: Any) -> str | None:
    try:
        text = json.dumps([action, target, body], sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


class _Attempt:
    """One audited write: its audit row is begun by :meth:`submit` (or, for a refusal, by
    :func:`_audited`) and finished with what the console answered."""

    def __init__(self, deps: Deps, user: User, action: str, target: str | None,
                 key: str | None, body: Any) -> None:
        self.deps = deps
        self.user = user
        self.action = action
        self.target = target
        self.key = key
        self.digest = _digest(action, target, body)
        self.audited = False

    async def submit(self, key: str, event_type: str, data: dict[str, Any], invoice_id: str,
                     note_id: str | None) -> CommandResult:
        deps, user = self.deps, self.user
        settings = deps.settings
        source = source_of(settings, user)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.console_wait_seconds  # the publish's and the wait's
        async with _acquire(deps.pool) as connection:
            async with connection.transaction():
                # one request per user and key at a time: no two bodies under one key
                await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                                         f"console:{user.name}:{key}")
                earlier = await console_audit.find(connection, user.name, key)
                reused = earlier is not None and earlier.request_digest != self.digest
                # a command under the user's source and this key the console never sent:
                # another writer of the topic spoke as the console (its outcome is not ours)
                foreign = earlier is None and await console_queries.command_outcome(
                    connection, source, key) is not None
                audit_id: int | None = None
                if earlier is None or reused:
                    audit_id = await console_audit.begin(
                        connection, actor=user.name, role=user.role, via=user.via,
                        action=self.action, target=self.target, idempotency_key=key,
                        request_digest=self.digest,
                        outcome="refused:idempotency_key_reused" if reused or foreign
                        else None)
            if reused or foreign:
                self.audited = True
                raise refused("idempotency_key_reused", FOREIGN if foreign else
                              "this Idempotency-Key was sent before with another request: "
                              "use a new key for a new request")
            if audit_id is None:  # the same request again: audited as a repeat, once answered
                audit_id = await console_audit.begin(
                    connection, actor=user.name, role=user.role, via=user.via,
                    action=self.action, target=self.target, idempotency_key=None,
                    request_digest=self.digest)
            self.audited = True
            outcome = await console_queries.command_outcome(connection, source, key)
            remembered = _remembered(earlier, outcome, event_type, settings)
            if remembered is not None:  # the ledger forgot it (retention): never again
                result = await _result(connection, source, key, remembered, note_id,
                                       invoice_id)
        if remembered is not None:
            await _shielded(self._finish(audit_id, f"repeat:{_answered(result)}"))
            return result
        if outcome is None or outcome.outcome.startswith("released:"):
            value = json.dumps(_event(source, key, event_type, data, invoice_id),
                               ensure_ascii=False, separators=(",", ":")).encode()
            sent = await self._publish(audit_id, earlier is not None, event_type, value,
                                       invoice_id.encode(), deadline)
            if not sent:  # still in flight at the deadline: 202, the poll tells
                result = await self._wait(source, key, note_id, invoice_id, loop.time())
                if earlier is not None:
                    await _shielded(self._finish(audit_id, "repeat:pending"))
                return result
        result = await self._wait(source, key, note_id, invoice_id, deadline)
        if earlier is not None:
            await _shielded(self._finish(audit_id, f"repeat:{_answered(result)}"))
        if result.status != "pending":  # a pending row is finished by a later poll or repeat
            await _shielded(self._finish(earlier.id if earlier is not None else audit_id,
                                         _answered(result)))
        return result

    async def _publish(self, audit_id: int, repeat: bool, event_type: str, value: bytes,
                       record_key: bytes, deadline: float) -> bool:
        """Publish within the wait: True once the broker acknowledged it, False while it is
        still in flight at the deadline (it goes on; if it fails, its audit row says so).
        A failed publish is ``unavailable``: the record may have reached the broker."""
        sending = asyncio.ensure_future(self._send(audit_id, repeat, event_type, value,
                                                   record_key))
        _IN_FLIGHT.add(sending)
        sending.add_done_callback(_settled)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(asyncio.shield(sending), max(deadline - loop.time(), 0.05))
            return True
        except TimeoutError:
            if not sending.done():
                return False
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not sending.done() or (task is not None and task.cancelling()):
                raise  # this request is cancelled: the send goes on and audits its failure
        except Exception:  # noqa: S110  (the send's own error, said below)
            pass
        if not sending.cancelled() and sending.exception() is None:
            return True  # acknowledged just as the wait ended
        failure = "CancelledError" if sending.cancelled() else \
            type(sending.exception()).__name__
        raise refused("unavailable", f"publishing the command failed ({failure}); it may have "
                      "been sent: retry with the same Idempotency-Key (one effect), or poll "
                      "GET /api/v1/commands/{key}")

    async def _send(self, audit_id: int, repeat: bool, event_type: str, value: bytes,
                    record_key: bytes) -> None:
        deps = self.deps
        try:
            await deps.producer.send(deps.settings.topics.credit_note_commands, value=value,
                                     key=record_key, headers=[CONTENT_TYPE])
        except BaseException as error:  # cancelled too: the row must not stay pending
            outcome = f"{'repeat:' if repeat else ''}{UNKNOWN}{type(error).__name__}"
            with contextlib.suppress(Exception):
                await _shielded(self._finish(audit_id, outcome))
            raise
        deps.metrics.commands_published.labels(event_type).inc()

    async def _wait(self, source: str, key: str, note_id: str | None, invoice_id: str,
                    deadline: float) -> CommandResult:
        """Poll the ledger until the outcome or the deadline; a connection is taken per
        poll (never held while sleeping), and at most half the pool polls at once, so
        waiting writes never starve reads or readiness."""
        loop = asyncio.get_running_loop()
        pause = 0.02
        pool = self.deps.pool
        while True:
            async with _pollers(pool), _acquire(pool) as connection:
                outcome = await console_queries.command_outcome(connection, source, key)
                if outcome is not None and not outcome.outcome.startswith("released:"):
                    return await _result(connection, source, key, outcome, note_id,
                                         invoice_id)
                if loop.time() + pause > deadline:
                    return await _result(connection, source, key, None, note_id, invoice_id)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)

    async def _finish(self, audit_id: int, outcome: str) -> None:
        async with _acquire(self.deps.pool) as connection:
            await console_audit.finish(connection, audit_id, outcome)

    async def refused(self, error: ConsoleError) -> None:
        """Audit a refusal before anything was sent (bad input, unknown target ...)."""
        if self.audited:
            return
        key = self.key if self.key is not None and _KEY.fullmatch(self.key) else None
        async with _acquire(self.deps.pool) as connection:
            await console_audit.begin(
                connection, actor=self.user.name, role=self.user.role, via=self.user.via,
                action=self.action, target=(self.target or "")[:255] or None,
                idempotency_key=key, request_digest=self.digest,
                outcome=f"refused:{error.code}")
        self.audited = True


#: Sends still in flight after their request answered (kept from the garbage collector).
_IN_FLIGHT: set[asyncio.Future[None]] = set()
#: Per pool: how many outcome polls may hold a connection at once.
_POLLERS: dict[tuple[int, int], asyncio.Semaphore] = {}
#: The outcome of a command's audit row whose publish failed: it may have been sent.
UNKNOWN = "unknown:"
MAYBE_SENT = ("publishing this command failed and no outcome is known: it may have been "
              "sent. Retry the same request with the same Idempotency-Key: it has one effect")
FOREIGN = ("a command with this Idempotency-Key was already received from elsewhere under "
           "this user's console source (the console did not send it): use a new key")


def _remembered(earlier: console_audit.AuditRow | None,
                outcome: console_queries.CommandOutcome | None, event_type: str,
                settings: Settings) -> console_queries.CommandOutcome | None:
    """The outcome the command's audit row kept, when the ledger has none any more
    (``processed_messages`` pruned after its retention): a retry is answered from it and
    never published again (the service, having forgotten, would apply it twice)."""
    if earlier is None or (outcome is not None and not outcome.outcome.startswith("released:")):
        return None
    final = earlier.outcome
    if final == console_audit.PENDING or final.startswith((UNKNOWN, "refused:")):
        return None
    return console_queries.CommandOutcome(
        outcome=final, type=event_type, topic=settings.topics.credit_note_commands,
        processed_at=earlier.finished_at or earlier.at)


def _settled(sending: asyncio.Future[None]) -> None:
    _IN_FLIGHT.discard(sending)
    if not sending.cancelled():
        sending.exception()  # retrieved: its failure is in the audit row


def _pollers(pool: asyncpg.Pool) -> asyncio.Semaphore:
    name = (id(pool), id(asyncio.get_running_loop()))
    if name not in _POLLERS:
        _POLLERS[name] = asyncio.Semaphore(max(1, pool.get_max_size() // 2))
    return _POLLERS[name]


async def _shielded(work: Any) -> None:
    """Finish ``work`` (an audit write) even if the request is cancelled meanwhile."""
    await asyncio.shield(work)


def _answered(result: CommandResult) -> str:
    """A command's outcome as its audit row keeps it."""
    return result.status if result.reason is None else f"{result.status}:{result.reason}"


class _audited:
    """Every refusal raised inside is audited, then raised on."""

    def __init__(self, deps: Deps, user: User, action: str, target: str | None,
                 key: str | None, body: Any) -> None:
        self.attempt = _Attempt(deps, user, action, target, key, body)

    async def __aenter__(self) -> _Attempt:
        return self.attempt

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        _: Any) -> Literal[False]:
        if isinstance(error, ConsoleError):
            await self.attempt.refused(error)
        return False


# --------------------------------------------------------------------------- dead letters


def _ops_refusal(error: OpsError) -> ConsoleError:
    if error.exit_code == dlq.EXIT_NO_TOPIC:
        return refused("topic_not_found", str(error))
    if error.exit_code == dlq.EXIT_NOT_DEAD_LETTER_TOPIC:
        return refused("not_dead_letter_topic", str(error), "topic")
    if error.exit_code == dlq.EXIT_UNREACHABLE:
        return refused("unavailable", str(error))
    return refused("invalid_request", str(error))


def dead_letter_topics(settings: Settings) -> list[str]:
    return [f"{topic}{dlq.DLQ_SUFFIX}" for topic in settings.topics.inputs()]


async def dead_letter_groups(settings: Settings) -> list[ReasonGroup]:
    """Per dead-letter topic and reason: how many, and the oldest (read from the broker,
    every partition of every dead-letter topic together)."""
    groups: dict[tuple[str, str], tuple[int, datetime | None]] = {}
    try:
        async with dlq.reader(settings) as consumer:
            existing = await consumer.topics()
            tps = [TopicPartition(topic, partition)
                   for topic in dead_letter_topics(settings) if topic in existing
                   for partition in sorted(consumer.partitions_for_topic(topic) or ())]
            async with aclosing(dlq.scan(consumer, tps, dlq.quiet_ms(settings))) as chunks:
                async for chunk in chunks:
                    for record in chunk:
                        name = (record.topic, dlq.shown(record.reason))
                        count, oldest = groups.get(name, (0, None))
                        failed_at = record.failed_at
                        if failed_at is not None and (oldest is None or failed_at < oldest):
                            oldest = failed_at
                        groups[name] = (count + 1, oldest)
    except OpsError as error:
        raise _ops_refusal(error) from None
    except _READ_ERRORS as error:
        raise refused("unavailable", f"the broker cannot be read ({type(error).__name__})") \
            from None
    now = datetime.now(UTC)
    return [ReasonGroup(topic=topic, reason=reason, count=count, oldest_failed_at=oldest,
                        oldest_age_seconds=(now - oldest).total_seconds() if oldest else None)
            for (topic, reason), (count, oldest) in sorted(
                groups.items(), key=lambda item: (-item[1][0], item[0]))]


def _check_topic(topic: str) -> None:
    """A dead-letter topic's name (before any broker is asked)."""
    try:
        dlq.input_topic_of(topic)
    except OpsError as error:
        raise _ops_refusal(error) from None


def _position(text: str, field: str) -> tuple[int, int]:
    partition, _, offset = text.partition(":")
    if not (partition.isdigit() and offset.isdigit()) or len(text) > 40:
        raise refused("invalid_request", f"{field} is a position: <partition>:<offset>", field)
    return int(partition), int(offset)


async def dead_letters(settings: Settings, topic: str, filters: DeadLetterFilters,
                       after: str | None = None, limit: int = 50) -> Page[DeadLetterView]:
    """The dead letters of ``topic`` the filters match, partition by partition, oldest
    first, streamed from the broker; ``after`` is the ``next`` of the previous page. One
    request reads past at most :data:`MAX_SCANNED` records (its ``next`` goes on)."""
    if not 1 <= limit <= 500:
        raise refused("invalid_request", "limit must be 1-500", "limit")
    _check_topic(topic)
    start = _position(after, "after") if after else None
    matcher = filters.dlq()
    items: list[DeadLetterView] = []
    scanned = 0
    try:
        async with dlq.reader(settings) as consumer:
            for tp in await dlq.partitions_of(consumer, topic, settings):
                if start is not None and tp.partition < start[0]:
                    continue
                first = start[1] + 1 if start is not None and tp.partition == start[0] else None
                chunks = dlq.read_from(consumer, tp, first, dlq.quiet_ms(settings))
                async with aclosing(chunks):
                    async for chunk in chunks:
                        for record in chunk:
                            scanned += 1
                            if matcher.match(record):
                                items.append(views.dead_letter_view(record))
                            if len(items) == limit or scanned >= MAX_SCANNED:
                                return Page[DeadLetterView](
                                    items=items, next=f"{record.partition}:{record.offset}")
    except OpsError as error:
        raise _ops_refusal(error) from None
    except _READ_ERRORS as error:
        raise refused("unavailable", f"the broker cannot be read ({type(error).__name__})") \
            from None
    return Page[DeadLetterView](items=items, next=None)


async def dead_letter(settings: Settings, topic: str, partition: int, offset: int
                      ) -> DeadLetterView | None:
    """One dead letter in full: headers, payload, the failing field named."""
    _check_topic(topic)
    try:
        async with dlq.reader(settings) as consumer:
            for tp in await dlq.partitions_of(consumer, topic, settings):
                if tp.partition != partition:
                    continue
                chunks = dlq.read_from(consumer, tp, offset, dlq.quiet_ms(settings))
                async with aclosing(chunks):
                    async for chunk in chunks:
                        for record in chunk:
                            if record.offset == offset:
                                return views.dead_letter_view(record, full=True)
                            if record.offset > offset:
                                return None
    except OpsError as error:
        raise _ops_refusal(error) from None
    except _READ_ERRORS as error:
        raise refused("unavailable", f"the broker cannot be read ({type(error).__name__})") \
            from None
    return None


async def replay(deps: Deps, user: User, topic: str, selection: ReplaySelection | Any
                 ) -> ReplayResult:
    """Replay (or, ``dry_run``, say what a replay would do) through ``dlq.replay``, the
    code of ``creditnotes dlq replay``: same checks, same verdicts, same audit rows, with
    ``console:<user>`` as their operator. Never ``--force``: held-back records stay.

    ``selection`` may also be the request's JSON body, checked here (a refusal is
    audited like any other)."""
    if not isinstance(selection, ReplaySelection):
        attempt = _Attempt(deps, user, "replay", topic, None,
                           None if isinstance(selection, Unreadable) else selection)
        try:
            selection = _selection(selection)
        except ConsoleError as error:
            await attempt.refused(error)
            raise
    action = "replay_dry_run" if selection.dry_run else "replay"
    attempt = _Attempt(deps, user, action, topic, None, selection.model_dump(mode="json"))
    operator = f"console:{user.name}"
    try:
        positions = None
        if selection.positions is not None:
            positions = frozenset(_position(text, "positions") for text in selection.positions)
            if not positions:
                raise refused("invalid_request", "positions names no dead letter", "positions")
        elif not selection.all_matching:
            raise refused("invalid_request", "choose positions, or all_matching: true to "
                          "replay every dead letter the filters match", "positions")
        options = dlq.ReplayOptions(filters=selection.filters.dlq(), dry_run=selection.dry_run,
                                    positions=positions)
        _check_topic(topic)
        # begun before anything is republished, finished after: a replay cut short still
        # has its row (its outcome says how it ended)
        async with _acquire(deps.pool) as connection:
            row_id = await console_audit.begin(
                connection, actor=user.name, role=user.role, via=user.via, action=action,
                target=topic[:255], idempotency_key=None, request_digest=attempt.digest)
    except ConsoleError as error:
        await attempt.refused(error)
        raise
    attempt.audited = True
    out = io.StringIO()
    try:
        summary = await dlq.replay(deps.settings, topic, options, out, operator=operator)
    except OpsError as error:
        refusal = _ops_refusal(error)  # a begun row ends as what stopped it, never "refused:"
        await _shielded(attempt._finish(row_id, f"failed:{refusal.code}"))
        raise refusal from None
    except (*BROKER_ERRORS, *NETWORK_ERRORS, *DATABASE_ERRORS) as error:
        await _shielded(attempt._finish(row_id, f"failed:{type(error).__name__}"))
        raise refused("unavailable", f"the replay stopped ({type(error).__name__}); a "
                      "record sent but not confirmed is held back as 'maybe sent' by the "
                      "next replay") from None
    except BaseException as error:  # cancelled, or a bug: the row says the replay broke off
        with contextlib.suppress(Exception):
            await _shielded(attempt._finish(row_id, f"interrupted:{type(error).__name__}"))
        raise
    await _shielded(attempt._finish(
        row_id, (f"would_replay:{summary.would_replay}" if selection.dry_run
                 else f"replayed:{summary.republished}")
        + f"/held:{summary.held}/refused:{summary.refused}"))
    lines = out.getvalue().splitlines()
    verdicts = []
    for line in lines:
        position, _, rest = line.partition("  ")
        verdicts.append(views.ReplayVerdict(position=position,
                                            verdict=rest.split("  failed_at=", 1)[0]))
    return ReplayResult(
        topic=topic, dry_run=selection.dry_run, operator=operator,
        republished=summary.republished, would_replay=summary.would_replay,
        already_replayed=summary.already_replayed, filtered_out=summary.filtered_out,
        refused=summary.refused, held=summary.held, summary=summary.text(selection.dry_run),
        verdicts=verdicts, lines=lines)


def _selection(data: Any) -> ReplaySelection:
    if isinstance(data, Unreadable):
        raise refused("invalid_request", "the body is not JSON")
    try:
        return ReplaySelection.model_validate(data)
    except ValidationError as error:
        first = error.errors(include_input=False, include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise refused("invalid_request", f"{field or 'body'}: {first['msg']}", field) from None


async def replay_history(pool: asyncpg.Pool, limit: int = 50) -> list[ReplayRowView]:
    """The newest replays first, from the audit table (CLI and console alike)."""
    if not 1 <= limit <= console_queries.MAX_PAGE:
        raise refused("invalid_request", f"limit must be 1-{console_queries.MAX_PAGE}",
                      "limit")
    async with _acquire(pool) as connection:
        rows = await console_queries.replay_history(connection, limit)
    return [views.replay_row_view(row) for row in rows]


# --------------------------------------------------------------------------- health


def policy_caps(settings: Settings) -> dict[str, int]:
    """The policy cap (basis points of the invoice total) per trigger type."""
    return {"return.received": settings.policy_return_max_credit_bps,
            "sla.breached": settings.policy_sla_max_credit_bps,
            "subscription.downgraded": settings.policy_downgrade_max_credit_bps,
            "subscription.canceled": settings.policy_cancellation_max_credit_bps}


async def consumer_lag(settings: Settings) -> list[views.LagView]:
    """Per input topic partition: the service's consumer group's committed offset, the
    end, and the records between (the group's view, whichever replica holds them).

    The committed offsets are asked of the group's coordinator by a consumer that names
    the group but never subscribes: it joins nothing, commits nothing, moves nobody's
    partitions (aiokafka's admin client cannot read tansu's answer to OffsetFetch).
    """
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(**connection_options(settings), group_id=settings.consumer_group,
                                enable_auto_commit=False, client_id="creditnotes-console")
    await consumer.start()
    try:
        existing = await consumer.topics()
        tps = [TopicPartition(topic, partition) for topic in settings.topics.inputs()
               if topic in existing
               for partition in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = await consumer.end_offsets(tps) if tps else {}
        starts = await consumer.beginning_offsets(tps) if tps else {}
        committed = {tp: await consumer.committed(tp) for tp in tps}
    finally:
        await consumer.stop()
    lag = []
    for tp in tps:
        offset = committed[tp]
        lag.append(views.LagView(
            topic=tp.topic, partition=tp.partition, committed=offset, end=ends[tp],
            lag=max(ends[tp] - (offset if offset is not None else starts[tp]), 0)))
    return lag


async def flow_health(deps: Deps) -> FlowHealth:
    """Consumer lag, outbox backlog and age, parked rows, rejections and dead letters by
    reason, credit notes under a policy cap, pending refunds, the last ``verify``."""
    settings = deps.settings
    caps = policy_caps(settings)
    async with _acquire(deps.pool) as connection:
        figures = await console_queries.health(connection, caps)
        last = await verify_runs.last(connection)
    lag: list[views.LagView] = []
    lag_error = None
    try:
        lag = await consumer_lag(settings)
    except OpsError as error:
        lag_error = str(error)
    except _READ_ERRORS as error:
        lag_error = f"the broker cannot be read ({type(error).__name__})"
    groups: list[ReasonGroup] | None = None
    with contextlib.suppress(ConsoleError):  # the broker: said by dead_letters None
        groups = await dead_letter_groups(settings)
    return FlowHealth(
        consumer_group=settings.consumer_group, lag=lag,
        lag_total=sum(item.lag for item in lag) if lag_error is None else None,
        lag_error=lag_error, outbox_backlog=figures.outbox.rows,
        outbox_oldest_seconds=figures.outbox.oldest_seconds,
        outbox_parked=figures.outbox.parked,
        rejections=[views.ReasonCountView(**item.__dict__) for item in figures.rejections],
        dead_letters=groups,
        dead_lettered=[views.ReasonCountView(**item.__dict__) for item in figures.dead_letters],
        policies=[views.PolicyView(**item.__dict__,
                                   invoices_at_cap=figures.invoices_at_cap.get(
                                       item.trigger_type, 0))
                  for item in figures.policies],
        refunds_pending=figures.pending_refunds.count,
        refund_oldest_pending_seconds=figures.pending_refunds.oldest_seconds,
        last_verify=views.VerifyRunView(
            started_at=last.started_at, finished_at=last.finished_at,
            violations=last.violations, invariants=list(last.invariants), ran_by=last.ran_by)
        if last is not None else None)

