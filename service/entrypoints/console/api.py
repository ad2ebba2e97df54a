"""The console's JSON API under ``/api/v1`` (docs/api.md lists every route).

Thin: each route takes its user from the dependencies of ``deps.py`` (``Viewer``
reads and previews; ``Writer`` = operator + CSRF for sessions + rate limit) and
calls :mod:`.actions`. A refusal is ``{"error": {"code", "message", "field"?}}``
(``app.py``). The write bodies are read here as JSON and checked by the service's
own wire models and translators (in ``actions``), not by FastAPI, so a body is
refused exactly as the service would dead-letter it; OpenAPI still shows the
contract's schema for each.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from service.entrypoints import wire
from service.entrypoints.console import actions
from service.entrypoints.console.deps import CsrfChecked, Deps, Viewer, Writer
from service.entrypoints.console.errors import CODES, ConsoleError, refused
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

router = APIRouter(prefix="/api/v1", tags=["console"])

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", description="1-200 letters, digits, '.', '_', ':' or '-', not "
    "'.' first (it is polled back at /api/v1/commands/{key}): the command's "
    "CloudEvents id. A retried request with the same key has one effect. Pattern: "
    + actions.KEY_PATTERN)]
OptionalKey = Annotated[str | None, Header(
    alias="Idempotency-Key", description="the key the issue will use: the preview then names "
    "the same credit note and refund ids")]
Topic = Annotated[str, Path(description="a dead-letter topic, e.g. credit-note-commands.dlq",
                            max_length=255)]


def _error_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string", "enum": sorted(CODES)},
                       "message": {"type": "string"},
                       "field": {"type": "string"}}}}}


def _answers(*codes: str) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route in OpenAPI: per status, the codes it may carry."""
    by_status: dict[int, list[str]] = {}
    for code in ("unauthenticated", *codes):
        by_status.setdefault(CODES[code][0], []).append(code)
    return {status: {"description": "refused: " + ", ".join(names),
                     "content": {"application/json": {"schema": _error_schema()}}}
            for status, names in sorted(by_status.items())}


def _inlined(model: type[BaseModel], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A wire model's JSON Schema with its ``$defs`` inlined (OpenAPI resolves a ``$ref``
    against the whole document, not the schema it sits in)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    inlined: dict[str, Any] = resolve(schema)
    for name in drop:
        inlined.get("properties", {}).pop(name, None)
        if name in inlined.get("required", []):
            inlined["required"] = [item for item in inlined["required"] if item != name]
    return inlined


def _body(model: type[BaseModel], description: str,
          drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"requestBody": {"required": True, "description": description, "content": {
        "application/json": {"schema": _inlined(model, drop)}}}}


async def _json(request: Request) -> Any:
    """The body as JSON; :class:`actions.Unreadable` if it is none (the action refuses it,
    audited). An empty body is ``None``."""
    raw = await request.body()
    try:
        return json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return actions.Unreadable()


async def _object(request: Request) -> dict[str, Any]:
    data = await _json(request)
    if isinstance(data, actions.Unreadable):
        raise refused("invalid_message", "the body is not JSON")
    if not isinstance(data, dict):
        raise refused("invalid_message", "the body is a JSON object")
    return data


def _answer(result: CommandResult) -> JSONResponse:
    """200 with the outcome, or 202 and where to poll for it."""
    if result.status == "pending":
        return JSONResponse(result.model_dump(mode="json"), status_code=202,
                            headers={"Location": result.location})
    return JSONResponse(result.model_dump(mode="json"), status_code=200)


_WRITE = ("forbidden", "csrf_failed", "rate_limited", "request_too_large",
          "idempotency_key_required", "idempotency_key_invalid", "idempotency_key_reused",
          "invalid_message", "message_too_large", "source_not_allowed", "unavailable",
          "bad_request")
_COMMAND_ANSWERS: dict[int | str, dict[str, Any]] = {
    202: {"description": "published; no outcome within CREDITNOTES_CONSOLE_WAIT_SECONDS: poll "
                         "the Location (GET /api/v1/commands/{key})",
          "headers": {"Location": {"schema": {"type": "string"}}},
          "content": {"application/json": {"schema": {
              "$ref": "#/components/schemas/CommandResult"}}}}}


# --------------------------------------------------------------------------- invoices


#: An invoice id is the upstream's and may hold '/': routed as the rest of the path.
InvoiceId = Annotated[str, Path(max_length=255, description="the upstream's invoice id, "
                                "'/' included (percent-encoded or not)")]


@router.get("/invoices/{invoice_id:path}", response_model=InvoiceView,
            responses=_answers("invoice_not_found", "invalid_request", "bad_request",
                               "unavailable"))
async def get_invoice(
        user: Viewer, deps: Deps,
        invoice_id: InvoiceId,
        dead_letters: Annotated[bool, Query(
            description="read the dead letters keyed by the invoice from the broker")] = True,
) -> InvoiceView:
    """The invoice: lines (credited and remaining), payments, credit notes, refunds and
    their statuses, events out with their outbox state, dead letters on its key."""
    view = await actions.invoice_view(deps.pool, invoice_id)
    if view is None:
        raise refused("invoice_not_found", f"no invoice {invoice_id!r}")
    if dead_letters:
        try:
            found = await actions.dead_letters_for_key(deps.settings, invoice_id)
        except ConsoleError as error:
            if error.code != "unavailable":
                raise
            return view  # the broker is down: the invoice still shows, dead_letters_read false
        view = view.model_copy(update={"dead_letters": found, "dead_letters_read": True})
    return view


@router.post("/invoices/{invoice_id:path}/preview", response_model=PreviewResult,
             responses=_answers("csrf_failed", "invalid_message", "invoice_not_found",
                                "source_not_allowed", "idempotency_key_invalid",
                                "bad_request", "unavailable"),
             openapi_extra=_body(wire.CreditNoteIssue, "a credit_note.issue's data (the "
                                 "invoice is the path's)", drop=("invoice_id",)))
async def preview(user: CsrfChecked, deps: Deps, request: Request,
                  invoice_id: InvoiceId, key: OptionalKey = None) -> PreviewResult:
    """What issuing this would do now, on the same domain code, saving nothing: the credit
    note, or the rejection code; and the most that can be credited and refunded. Viewers
    may preview."""
    data = await _object(request)
    if key is not None:
        actions.check_key(key)
    return await actions.preview(deps.pool, invoice_id, data, settings=deps.settings,
                                 user=user, key=key)


# --------------------------------------------------------------------------- credit notes


@router.get("/credit-notes", response_model=Page[CreditNoteSummary],
            responses=_answers("invalid_request", "bad_request", "unavailable"))
async def list_credit_notes(
        user: Viewer, deps: Deps,
        invoice_id: Annotated[str | None, Query(max_length=255)] = None,
        customer_id: Annotated[str | None, Query(max_length=255)] = None,
        reason: Annotated[str | None, Query(max_length=100)] = None,
        status: Annotated[str | None, Query(max_length=20)] = None,
        issued_from: Annotated[datetime | None, Query()] = None,
        issued_to: Annotated[datetime | None, Query()] = None,
        page: Annotated[str | None, Query(max_length=1000,
                                          description="the next of the previous page")] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> Page[CreditNoteSummary]:
    """Credit notes, newest first, by invoice, customer, reason, status and issue time."""
    try:
        filters = actions.NoteFilters(invoice_id=invoice_id, customer_id=customer_id,
                                      reason=reason, status=status,
                                      issued_from=issued_from, issued_to=issued_to)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise refused("invalid_request", f"{field}: {first['msg']}", field) from None
    return await actions.list_credit_notes(deps.pool, filters, page, limit)


@router.get("/credit-notes/{id_or_number}", response_model=CreditNoteView,
            responses=_answers("credit_note_not_found", "invalid_request", "bad_request",
                               "unavailable"))
async def get_credit_note(user: Viewer, deps: Deps,
                          id_or_number: Annotated[str, Path(max_length=255)]) -> CreditNoteView:
    """A credit note by id or number: lines, journal, trigger, policy, refunds, and whether
    it can be voided or edited (and why not)."""
    view = await actions.credit_note_view(deps.pool, id_or_number)
    if view is None:
        raise refused("credit_note_not_found", f"no credit note {id_or_number!r}")
    return view


@router.post("/credit-notes", response_model=CommandResult,
             responses={**_COMMAND_ANSWERS, **_answers(*_WRITE, "invoice_not_found")},
             openapi_extra=_body(wire.CreditNoteIssue, "a credit_note.issue's data"))
async def issue(user: Writer, deps: Deps, request: Request,
                key: IdempotencyKey = None) -> JSONResponse:
    """Issue: publishes ``credit_note.issue`` on credit-note-commands (id = the key, source
    = the console and the user) and answers its outcome, or 202."""
    return _answer(await actions.issue(deps, user, key, await _json(request)))


@router.post("/credit-notes/{credit_note_id}/void", response_model=CommandResult,
             responses={**_COMMAND_ANSWERS, **_answers(*_WRITE, "credit_note_not_found")})
async def void(user: Writer, deps: Deps, credit_note_id: Annotated[str, Path(max_length=255)],
               key: IdempotencyKey = None) -> JSONResponse:
    """Void: publishes ``credit_note.void`` keyed by the note's invoice; no body."""
    return _answer(await actions.void(deps, user, key, credit_note_id))


@router.post("/credit-notes/{credit_note_id}/update", response_model=CommandResult,
             responses={**_COMMAND_ANSWERS, **_answers(*_WRITE, "credit_note_not_found")},
             openapi_extra=_body(wire.CreditNoteUpdate, "memo (null clears it) and/or "
                                 "metadata (a key set to null is removed)",
                                 drop=("credit_note_id",)))
async def update(user: Writer, deps: Deps, request: Request,
                 credit_note_id: Annotated[str, Path(max_length=255)],
                 key: IdempotencyKey = None) -> JSONResponse:
    """Edit memo and metadata: publishes ``credit_note.update``."""
    return _answer(await actions.update(deps, user, key, credit_note_id, await _json(request)))


@router.get("/commands/{key}", response_model=CommandResult,
            responses=_answers("command_not_found", "idempotency_key_invalid",
                               "unavailable"))
async def command(user: Viewer, deps: Deps,
                  key: Annotated[str, Path(max_length=200)]) -> CommandResult:
    """What became of this user's command with this Idempotency-Key (``pending``: not yet;
    ``unknown``: its publish failed, it may have been sent: retry with the same key)."""
    return await actions.command_status(deps, user, key)


# --------------------------------------------------------------------------- dead letters


@router.get("/dead-letters", response_model=list[ReasonGroup],
            responses=_answers("unavailable"))
async def dead_letter_groups(user: Viewer, deps: Deps) -> list[ReasonGroup]:
    """Every dead-letter topic's dead letters grouped by reason: count, oldest, its age."""
    return await actions.dead_letter_groups(deps.settings)


@router.get("/dead-letters/{topic}", response_model=Page[DeadLetterView],
            responses=_answers("topic_not_found", "not_dead_letter_topic", "invalid_request",
                               "unavailable"))
async def dead_letters(
        user: Viewer, deps: Deps, topic: Topic,
        reason: Annotated[str | None, Query(max_length=200)] = None,
        key: Annotated[str | None, Query(max_length=1000)] = None,
        since: Annotated[datetime | None, Query(
            description="failed at or after (RFC 3339 with its offset)")] = None,
        after: Annotated[str | None, Query(
            max_length=40, description="partition:offset: the next of the previous page")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Page[DeadLetterView]:
    """A dead-letter topic's dead letters, streamed from the broker, partition by
    partition, paged by ``partition:offset``."""
    if since is not None and since.tzinfo is None:
        raise refused("invalid_request", "since needs its UTC offset", "since")
    filters = actions.DeadLetterFilters(reason=reason, key=key, since=since)
    return await actions.dead_letters(deps.settings, topic, filters, after, limit)


@router.get("/dead-letters/{topic}/{partition}/{offset}", response_model=DeadLetterView,
            responses=_answers("dead_letter_not_found", "topic_not_found",
                               "not_dead_letter_topic", "invalid_request", "unavailable"))
async def dead_letter(user: Viewer, deps: Deps, topic: Topic,
                      partition: Annotated[int, Path(ge=0, le=2**31 - 1)],
                      offset: Annotated[int, Path(ge=0, le=2**63 - 1)]) -> DeadLetterView:
    """One dead letter: its headers, payload and the failing field named."""
    found = await actions.dead_letter(deps.settings, topic, partition, offset)
    if found is None:
        raise refused("dead_letter_not_found", f"no dead letter at {partition}:{offset} of "
                      f"{topic}")
    return found


@router.post("/dead-letters/{topic}/replay", response_model=ReplayResult,
             responses=_answers("forbidden", "csrf_failed", "rate_limited", "invalid_request",
                                "topic_not_found", "not_dead_letter_topic", "unavailable"),
             openapi_extra=_body(actions.ReplaySelection, "the dead letters to replay"))
async def replay(user: Writer, deps: Deps, request: Request, topic: Topic) -> ReplayResult:
    """Replay the dead letters chosen (or all the filters match) to their own input topic,
    through the code of ``creditnotes dlq replay``; ``dry_run`` says what it would do.
    Operators only (a dry run shows payloads' verdicts too)."""
    return await actions.replay(deps, user, topic, await _json(request))


@router.get("/replays", response_model=list[ReplayRowView],
            responses=_answers("invalid_request"))
async def replays(user: Viewer, deps: Deps,
                  limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[ReplayRowView]:
    """The replay history from the audit table (the command line's and the console's)."""
    return await actions.replay_history(deps.pool, limit)


# --------------------------------------------------------------------------- health


@router.get("/health/flow", response_model=FlowHealth, responses=_answers())
async def flow_health(user: Viewer, deps: Deps) -> FlowHealth:
    """Consumer lag, outbox backlog and age, parked rows, rejections and dead letters by
    reason, policy caps reached, pending refunds, the last ``creditnotes verify``."""
    return await actions.flow_health(deps)
