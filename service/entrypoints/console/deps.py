"""What every console route gets: :class:`ConsoleDeps`, and the FastAPI dependencies
``viewer``, ``operator``, ``csrf_checked`` and ``write_limited`` (each returns the
:class:`~.auth.User`).

The middleware of :mod:`.app` has already resolved the user (or answered 401 / a
redirect to /login) and checked the CSRF token of every POST from a session or a
proxy before any of these runs; they add the role and the rate limit, and audit
each refusal (docs/security.md).
"""

from __future__ import annotations

import collections
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import structlog
from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from service.adapters import console_audit
from service.adapters.kafka_producer import KafkaProducer
from service.entrypoints.console.auth import Authenticator, User, needs_csrf
from service.settings import Settings

log = structlog.get_logger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"


class ConsoleRefusal(Exception):
    """An answer other than success: ``{"error": {"code", "message", "field"?}}`` on the API.

    :mod:`.errors` (``ConsoleError``) may subclass it; the app answers any exception
    with these four attributes the same way.
    """

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


class ConsoleMetrics:
    """The console's own ``/metrics`` (its own registry, its own process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "creditnotes_console_requests", "Console and API requests, by route and status",
            ["route", "status"], registry=self.registry)
        self.request_seconds = Histogram(
            "creditnotes_console_request_seconds", "Console and API request time, by route",
            ["route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.commands_published = Counter(
            "creditnotes_console_commands_published",
            "Commands the console published on credit-note-commands, by type",
            ["type"], registry=self.registry)
        self.audit_rows = Counter(
            "creditnotes_console_audit_rows",
            "Rows the console wrote to console_audit itself, by outcome (refused, signed_in;"
            " the API's commands count theirs)",
            ["outcome"], registry=self.registry)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


#: Keys (users, addresses) a limiter holds before it forgets those idle for a minute.
MAX_TRACKED_KEYS = 10_000


@dataclass
class RateLimiter:
    """At most ``per_minute`` events per key in any 60 s (a sliding window, in memory:
    per process, so N replicas allow N times as much)."""

    per_minute: int
    _events: dict[str, collections.deque[float]] = field(default_factory=dict)
    _refused_since: set[str] = field(default_factory=set)

    def check(self, key: str, now: float) -> tuple[bool, int, bool]:
        """(allowed, seconds until allowed, first refusal since the last allowed)."""
        if len(self._events) > MAX_TRACKED_KEYS:  # many addresses trying to sign in
            self.forget_idle(now)
        window = self._events.setdefault(key, collections.deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) < self.per_minute:
            window.append(now)
            self._refused_since.discard(key)
            return True, 0, False
        first = key not in self._refused_since
        self._refused_since.add(key)
        # whole seconds, one more than the window needs (floats err at its edge either way):
        # a client that waits exactly this long is let in
        wait = window[0] + 60 - now
        return False, max(1, math.ceil(wait - 1e-6) + 1), first

    def forget_idle(self, now: float) -> None:
        for key in [key for key, window in self._events.items()
                    if not window or window[-1] <= now - 60]:
            del self._events[key]
            self._refused_since.discard(key)


@dataclass(frozen=True)
class Attempt:
    """Who tried what: an audit row before its outcome."""

    actor: str
    role: str
    via: str
    action: str
    target: str | None = None
    idempotency_key: str | None = None
    request_digest: str | None = None


@dataclass
class AuditLog:
    """Rows of :mod:`service.adapters.console_audit` written by the console itself
    (refusals, sign-ins), counted in the metrics."""

    pool: asyncpg.Pool
    metrics: ConsoleMetrics
    limiter: RateLimiter | None = None
    clock: Callable[[], float] = time.time

    async def refuse(self, attempt: Attempt, code: str) -> int | None:
        """Audit a refusal (outcome ``refused:<code>``); None, logged only, past a user's
        rate of audited refusals, so a flood of refused requests cannot fill the table."""
        log.info("console write refused", actor=attempt.actor, via=attempt.via,
                 action=attempt.action, target=attempt.target, code=code)
        if self.limiter is not None and not self.limiter.check(
                f"audit:{attempt.actor}", self.clock())[0]:
            return None
        return await self.record(attempt, console_audit.REFUSED + code)

    async def record(self, attempt: Attempt, outcome: str) -> int:
        """A row written with its outcome (a refusal, a sign-in)."""
        row_id = await console_audit.begin(
            self.pool, actor=attempt.actor, role=attempt.role, via=attempt.via,
            action=attempt.action, target=attempt.target,
            idempotency_key=attempt.idempotency_key, request_digest=attempt.request_digest,
            outcome=outcome)
        self.metrics.audit_rows.labels(outcome.split(":", 1)[0]).inc()
        return row_id


@dataclass
class ConsoleDeps:
    settings: Settings
    pool: asyncpg.Pool
    producer: KafkaProducer
    auth: Authenticator
    metrics: ConsoleMetrics = field(default_factory=ConsoleMetrics)
    limiter: RateLimiter | None = None
    #: Seconds (``time.time``): session expiry and the rate limits read it.
    clock: Callable[[], float] = time.time
    audit: AuditLog = field(init=False)

    def __post_init__(self) -> None:
        if self.limiter is None:
            self.limiter = RateLimiter(self.settings.console_write_rate_per_minute)
        self.audit = AuditLog(self.pool, self.metrics, self.limiter, self.clock)

    @property
    def rate_limiter(self) -> RateLimiter:
        assert self.limiter is not None
        return self.limiter


def get_deps(request: Request) -> ConsoleDeps:
    deps: ConsoleDeps = request.app.state.deps
    return deps


def describe(request: Request) -> tuple[str, str]:
    """The action (the route's name) and target (its path parameters) of a request."""
    route = request.scope.get("route")
    action = getattr(route, "name", None) or f"{request.method} {request.url.path}"
    target = ",".join(f"{name}={value}" for name, value in sorted(request.path_params.items()))
    return action, target


def idempotency_key_of(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` if it is one (1-200 printable ASCII), else None."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None or not 1 <= len(key) <= 200 or not all(" " <= c <= "~" for c in key):
        return None
    return key


async def attempt_of(request: Request, user: User) -> Attempt:
    """What a refused write tried: the route, its target, its key, a digest of its body."""
    action, target = describe(request)
    body = await request.body()
    return Attempt(user.name, user.role, user.via, action, target, idempotency_key_of(request),
                   hashlib.sha256(body).hexdigest() if body else None)


async def refuse(request: Request, user: User, refusal: ConsoleRefusal) -> ConsoleRefusal:
    """Audit a refused write and return the refusal to raise."""
    deps = get_deps(request)
    await deps.audit.refuse(await attempt_of(request, user), refusal.code)
    return refusal


def unauthenticated() -> ConsoleRefusal:
    return ConsoleRefusal(401, "unauthenticated",
                          "sign in: a Bearer token, a session (POST /login) or a trusted proxy",
                          headers={"WWW-Authenticate": 'Bearer realm="creditnotes console"'})


def viewer(request: Request) -> User:
    """Any signed-in user (the middleware refused everyone else already)."""
    user: User | None = getattr(request.state, "user", None)
    if user is None:
        raise unauthenticated()
    return user


async def operator(request: Request, user: Annotated[User, Depends(viewer)]) -> User:
    """A user with the operator role; a viewer gets 403 ``forbidden``, audited."""
    if not user.is_operator:
        raise await refuse(request, user, ConsoleRefusal(
            403, "forbidden", f"{user.name} is a viewer: only an operator may do this"))
    return user


def csrf_checked(request: Request, user: Annotated[User, Depends(viewer)]) -> User:
    """The user of a POST whose CSRF token was checked (by the middleware, for every
    POST from a session or a proxy; a Bearer request needs none)."""
    if request.method not in ("GET", "HEAD", "OPTIONS") and needs_csrf(user) and not getattr(
            request.state, "csrf_checked", False):
        raise ConsoleRefusal(403, "csrf_failed", "this request carries no valid CSRF token")
    return user


async def write_limited(request: Request, user: Annotated[User, Depends(operator)],
                        _: Annotated[User, Depends(csrf_checked)]) -> User:
    """An operator's write within ``console_write_rate_per_minute``; beyond it 429
    ``rate_limited`` with ``Retry-After`` (the first refusal of a burst is audited)."""
    deps = get_deps(request)
    allowed, retry_after, first = deps.rate_limiter.check(f"user:{user.name}", deps.clock())
    if not allowed:
        refusal = ConsoleRefusal(
            429, "rate_limited",
            f"more than {deps.settings.console_write_rate_per_minute} writes a minute; "
            f"try again in {retry_after} s", headers={"Retry-After": str(retry_after)})
        if first:
            raise await refuse(request, user, refusal)
        raise refusal
    return user


#: Route parameter types: ``user: Viewer``, ``user: Operator``, ``user: Writer``.
Viewer = Annotated[User, Depends(viewer)]
Operator = Annotated[User, Depends(operator)]
CsrfChecked = Annotated[User, Depends(csrf_checked)]
Writer = Annotated[User, Depends(write_limited)]
Deps = Annotated[ConsoleDeps, Depends(get_deps)]


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}


#: The console's templates (:mod:`.pages` renders with the same environment).
TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
templates = Jinja2Templates(directory=str(TEMPLATES_DIR))


def csrf_token(request: Request) -> str:
    """The CSRF token a page puts in its forms (field ``csrf_token``) and its fetches
    (header ``X-CSRF-Token``); "" for a Bearer user, who needs none."""
    user: User | None = getattr(request.state, "user", None)
    if user is None or not needs_csrf(user):
        return ""
    return get_deps(request).auth.csrf_token(user)
