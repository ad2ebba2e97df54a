"""The console's HTML pages: server-rendered, one per screen, working without JavaScript.

Every page reads and writes through :mod:`.actions` only (the same calls the JSON API
makes), so a page can do nothing the API could not. Forms POST with the session's
CSRF token and, for writes, an idempotency key made when the form was drawn: a
double submit sends one command. ``static/console.js`` adds the live preview.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import FormData

from service.domain.credit_note import Reason
from service.entrypoints import dlq
from service.entrypoints.console import actions
from service.entrypoints.console.auth import User
from service.entrypoints.console.deps import (
    ConsoleDeps,
    ConsoleRefusal,
    Deps,
    Viewer,
    Writer,
    csrf_token,
    templates,
)
from service.entrypoints.console.errors import ConsoleError
from service.entrypoints.console.views import (
    CommandResult,
    CreditNoteView,
    DeadLetterView,
    FlowHealth,
    InvoiceView,
    ReplayVerdict,
)
from service.entrypoints.display import exponent, money

router = APIRouter(include_in_schema=False)
#: What the actions and the route dependencies refuse with (both: status, code, message, field).
Refusal = (ConsoleRefusal, ConsoleError)
REASONS = [reason.value for reason in Reason]


# --------------------------------------------------------------------------- formatting


def _when(moment: datetime | None) -> str:
    return "" if moment is None else f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _duration(seconds: float | None) -> str:
    """``42 s``, ``5 min``, ``3 h 10 min``, ``2 d 4 h``: how old, for a person."""
    if seconds is None:
        return ""
    whole = int(seconds)
    if whole < 120:
        return f"{whole} s"
    minutes = whole // 60
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h {minutes % 60} min"
    return f"{hours // 24} d {hours % 24} h"


templates.env.filters["money"] = lambda amount, currency: money(amount, currency)
templates.env.filters["when"] = _when
templates.env.filters["duration"] = _duration
templates.env.globals["new_key"] = lambda: secrets.token_urlsafe(18)


def render(request: Request, deps: ConsoleDeps, user: User, name: str, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {
        "user": user, "csrf": csrf_token(request), "can_write": user.is_operator,
        **context}, status_code=status_code)


def refusal_page(request: Request, deps: ConsoleDeps, user: User,
                 refusal: ConsoleRefusal | ConsoleError, title: str,
                 **context: Any) -> HTMLResponse:
    """A request the console refused before sending anything: its code and message."""
    return render(request, deps, user, "outcome.html", refusal.status, title=title,
                  result={"status": "error", "reason": refusal.code, "message": refusal.message,
                          "field": refusal.field}, **context)


def error_page(request: Request, deps: ConsoleDeps, user: User,
               refusal: ConsoleRefusal | ConsoleError) -> HTMLResponse:
    """A page that cannot be shown (nothing with that id, the broker unreadable)."""
    return render(request, deps, user, "error.html", refusal.status, status=refusal.status,
                  code=refusal.code, message=refusal.message, field=refusal.field)


# --------------------------------------------------------------------------- search


@router.get("/", response_class=HTMLResponse)
async def home(request: Request, deps: Deps, user: Viewer) -> HTMLResponse:
    recent = await actions.list_credit_notes(deps.pool, actions.NoteFilters(), None, 10)
    return render(request, deps, user, "home.html", q=None, notes=[], recent=recent.items)


@router.get("/search", response_class=HTMLResponse)
async def search(request: Request, deps: Deps, user: Viewer, q: str = "") -> Response:
    """An invoice id opens the invoice; a credit note id or number opens the note; a
    customer id lists the customer's credit notes."""
    wanted = q.strip()[:255]
    if not wanted:
        return RedirectResponse("/", status_code=303)
    if await actions.invoice_view(deps.pool, wanted) is not None:
        return RedirectResponse(request.url_for("invoice_page", invoice_id=wanted),
                                status_code=303)
    note = await actions.credit_note_view(deps.pool, wanted)
    if note is not None:
        return RedirectResponse(request.url_for("credit_note_page", credit_note_id=note.id),
                                status_code=303)
    notes = await actions.list_credit_notes(deps.pool, actions.NoteFilters(customer_id=wanted),
                                            None, 100)
    return render(request, deps, user, "home.html", 200 if notes.items else 404,
                  q=wanted, notes=notes.items, recent=[])


# --------------------------------------------------------------------------- invoice


@dataclass(frozen=True)
class Moment:
    """One entry of an invoice's timeline."""

    at: datetime | None
    text: str
    href: str | None = None
    state: str | None = None
    bad: bool = False


def timeline(view: InvoiceView, dead_letters: list[DeadLetterView]) -> list[Moment]:
    """What came in (the credit notes' triggers, refund outcomes), what went out (the
    events, with their outbox state) and what was dead-lettered, oldest first."""
    currency = view.currency
    moments = []
    if view.received_at is not None:
        moments.append(Moment(view.received_at, f"in: invoice {view.number} for "
                                                f"{money(view.total, currency)} received"))
    for payment in view.payments:
        if payment.received_at is not None:
            source = payment.trigger_source
            moments.append(Moment(payment.received_at, f"in: payment {payment.label} of "
                                                       f"{money(payment.amount, currency)}"
                                                       + (f" from {source}" if source else "")))
    for note in view.credit_notes:
        href = f"/credit-notes/{quote(note.id, safe='')}"
        moments.append(Moment(note.effective_at, (
            f"in: {note.trigger.type} from {note.trigger.source} (id {note.trigger.id}): credit note "
            f"{note.number}, {money(note.total, currency)}, reason {note.reason}"), href,
            note.status))
    for refund in view.refunds:
        if refund.settled_at is not None:
            moments.append(Moment(refund.settled_at, (
                f"refund {refund.refund_id} of {money(refund.amount, currency)} "
                f"{refund.status}"), None, refund.status, refund.status == "failed"))
    for event in view.events:
        moments.append(Moment(event.created_at, f"out: {event.type} on {event.topic}", None,
                              event.state, event.state in ("parked", "held")))
    for letter in dead_letters:
        moments.append(Moment(
            letter.failed_at, f"dead-lettered on {letter.topic}: {letter.reason}",
            f"/dead-letters/{quote(letter.topic, safe='')}/{letter.partition}/{letter.offset}",
            "dead_lettered",
            True))
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(moments, key=lambda moment: moment.at or far)


class FormProblem(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def minor_units(text: str, currency: str, field: str) -> int | None:
    """``"12.5"`` in USD -> 1250; empty -> None. Mirrors ``minorUnits`` in console.js."""
    cleaned = text.strip().replace(",", "")
    if not cleaned:
        return None
    places = exponent(currency)
    whole, _, fraction = cleaned.partition(".")
    if (not whole.isascii() or not whole.isdigit() or len(whole) > 16
            or (fraction and (not fraction.isascii() or not fraction.isdigit()))
            or len(fraction) > places or cleaned.endswith(".")):
        raise FormProblem(field, f"not an amount with at most {places} decimals")
    return int(whole + fraction.ljust(places, "0"))


def whole_number(text: str, field: str) -> int | None:
    cleaned = text.strip()
    if not cleaned:
        return None
    if not cleaned.isascii() or not cleaned.isdigit() or len(cleaned) > 9:
        raise FormProblem(field, "not a whole number")
    return int(cleaned)


def issue_data(form: FormData, currency: str) -> dict[str, Any]:
    """The ``credit_note.issue`` data of the issue form (without ``invoice_id``); the
    same as ``issueData`` in console.js builds for the live preview."""
    def value(name: str) -> str:
        found = form.get(name)
        return found if isinstance(found, str) else ""

    data: dict[str, Any] = {"reason": value("reason") or "other"}
    if value("memo"):
        data["memo"] = value("memo")
    if value("mode") == "amount":
        amount = minor_units(value("amount"), currency, "amount")
        if amount is None:
            raise FormProblem("amount", "enter an amount")
        data["amount"] = amount
    else:
        lines = []
        index = 0
        while f"line-{index}-id" in form:
            line_id = value(f"line-{index}-id")
            quantity = whole_number(value(f"line-{index}-quantity"), f"line-{index}-quantity")
            amount = minor_units(value(f"line-{index}-amount"), currency, f"line-{index}-amount")
            if quantity is not None and amount is not None:
                raise FormProblem(f"line-{index}-quantity", "give a quantity or an amount, not both")
            if quantity:
                lines.append({"type": "invoice_line_item", "invoice_line_id": line_id,
                              "quantity": quantity})
            elif amount:
                lines.append({"type": "invoice_line_item", "invoice_line_id": line_id,
                              "amount": amount})
            index += 1
        if not lines:
            raise FormProblem("lines", "choose a quantity or an amount on at least one line")
        data["lines"] = lines
    for name in ("refund_amount", "credit_amount", "out_of_band_amount"):
        amount = minor_units(value(name), currency, name)
        if amount is not None:
            data[name] = amount
    return data


async def _invoice(deps: ConsoleDeps, invoice_id: str) -> InvoiceView:
    view = await actions.invoice_view(deps.pool, invoice_id)
    if view is None:
        raise ConsoleRefusal(404, "invoice_not_found", f"no invoice {invoice_id!r}")
    return view


async def _invoice_page(request: Request, deps: ConsoleDeps, user: User, view: InvoiceView,
                        status: int = 200, **context: Any) -> HTMLResponse:
    """The invoice page; its dead letters come from the broker (unknown if it cannot be
    read: said so, the page still shows)."""
    context.setdefault("form", {})
    context.setdefault("preview", None)
    try:
        letters, read = await actions.dead_letters_for_key(deps.settings, view.id), True
    except Refusal:
        letters, read = [], False
    return render(request, deps, user, "invoice.html", status, view=view,
                  timeline=timeline(view, letters), dead_letters=letters,
                  dead_letters_read=read, reasons=REASONS, exponent=exponent(view.currency),
                  **context)


@router.get("/invoices/{invoice_id:path}", response_class=HTMLResponse, name="invoice_page")
async def invoice_page(request: Request, deps: Deps, user: Viewer,
                       invoice_id: str) -> HTMLResponse:
    try:
        view = await _invoice(deps, invoice_id)
    except Refusal as refusal:
        return error_page(request, deps, user, refusal)
    return await _invoice_page(request, deps, user, view)


@router.post("/invoices/{invoice_id:path}/preview", response_class=HTMLResponse)
async def invoice_preview(request: Request, deps: Deps, user: Viewer,
                          invoice_id: str) -> HTMLResponse:
    """The preview without JavaScript: the invoice page again, with the form as it was
    filled and what issuing it would do now."""
    form = await request.form()
    try:
        view = await _invoice(deps, invoice_id)
    except Refusal as refusal:
        return refusal_page(request, deps, user, refusal, f"Invoice {invoice_id}")
    filled = {name: value for name, value in form.items() if isinstance(value, str)}
    key = _key(form) or None  # kept on the form drawn again: Issue sends what was previewed
    try:
        data = issue_data(form, view.currency)
        preview = await actions.preview(deps.pool, invoice_id, data, settings=deps.settings,
                                        user=user, key=key)
    except FormProblem as problem:
        return await _invoice_page(request, deps, user, view, 422, form=filled, form_key=key,
                                   form_error=f"{problem.field}: {problem.message}")
    except Refusal as refusal:
        return await _invoice_page(request, deps, user, view, refusal.status, form=filled,
                                   form_key=key, form_error=f"{refusal.code}: {refusal.message}"
                                   + (f" ({refusal.field})" if refusal.field else ""))
    return await _invoice_page(request, deps, user, view, form=filled, form_key=key,
                               preview=preview)


def _key(form: FormData) -> str:
    key = form.get("idempotency_key")
    return key if isinstance(key, str) else ""


@router.post("/invoices/{invoice_id:path}/issue", response_class=HTMLResponse)
async def invoice_issue(request: Request, deps: Deps, user: Writer,
                        invoice_id: str) -> HTMLResponse:
    form = await request.form()
    title = f"Issue a credit note on {invoice_id}"
    try:
        view = await _invoice(deps, invoice_id)
        data = issue_data(form, view.currency)
        result = await actions.issue(deps, user, _key(form), {"invoice_id": invoice_id, **data})
    except FormProblem as problem:
        return refusal_page(request, deps, user, ConsoleRefusal(
            422, "invalid_request", problem.message, problem.field), title,
            invoice_id=invoice_id)
    except Refusal as refusal:
        return refusal_page(request, deps, user, refusal, title, invoice_id=invoice_id)
    return _outcome(request, deps, user, result, title, invoice_id=invoice_id)


def _outcome(request: Request, deps: ConsoleDeps, user: User, result: CommandResult,
             title: str, **context: Any) -> HTMLResponse:
    return render(request, deps, user, "outcome.html", 202 if result.status == "pending" else 200,
                  title=title, result=result, key=result.key, **context)


@router.get("/commands/{key}", response_class=HTMLResponse)
async def command_page(request: Request, deps: Deps, user: Viewer, key: str) -> HTMLResponse:
    """A command's outcome, again (the refresh link of a pending one)."""
    try:
        result = await actions.command_status(deps, user, key)
    except Refusal as refusal:
        return refusal_page(request, deps, user, refusal, "Command")
    note = result.credit_note
    return _outcome(request, deps, user, result, "Command",
                    invoice_id=note.invoice_id if note else None)


# --------------------------------------------------------------------------- credit note


async def _note(deps: ConsoleDeps, credit_note_id: str) -> CreditNoteView:
    view = await actions.credit_note_view(deps.pool, credit_note_id)
    if view is None:
        raise ConsoleRefusal(404, "credit_note_not_found", f"no credit note {credit_note_id!r}")
    return view


@router.get("/credit-notes/{credit_note_id}", response_class=HTMLResponse,
            name="credit_note_page")
async def credit_note_page(request: Request, deps: Deps, user: Viewer,
                           credit_note_id: str) -> HTMLResponse:
    try:
        view = await _note(deps, credit_note_id)
    except Refusal as refusal:
        return error_page(request, deps, user, refusal)
    return render(request, deps, user, "credit_note.html", view=view)


@router.post("/credit-notes/{credit_note_id}/void", response_class=HTMLResponse)
async def credit_note_void(request: Request, deps: Deps, user: Writer,
                           credit_note_id: str) -> HTMLResponse:
    form = await request.form()
    title = f"Void credit note {credit_note_id}"
    try:
        view = await _note(deps, credit_note_id)
        result = await actions.void(deps, user, _key(form), view.id)
    except Refusal as refusal:
        return refusal_page(request, deps, user, refusal, title, note_id=credit_note_id)
    return _outcome(request, deps, user, result, f"Void credit note {view.number}",
                    invoice_id=view.invoice_id, note_id=view.id)


def metadata_changes(text: str) -> dict[str, str | None]:
    """``key=value`` per line sets a key, ``key=`` removes it; blank lines are skipped."""
    changes: dict[str, str | None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, equals, value = line.partition("=")
        if not equals or not name.strip():
            raise FormProblem("metadata", f"line {number} is not key=value")
        changes[name.strip()] = value.strip() or None
    return changes


@router.post("/credit-notes/{credit_note_id}/update", response_class=HTMLResponse)
async def credit_note_update(request: Request, deps: Deps, user: Writer,
                             credit_note_id: str) -> HTMLResponse:
    form = await request.form()
    title = f"Edit credit note {credit_note_id}"
    memo_field, metadata_field = form.get("memo"), form.get("metadata")
    try:
        view = await _note(deps, credit_note_id)
        changes: dict[str, Any] = {}
        if isinstance(memo_field, str) and (memo_field or None) != view.memo:
            changes["memo"] = memo_field or None
        metadata = metadata_changes(metadata_field if isinstance(metadata_field, str) else "")
        if metadata:
            changes["metadata"] = metadata
        if not changes:
            raise FormProblem("memo", "nothing to change: edit the memo or give metadata")
        result = await actions.update(deps, user, _key(form), view.id, changes)
    except FormProblem as problem:
        return refusal_page(request, deps, user, ConsoleRefusal(
            422, "invalid_request", problem.message, problem.field), title,
            note_id=credit_note_id)
    except Refusal as refusal:
        return refusal_page(request, deps, user, refusal, title, note_id=credit_note_id)
    return _outcome(request, deps, user, result, f"Edit credit note {view.number}",
                    invoice_id=view.invoice_id, note_id=view.id)


# --------------------------------------------------------------------------- dead letters


@router.get("/dead-letters", response_class=HTMLResponse)
async def dead_letter_inbox(request: Request, deps: Deps, user: Viewer) -> HTMLResponse:
    groups = await actions.dead_letter_groups(deps.settings)
    history = await actions.replay_history(deps.pool, 20)
    return render(request, deps, user, "dead_letters.html", groups=groups, history=history)


@router.get("/dead-letters/{topic}", response_class=HTMLResponse)
async def dead_letter_list(request: Request, deps: Deps, user: Viewer, topic: str,
                           reason: str = "", key: str = "", after: str = "") -> HTMLResponse:
    try:
        if len(reason) > 200 or len(key) > 1000:
            raise ConsoleRefusal(422, "invalid_request", "reason is at most 200 characters, "
                                 "key at most 1000", "reason" if len(reason) > 200 else "key")
        filters = actions.DeadLetterFilters(reason=reason or None, key=key or None)
        page = await actions.dead_letters(deps.settings, topic, filters, after or None, 100)
    except Refusal as refusal:
        return error_page(request, deps, user, refusal)
    return render(request, deps, user, "dead_letter_list.html", topic=topic, reason=reason,
                  key=key, page=page)


@dataclass(frozen=True)
class PayloadLine:
    text: str
    failing: bool = False


def payload_lines(letter: DeadLetterView) -> list[PayloadLine]:
    """The payload, indented, with the line of the failing field marked (when the error
    names one and the payload is JSON)."""
    if letter.payload_json is None:
        return [PayloadLine(letter.payload or "")]
    text = json.dumps(letter.payload_json, indent=2, ensure_ascii=True)
    path = (letter.failing_field or "").split(".")
    lines = text.splitlines()
    marked = _failing_line(lines, path) if letter.failing_field else None
    return [PayloadLine(dlq.shown(line), index == marked) for index, line in enumerate(lines)]


def _failing_line(lines: list[str], path: list[str]) -> int | None:
    """The index of the line holding the deepest key of ``path`` (``lines.0.quantity``)
    found by following its names in order; numbers (list positions) and names the
    payload lacks (a union's tag, ``invoice_line_item``) are skipped."""
    start = 0
    found = None
    for name in path:
        if name.isdigit():
            continue
        key = json.dumps(name) + ":"
        for index in range(start, len(lines)):
            if lines[index].lstrip().startswith(key):
                found, start = index, index + 1
                break
    return found


@router.get("/dead-letters/{topic}/{partition}/{offset}", response_class=HTMLResponse)
async def dead_letter_page(request: Request, deps: Deps, user: Viewer, topic: str,
                           partition: int, offset: int) -> HTMLResponse:
    try:
        letter = await actions.dead_letter(deps.settings, topic, partition, offset)
    except Refusal as refusal:
        return error_page(request, deps, user, refusal)
    if letter is None:
        return error_page(request, deps, user, ConsoleRefusal(
            404, "dead_letter_not_found", f"no dead letter at {partition}:{offset} of {topic}"))
    return render(request, deps, user, "dead_letter.html", letter=letter,
                  payload=payload_lines(letter))


def _positions(values: list[str]) -> list[tuple[int, int]]:
    found = []
    for value in values:
        partition, colon, offset = value.partition(":")
        if not colon or not partition.isdigit() or not offset.isdigit():
            raise ConsoleRefusal(400, "invalid_request", f"not a record position: {value!r}",
                                 "selected")
        found.append((int(partition), int(offset)))
    return found


@router.post("/dead-letters/{topic}/replay", response_class=HTMLResponse)
async def dead_letter_replay(request: Request, deps: Deps, user: Writer,
                             topic: str) -> HTMLResponse:
    """A dry run (the verdict per record, nothing sent) with a button to confirm, or the
    replay itself: the same code as ``creditnotes dlq replay``."""
    form = await request.form()
    dry_run = form.get("dry_run") != "0"
    scope = "matching" if form.get("scope") == "matching" else "selected"
    reason = form.get("reason") if isinstance(form.get("reason"), str) else ""
    key = form.get("key") if isinstance(form.get("key"), str) else ""
    selected = [value for value in form.getlist("selected") if isinstance(value, str)]
    title = f"Replay from {topic}"
    try:
        positions = _positions(selected) if scope == "selected" else None
        if scope == "selected" and not positions:
            raise ConsoleRefusal(400, "invalid_request", "select at least one record",
                                 "selected")
        selection = {  # checked, and a refusal audited, by actions.replay
            "positions": [f"{partition}:{offset}" for partition, offset in positions or ()]
            if scope == "selected" else None, "all_matching": scope == "matching",
            "filters": {"reason": str(reason) or None, "key": str(key) or None},
            "dry_run": dry_run}
        result = await actions.replay(deps, user, topic, selection)
    except Refusal as refusal:
        return refusal_page(request, deps, user, refusal, title)
    sent = await _what_would_go(deps, topic, result.verdicts) if dry_run else []
    return render(request, deps, user, "replay.html", topic=topic, result=result,
                  dry_run=dry_run, scope=scope, reason=reason, key=key, selected=selected,
                  sent=sent)


@dataclass(frozen=True)
class Resend:
    """A record a replay would send: where it goes back to, and what it says."""

    position: str
    to: str
    key: str
    event: str
    data: str


#: The most records a dry run's page shows in full (the verdict lines name them all).
SHOWN_RESENDS = 10


async def _what_would_go(deps: ConsoleDeps, topic: str,
                         verdicts: list[ReplayVerdict]) -> list[Resend]:
    """The records a dry run would replay, read again: their type, id, source and data,
    so the confirmation shows what goes back, not only where."""
    shown: list[Resend] = []
    for verdict in verdicts:
        if not verdict.verdict.startswith("would replay") or len(shown) == SHOWN_RESENDS:
            continue
        partition, _, offset = verdict.position.partition(":")
        if not (partition.isdigit() and offset.isdigit()):
            continue
        try:
            letter = await actions.dead_letter(deps.settings, topic, int(partition), int(offset))
        except Refusal:
            continue
        if letter is None:
            continue
        event = letter.payload_json if isinstance(letter.payload_json, dict) else {}
        data = event.get("data")
        shown.append(Resend(
            verdict.position, dlq.input_topic_of(topic) if topic.endswith(dlq.DLQ_SUFFIX)
            else topic, letter.key,
            dlq.shown(f"{event.get('type', '?')} id {event.get('id', '?')} from "
                      f"{event.get('source', '?')}"),
            "\n".join(dlq.shown(line) for line in json.dumps(
                data, indent=2, ensure_ascii=True).splitlines()) if data is not None
            else letter.payload or ""))
    return shown


# --------------------------------------------------------------------------- health


@dataclass(frozen=True)
class Figure:
    label: str
    value: str
    note: str | None = None


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    empty: str


def health_figures(health: FlowHealth) -> tuple[list[Figure], list[Table]]:
    verify = health.last_verify
    figures = [
        Figure("Consumer lag (records not yet read)",
               "unknown" if health.lag_total is None else str(health.lag_total),
               health.lag_error or f"group {health.consumer_group}"),
        Figure("Events waiting to go out", str(health.outbox_backlog),
               f"oldest {_duration(health.outbox_oldest_seconds)}"
               if health.outbox_backlog else None),
        Figure("Parked events (the broker refused them)", str(health.outbox_parked),
               "see docs/operations.md: creditnotes outbox" if health.outbox_parked else None),
        Figure("Refunds pending", str(health.refunds_pending),
               f"oldest {_duration(health.refund_oldest_pending_seconds)}"
               if health.refunds_pending else None),
        Figure("Last verify", "never run" if verify is None else (
            "clean" if verify.violations == 0 else f"{verify.violations} violations"),
            None if verify is None else f"{_when(verify.finished_at)} by {verify.ran_by}"
            + (f": {', '.join(verify.invariants)}" if verify.invariants else "")),
    ]
    tables = [
        Table("Consumer lag by input topic",
              ["Topic", "Partitions", "Records not yet read", "Partitions behind (partition: lag)"],
              _lag_by_topic(health), health.lag_error or "No partitions."),
        Table("Rejections by reason", ["Topic", "Reason", "Count", "Last"],
              [[row.topic, row.reason, str(row.count), _when(row.last_at)]
               for row in health.rejections], "No rejections."),
        Table("Dead letters waiting, by reason (on the broker)",
              ["Topic", "Reason", "Count", "Oldest", "Age"],
              [[group.topic, group.reason, str(group.count), _when(group.oldest_failed_at),
                _duration(group.oldest_age_seconds)] for group in health.dead_letters or ()],
              "No dead letters." if health.dead_letters is not None
              else "Unknown: the broker cannot be read."),
        Table("Dead-lettered by the service, by reason (its ledger)",
              ["Topic", "Reason", "Count", "Last"],
              [[row.topic, row.reason, str(row.count), _when(row.last_at)]
               for row in health.dead_lettered], "None."),
        Table("Triggers and their policy caps",
              ["Trigger", "Policy", "Credit notes", "Total (minor units)", "Invoices at the cap"],
              [[row.trigger_type, row.policy, str(row.credit_notes), str(row.total),
                str(row.invoices_at_cap)] for row in health.policies],
              "No credit notes from triggers yet."),
    ]
    return figures, tables


def _lag_by_topic(health: FlowHealth) -> list[list[str]]:
    """One row per input topic (a topic has many partitions): its total lag, and only the
    partitions that are behind."""
    topics: dict[str, list[tuple[int, int]]] = {}
    for lag in health.lag:
        topics.setdefault(lag.topic, []).append((lag.partition, lag.lag))
    return [[topic, str(len(parts)), str(sum(lag for _, lag in parts)),
             ", ".join(f"{partition}: {lag}" for partition, lag in parts if lag) or "none"]
            for topic, parts in topics.items()]


@router.get("/health", response_class=HTMLResponse)
async def health_page(request: Request, deps: Deps, user: Viewer) -> HTMLResponse:
    figures, tables = health_figures(await actions.flow_health(deps))
    return render(request, deps, user, "health.html", figures=figures, tables=tables)
