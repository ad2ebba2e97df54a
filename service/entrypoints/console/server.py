"""Runs the console: its pool and producer, and uvicorn inside the caller's event loop.

``creditnotes console`` runs one :class:`Console` alone; ``creditnotes dev`` and
``demo`` run one beside the service in the same loop. uvicorn gets a socket bound
here (a port in use is an ``OSError`` here, not uvicorn's ``sys.exit``) and never
touches the signal handlers: whoever runs the loop sets ``stopping``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Callable, Generator
from typing import Any

import asyncpg
import structlog
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service.adapters.kafka_producer import KafkaProducer
from service.entrypoints.console.app import create_app
from service.entrypoints.console.auth import Authenticator
from service.entrypoints.console.deps import ConsoleDeps
from service.main import CREATING_THE_POOL
from service.settings import Settings

log = structlog.get_logger(__name__)

#: The console's own connections: page and API reads, audit rows, outcome polls.
CONSOLE_POOL_SIZE = 5
#: Connections and requests at once; more are answered 503 by uvicorn.
MAX_CONNECTIONS = 100
#: Seconds a connection has to send a whole request head (from its opening, or from the
#: first byte after an answer); then it is closed. uvicorn arms no timer before a first
#: request is complete, so without it 100 half-open sockets (slowloris) keep everyone
#: out, the probes too. A browser or an ingress sends a head in one go.
REQUEST_HEAD_SECONDS = 5.0
#: Seconds the pool and the producer get to close at a stop, after uvicorn's own
#: shutdown_timeout_seconds for the requests in flight (a frozen broker or database
#: would otherwise hold the stop for their own timeouts).
CLOSE_SECONDS = 2.0


class HeadDeadline(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol, closing a connection whose request head is not complete
    within :data:`REQUEST_HEAD_SECONDS` of its first byte (or of its opening)."""

    head_seconds = REQUEST_HEAD_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_of: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and (
                self._head_timer is None or self._head_of is not cycle):
            self._arm_head_timer()  # the first byte of the next request's head
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_of = self.cycle  # a new request (a new cycle) disarms it
        self._head_timer = self.loop.call_later(self.head_seconds, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.cycle is self._head_of and not self.transport.is_closing():
            log.info("console connection closed: no complete request head",
                     seconds=self.head_seconds, client=self.client)
            self.transport.close()


class _InLoopServer(uvicorn.Server):
    """uvicorn without its signal handlers (the loop's owner has its own)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.setblocking(False)
    return sock


class Console:
    """The console process's parts; :meth:`run` serves until ``stopping`` is set."""

    def __init__(self, settings: Settings, *, authenticator: Authenticator | None = None,
                 pool_size: int = CONSOLE_POOL_SIZE) -> None:
        self.settings = settings
        self.auth = authenticator or Authenticator(settings)
        self.pool_size = pool_size
        self.ready = asyncio.Event()
        self.port: int | None = None
        self.deps: ConsoleDeps | None = None
        self.app: FastAPI | None = None

    def one_time_token(self) -> str:
        """A token that opens one operator session, for ``dev`` and ``demo``."""
        return self.auth.one_time_token("dev", "operator")

    @property
    def url(self) -> str:
        host = self.settings.console_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
        return f"http://{shown}:{self.port}"

    async def run(self, stopping: asyncio.Event) -> None:
        settings = self.settings
        if settings.console_session_secret is None:
            log.warning("console sessions are signed with a random secret: they end when "
                        "this process stops and do not cross replicas",
                        setting="CREDITNOTES_CONSOLE_SESSION_SECRET")
        async with contextlib.AsyncExitStack() as stack:
            sock = bind(settings.console_host, settings.console_port)
            stack.callback(sock.close)
            try:
                pool = await asyncpg.create_pool(settings.database_url, min_size=1,
                                                 max_size=self.pool_size)
            except OSError as error:
                error.add_note(CREATING_THE_POOL)
                raise
            stack.push_async_callback(_closed, pool)
            producer = KafkaProducer(settings)
            stack.push_async_callback(_quietly, producer.stop)
            await producer.start()
            self.deps = ConsoleDeps(settings, pool, producer, self.auth)
            self.app = create_app(self.deps)
            config = uvicorn.Config(
                self.app, lifespan="off", log_config=None, access_log=False,
                proxy_headers=False, server_header=False, ws="none", http=HeadDeadline,
                limit_concurrency=MAX_CONNECTIONS,
                # whole seconds, at least 1 (uvicorn waits for ever on 0)
                timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_timeout_seconds)))
            server = _InLoopServer(config)
            serving = asyncio.create_task(server.serve(sockets=[sock]), name="console")
            stack.push_async_callback(_stopped, server, serving)
            while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn has no event)
                await asyncio.sleep(0.01)
            if serving.done():
                serving.result()  # raises what stopped it
                return
            self.port = sock.getsockname()[1]
            log.info("console started", url=self.url, tokens=len(settings.console_tokens),
                     trusted_proxies=len(settings.console_trusted_proxies))
            self.ready.set()
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait([stop, serving], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
        log.info("console stopped")


async def _stopped(server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
    """uvicorn stops taking requests, gives those in flight its graceful timeout, then
    cancels them; should its own stop hang past that, the task is cancelled."""
    server.should_exit = True
    limit = (server.config.timeout_graceful_shutdown or 0) + CLOSE_SECONDS
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(serving, limit)


async def _closed(pool: asyncpg.Pool) -> None:
    """The pool closed, or (a connection that does not give up in time) terminated."""
    try:
        await asyncio.wait_for(pool.close(), CLOSE_SECONDS)
    except (Exception, asyncio.CancelledError):
        pool.terminate()


async def _quietly(stop: Callable[[], object]) -> None:
    """The producer stopped within :data:`CLOSE_SECONDS` (a frozen broker holds a flush
    for its request timeout: what is not sent by then is not sent)."""
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        result = stop()
        if asyncio.iscoroutine(result):
            await asyncio.wait_for(result, CLOSE_SECONDS)


async def serve_console(settings: Settings, stopping: asyncio.Event,
                        console: Console | None = None) -> None:
    """``creditnotes console``: serve until ``stopping`` is set."""
    await (console or Console(settings)).run(stopping)
