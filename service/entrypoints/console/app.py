"""The console's FastAPI application: routers, middleware, probes, sign-in, errors.

Every request passes, outermost first: the secure headers (on every answer, errors
included), the metrics, the request size limit, and the gate. The gate resolves
the user (Bearer token, else a trusted proxy's header, else the session cookie) and
lets nothing but ``/healthz``, ``/readyz``, ``/login`` and ``/static/*`` through
without one (API: 401 JSON; pages: a redirect to /login). It also checks the CSRF
token of every POST from a session or a proxy, whichever route it goes to, so a
route cannot forget it. Roles and rate limits are route dependencies (:mod:`.deps`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import importlib
import importlib.util
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import asyncpg
import structlog
from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import BaseRoute, Match

from service.adapters import console_audit, migrations
from service.entrypoints.console.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    AmbiguousProxyUser,
    ProxyRefused,
    User,
    needs_csrf,
    session_cookie,
    session_key,
)
from service.entrypoints.console.deps import (
    STATIC_DIR,
    TEMPLATES_DIR,
    Attempt,
    ConsoleDeps,
    ConsoleRefusal,
    csrf_token,
    error_body,
    idempotency_key_of,
    templates,
    unauthenticated,
)

log = structlog.get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Answered without a user.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/login"})
PUBLIC_PREFIXES = ("/static/",)
#: Answered in JSON (errors too); everything else is a page.
API_PREFIX = "/api/"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURE_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
)
_SECURE_NAMES = frozenset(name for name, _ in SECURE_HEADERS)


def is_api(path: str) -> bool:
    return path.startswith(API_PREFIX) or path == "/metrics"


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


# ----------------------------------------------------------------------- the app


def create_app(deps: ConsoleDeps) -> FastAPI:
    """The console and API on ``deps`` (settings, pool, producer, metrics, limiter, clock)."""
    app = FastAPI(title="creditnotes console API", version=deps.settings.service_version,
                  docs_url=None, redoc_url=None, openapi_url="/api/v1/openapi.json",
                  redirect_slashes=False)
    app.state.deps = deps
    app.add_exception_handler(ConsoleRefusal, _refusal_handler)
    console_error = _optional("service.entrypoints.console.errors", "ConsoleError")
    if isinstance(console_error, type) and issubclass(console_error, Exception) \
            and not issubclass(console_error, ConsoleRefusal):
        app.add_exception_handler(console_error, _refusal_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_handler)  # type: ignore[arg-type]
    for unreachable in UNREACHABLE:
        app.add_exception_handler(unreachable, _unreachable_handler)
    app.include_router(_own_routes())
    for module in ("service.entrypoints.console.api", "service.entrypoints.console.pages"):
        router = _optional(module, "router")
        if isinstance(router, APIRouter):
            app.include_router(router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # added innermost first: the gate runs last, the secure headers first
    app.add_middleware(Gate)
    app.add_middleware(BodyLimit, limit=deps.settings.max_message_bytes)
    app.add_middleware(Measured)
    app.add_middleware(SecureHeaders)
    return app


def _optional(module: str, name: str) -> object:
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(importlib.import_module(module), name, None)


def _deps(request: Request) -> ConsoleDeps:
    deps: ConsoleDeps = request.app.state.deps
    return deps


def _own_routes() -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """PostgreSQL answers, with every migration applied (the audit table among them)."""
        deps = _deps(request)

        async def pending() -> list[str]:
            async with deps.pool.acquire() as connection:
                return list(await migrations.pending(connection, deps.settings.migrations_dir))
        try:
            waiting = await asyncio.wait_for(pending(), 2)
        except Exception:
            return JSONResponse({"status": "not ready", "reason": "database unreachable"},
                                status_code=503)
        if waiting:
            return JSONResponse({"status": "not ready",
                                 "reason": f"migrations pending: {', '.join(waiting)}"},
                                status_code=503)
        return JSONResponse({"status": "ready"})

    @router.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(_deps(request).metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    @router.get("/api/v1/me", tags=["session"], summary="Who the request is signed in as")
    async def me(request: Request) -> dict[str, str]:
        """The user, role and how they signed in (``token``, ``session``, ``proxy``), and the
        CSRF token their POSTs carry (empty for a Bearer token, which needs none)."""
        user: User = request.state.user
        return {"name": user.name, "role": user.role, "via": user.via,
                "csrf_token": csrf_token(request)}

    @router.get("/login", include_in_schema=False, response_class=HTMLResponse)
    async def login_page(request: Request, next: str = "/") -> Response:
        return _login_page(request, _local(next))

    @router.post("/login", include_in_schema=False)
    async def login(request: Request, token: str = Form(""),
                    next: str = Form("/")) -> Response:
        """A valid token always signs in; failed attempts are limited per client address
        (``console_write_rate_per_minute`` a minute, then 429 with ``Retry-After``). The
        address is the TCP peer, or behind a trusted proxy the client it names
        (:meth:`~.auth.Authenticator.client_address`): one address's wrong guesses never
        lock anyone else out, even behind an ingress that is not configured as trusted.
        Tokens are 256 random bits: the limit bounds the log and the work a flood causes,
        not the odds of a guess (docs/security.md)."""
        deps = _deps(request)
        peer = request.client.host if request.client else None
        address = deps.auth.client_address(peer, request.headers)
        if not _same_origin(request.headers):
            return _login_page(request, _local(next), "this sign-in did not come from this "
                               "console's own page", 403)
        now = deps.clock()
        signed_in = deps.auth.login(token.strip(), now)
        if signed_in is None:
            allowed, retry_after, _ = deps.rate_limiter.check(f"login-failed:{address}", now)
            if not allowed:
                log.warning("console sign-in refused", peer=address, why="rate_limited")
                response = _login_page(request, _local(next),
                                       f"too many failed attempts: try again in {retry_after} s",
                                       429)
                response.headers["Retry-After"] = str(retry_after)
                return response
            log.warning("console sign-in refused", peer=address, why="unknown_token")
            return _login_page(request, _local(next), "that token is not valid", 401)
        user, cookie = signed_in
        await console_audit.open_session(
            deps.pool, session_key(user.nonce), user.name, user.role,
            datetime.fromtimestamp(now + deps.auth.session_seconds(), UTC))
        await deps.audit.record(Attempt(user.name, user.role, user.via, "login"), "signed_in")
        log.info("console sign-in", user=user.name, role=user.role, peer=address)
        response = RedirectResponse(_local(next), status_code=303)
        response.set_cookie(session_cookie(deps.settings), cookie, max_age=deps.auth.session_seconds(),
                            path="/", secure=deps.settings.console_secure_cookies,
                            httponly=True, samesite="strict")
        return response

    @router.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        """Ends the session for good (its row in ``console_sessions``): a copy of the
        cookie stops working at once, on every replica."""
        user: User | None = getattr(request.state, "user", None)
        if user is not None and user.via == "session":
            deps = _deps(request)
            if await console_audit.end_session(deps.pool, session_key(user.nonce)):
                log.info("console sign-out", user=user.name)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(session_cookie(_deps(request).settings), path="/",
                               secure=_deps(request).settings.console_secure_cookies,
                               httponly=True, samesite="strict")
        return response

    return router


def _login_page(request: Request, next_path: str, error: str | None = None,
                status: int = 200) -> Response:
    return templates.TemplateResponse(request, "login.html",
                                      {"next": next_path, "error": error}, status_code=status)


def _local(target: str) -> str:
    """A redirect target on this site only (a path, never ``//host`` or a URL)."""
    parts = urlsplit(target)
    if (parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//")
            or "\\" in target):
        return "/"
    return target


def _same_origin(headers: Headers) -> bool:
    """A browser's cross-site request says so (``Sec-Fetch-Site``, else ``Origin``); tools
    (curl, httpx) send neither and pass. ``Sec-Fetch-Site`` decides alone when present:
    with ``Referrer-Policy: no-referrer`` Chromium sends ``Origin: null`` on a same-origin
    form POST."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc == headers.get("host", "")


# ------------------------------------------------------------------------ errors


def _refusal_handler(request: Request, error: Exception) -> Response:
    status = int(getattr(error, "status", 500))
    code = str(getattr(error, "code", "error"))
    message = str(getattr(error, "message", str(error)))
    field = getattr(error, "field", None)
    headers = dict(getattr(error, "headers", None) or {})
    return error_response(request, status, code, message, field, headers)


def _validation_handler(request: Request, error: RequestValidationError) -> Response:
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ())]
    field = ".".join(location[1:]) if len(location) > 1 else (location[0] if location else None)
    message = str(first.get("msg", "invalid request"))
    return error_response(request, 422, "invalid_request",
                          f"{field}: {message}" if field else message, field or None)


#: What PostgreSQL (or another server) being unreachable raises: 503 ``unavailable``.
#: (``TimeoutError`` is an ``OSError``.) :func:`_unreachable` tells the asyncpg errors
#: that also stand for bugs apart.
UNREACHABLE: tuple[type[Exception], ...] = (
    OSError, asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError, asyncpg.InterfaceError,
    asyncpg.exceptions.ObjectNotInPrerequisiteStateError)
UNAVAILABLE_MESSAGE = "the console cannot reach its database or broker; nothing was done: " \
                      "try again shortly"


def _unreachable(error: BaseException) -> bool:
    if isinstance(error, asyncpg.InterfaceError):
        return "closed" in str(error)  # not "another operation is in progress" (a bug)
    if isinstance(error, asyncpg.exceptions.ObjectNotInPrerequisiteStateError):
        return "accepting connections" in str(error)  # a database that refuses connections
    return isinstance(error, UNREACHABLE)


def _unreachable_handler(request: Request, error: Exception) -> Response:
    if not _unreachable(error):
        log.error("console request failed", path=request.url.path, exc_info=error)
        return error_response(request, 500, "internal_error",
                              "the console failed; see its log")
    log.warning("console dependency unreachable", path=request.url.path,
                error=f"{type(error).__name__}: {error}")
    return error_response(request, 503, "unavailable", UNAVAILABLE_MESSAGE,
                          headers={"Retry-After": "5"})


_HTTP_CODES = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "request_too_large", 429: "rate_limited"}


def _http_handler(request: Request, error: StarletteHTTPException) -> Response:
    code = _HTTP_CODES.get(error.status_code, "error" if error.status_code < 500
                           else "internal_error")
    message = {404: f"nothing at {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(
        error.status_code, str(error.detail))
    return error_response(request, error.status_code, code, message, None,
                          dict(error.headers or {}))


def error_response(request: Request, status: int, code: str, message: str,
                   field: str | None = None, headers: dict[str, str] | None = None) -> Response:
    """JSON ``{"error": ...}`` on the API; on a page a redirect to /login for 401, else
    the error page (``templates/error.html`` if there is one)."""
    path = request.url.path
    if is_api(path):
        return JSONResponse(error_body(code, message, field), status_code=status,
                            headers=headers)
    if status == 401:
        return RedirectResponse(login_url(path, request.url.query), status_code=303)
    if (TEMPLATES_DIR / "error.html").is_file():
        return templates.TemplateResponse(
            request, "error.html", {"status": status, "code": code, "message": message,
                                    "field": field}, status_code=status, headers=headers)
    return HTMLResponse(
        f"<!doctype html><title>{status}</title><h1>{status}</h1>"
        f"<p>{html.escape(message)}</p><p><a href=\"/\">Back to the console</a></p>",
        status_code=status, headers=headers)


def login_url(path: str, query: str = "") -> str:
    target = path + (f"?{query}" if query else "")
    return "/login" if target == "/" else f"/login?next={quote(target, safe='/')}"


# -------------------------------------------------------------------- middleware


STOPPED_MESSAGE = ("the console stopped before answering; a command may have been "
                   "published: poll GET /api/v1/commands/<key>, or retry with the same "
                   "Idempotency-Key (it takes effect once)")


class SecureHeaders:
    """The security headers on every answer; an unhandled error still gets a JSON
    500 (API) or a page, with them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def secured(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(name, value) for name, value in message.get("headers", [])
                           if name.lower() not in _SECURE_NAMES]
                message["headers"] = headers + list(SECURE_HEADERS)
            await send(message)

        try:
            await self.app(scope, receive, secured)
        except BaseException as error:  # a CancelledError from inside a route too
            status, extra = 500, []
            if isinstance(error, asyncio.CancelledError):
                # the console stopping past its graceful timeout: no traceback (rendering
                # one per request held a stop for seconds), and a 503 that says what to do
                log.warning("console request cancelled", path=scope.get("path"))
                status, extra = 503, [(b"retry-after", b"5")]
                body = json.dumps(error_body("unavailable", STOPPED_MESSAGE)).encode()
            else:
                log.exception("console request failed", path=scope.get("path"))
                body = json.dumps(error_body("internal_error",
                                             "the console failed; see its log")).encode()
            if started:
                raise
            with contextlib.suppress(Exception):
                await secured({"type": "http.response.start", "status": status,
                               "headers": [(b"content-type", b"application/json"),
                                           (b"content-length", str(len(body)).encode()),
                                           *extra]})
                await secured({"type": "http.response.body", "body": body})
            if not isinstance(error, Exception):
                raise


class Measured:
    """``creditnotes_console_requests_total`` by route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        began = time.perf_counter()

        async def measured(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, measured)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            metrics = scope["app"].state.deps.metrics if "app" in scope else None
            if metrics is not None:
                metrics.requests.labels(label, str(status)).inc()
                metrics.request_seconds.labels(label).observe(time.perf_counter() - began)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuses a request body larger than ``limit`` bytes (413 ``request_too_large``),
    by its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except _TooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = error_response(request, 413, "request_too_large",
                                  f"the request body is larger than {self.limit} bytes")
        await response(scope, receive, send)


class Gate:
    """Authentication for every route but the public ones, and CSRF for every POST
    from a session or a trusted proxy (see the module's docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deps: ConsoleDeps = scope["app"].state.deps
        request = Request(scope, receive)
        path = scope["path"]
        try:
            user = await resolve_user(deps, request)
        except ProxyRefused as error:
            header = deps.settings.console_proxy_user_header
            if isinstance(error, AmbiguousProxyUser):
                log.warning("console proxy named more than one user", path=path)
                message = f"the proxy's request names more than one user ({header}): refused"
            else:
                log.warning("console proxy user has an API token", path=path, user=str(error))
                message = (f"the proxy names a user ({header}) who also has an API token: "
                           "names must not overlap")
            refusal = unauthenticated()
            await error_response(request, 401, refusal.code, message, None, refusal.headers)(
                scope, receive, send)
            return
        except UNREACHABLE as error:
            if not _unreachable(error):
                raise
            await _unreachable_handler(request, error)(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = user
        if user is None:
            if not is_public(path):
                await error_response(request, 401, (refusal := unauthenticated()).code,
                                     refusal.message, None, refusal.headers)(
                    scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if scope["method"] in SAFE_METHODS or not needs_csrf(user):
            await self.app(scope, receive, send)
            return
        body = await _whole_body(receive)
        given = request.headers.get(CSRF_HEADER)
        if given is None and request.headers.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"):
            given = next(iter(parse_qs(body.decode("latin-1")).get(CSRF_FIELD, [])), None)
        if not (deps.auth.csrf_ok(user, given) and _same_origin(request.headers)):
            await self._refuse_csrf(deps, scope, user, body, send)
            return
        scope["state"]["csrf_checked"] = True
        await self.app(scope, _replay(body, receive), send)

    async def _refuse_csrf(self, deps: ConsoleDeps, scope: Scope, user: User, body: bytes,
                           send: Send) -> None:
        action, target = route_of(scope)
        request = Request(scope, _replay(body, _disconnected))
        await deps.audit.refuse(Attempt(
            user.name, user.role, user.via, action, target, idempotency_key_of(request),
            hashlib.sha256(body).hexdigest() if body else None), "csrf_failed")
        refusal = ConsoleRefusal(403, "csrf_failed",
                                 "this request carries no valid CSRF token (form field "
                                 f"{CSRF_FIELD} or header {CSRF_HEADER}); reload the page")
        await error_response(request, refusal.status, refusal.code, refusal.message)(
            scope, request.receive, send)


async def resolve_user(deps: ConsoleDeps, request: Request) -> User | None:
    """Bearer token, else a trusted proxy's header, else the session cookie (signed, and
    its row in ``console_sessions`` neither signed out nor expired: one primary-key
    lookup a request). A request that sends an ``Authorization`` header is that header's
    user or nobody. A trusted proxy's request naming two users raises
    :class:`~.auth.AmbiguousProxyUser`."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return deps.auth.by_token(token.strip())
    peer = request.client.host if request.client else None
    proxied = deps.auth.by_proxy(peer, request.headers)
    if proxied is not None:
        return proxied
    cookie = request.cookies.get(session_cookie(deps.settings))
    user = deps.auth.by_session(cookie, deps.clock()) if cookie else None
    if user is None or not await console_audit.session_open(deps.pool, session_key(user.nonce)):
        return None
    return user


def all_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, those of included routers too (FastAPI wraps an included router;
    :func:`create_app` includes them without a prefix: their routes hold their paths)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from all_routes(included.routes)
        else:
            yield route


def route_of(scope: Scope) -> tuple[str, str]:
    """The name and path parameters of the route a request is for (before routing)."""
    for route in all_routes(scope["app"].router.routes):
        match, child = route.matches(scope)
        if match is Match.FULL:
            params = child.get("path_params", {})
            return (getattr(route, "name", None) or scope["path"],
                    ",".join(f"{name}={value}" for name, value in sorted(params.items())))
    return f"{scope['method']} {scope['path']}", ""


async def _whole_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}
