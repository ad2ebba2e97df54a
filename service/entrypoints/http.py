"""Health endpoints on ``CREDITNOTES_HTTP_PORT``: ``/healthz``, ``/readyz``, ``/metrics``.

A deliberately tiny HTTP/1.1 server on asyncio streams: three GET routes do
not justify a web framework in the service's dependencies.

It is reachable by whoever reaches the pod, so it is bounded: at most
``max_connections`` open at once (more are answered ``503`` and closed), a
request must arrive whole within ``read_timeout`` seconds, and a request line
or header line longer than ``max_line_bytes`` is refused with ``431``. The
checks behind ``/readyz`` and ``/metrics`` are :class:`Cached`: however many
requests arrive, one computation runs at a time and its answer is reused for
``readiness_cache_seconds``. ``/metrics`` may be served on a port of its own
(``CREDITNOTES_METRICS_PORT``), and then only there.

What the two answer is at the end: :func:`readiness_check` and
:func:`metrics_scrape`, both on the health probe's own PostgreSQL connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from faststream.kafka import KafkaBroker

from service.adapters import migrations, outbox_relay
from service.adapters.probe_connection import ProbeConnection
from service.domain import errors
from service.entrypoints.metrics import Metrics
from service.entrypoints.subscribers import partition_lag

Check = Callable[[], Awaitable[tuple[bool, str]]]
T = TypeVar("T")

#: Header lines read per request before it is refused (GET needs a handful).
MAX_HEADER_LINES = 32


class Cached(Generic[T]):
    """``compute`` run at most once per ``seconds``; concurrent callers share one run."""

    def __init__(self, compute: Callable[[], Awaitable[T]], seconds: float) -> None:
        self._compute = compute
        self._seconds = seconds
        self._value: T | None = None
        self._at = float("-inf")
        self._running: asyncio.Task[T] | None = None
        self.computations = 0

    async def __call__(self) -> T:
        if self._value is not None and time.monotonic() - self._at < self._seconds:
            return self._value
        if self._running is None:
            self._running = asyncio.create_task(self._refresh())
        # shield: a caller that gives up (its client went away) never cancels the others' run
        return await asyncio.shield(self._running)

    async def _refresh(self) -> T:
        try:
            self.computations += 1
            value = await self._compute()
            self._value, self._at = value, time.monotonic()
            return value
        finally:
            self._running = None


@dataclass(frozen=True)
class Limits:
    max_connections: int = 16
    read_timeout: float = 5.0
    max_line_bytes: int = 1_024


class HealthServer:
    def __init__(self, port: int, readiness: Check, metrics: Callable[[], Awaitable[str]],
                 host: str = "0.0.0.0",  # noqa: S104  (probes come from outside the pod)
                 metrics_port: int | None = None, limits: Limits | None = None) -> None:
        self._port = port
        self._host = host
        self.readiness = readiness
        self._metrics = metrics
        self._metrics_port = metrics_port
        self._limits = limits or Limits()
        self._server: asyncio.Server | None = None
        self._metrics_server: asyncio.Server | None = None
        self._open = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def metrics_port(self) -> int:
        """Where ``/metrics`` answers: its own port when configured, else :attr:`port`."""
        if self._metrics_server is None:
            return self.port
        return int(self._metrics_server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        separate = self._metrics_port is not None and self._metrics_port != self._port
        probes = {"/healthz", "/readyz"} | (set() if separate else {"/metrics"})
        self._server = await self._listen(self._port, probes)
        if separate:
            assert self._metrics_port is not None
            self._metrics_server = await self._listen(self._metrics_port, {"/metrics"})

    async def _listen(self, port: int, paths: set[str]) -> asyncio.Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(reader, writer, paths)

        # the reader's buffer limit is the longest line readline() accepts
        return await asyncio.start_server(serve, self._host, port,
                                          limit=self._limits.max_line_bytes)

    async def stop(self) -> None:
        for server in (self._server, self._metrics_server):
            if server is not None:
                server.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     paths: set[str]) -> None:
        self._open += 1
        try:
            if self._open > self._limits.max_connections:
                await _answer(writer, "503 Service Unavailable", b"busy\n")
                return
            try:
                async with asyncio.timeout(self._limits.read_timeout):
                    path = await _read_request(reader)
            except (ValueError, asyncio.LimitOverrunError):
                await _answer(writer, "431 Request Header Fields Too Large", b"too large\n")
                return
            status, body, content_type = await self._route(path if path in paths else "")
            async with asyncio.timeout(self._limits.read_timeout):  # a client that never reads
                await _answer(writer, status, body, content_type)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._open -= 1
            writer.close()

    async def _route(self, path: str) -> tuple[str, bytes, str]:
        if path == "/healthz":
            return "200 OK", b"ok\n", "text/plain"
        if path == "/readyz":
            ready, detail = await self.readiness()
            return ("200 OK" if ready else "503 Service Unavailable",
                    (detail + "\n").encode(), "text/plain")
        if path == "/metrics":
            return "200 OK", (await self._metrics()).encode(), "text/plain; version=0.0.4"
        return "404 Not Found", b"not found\n", "text/plain"


async def _read_request(reader: asyncio.StreamReader) -> str:
    """The request's path; the headers are read (bounded) and dropped."""
    request = await reader.readline()
    for _ in range(MAX_HEADER_LINES):
        if await reader.readline() in (b"\r\n", b"\n", b""):
            parts = request.decode("latin-1").split()
            return parts[1] if len(parts) >= 2 else ""
    raise ValueError("too many header lines")


async def _answer(writer: asyncio.StreamWriter, status: str, body: bytes,
                  content_type: str = "text/plain") -> None:
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


# --------------------------------------------------------------------------- what they answer


def readiness_check(probe: ProbeConnection, broker: KafkaBroker, migrations_dir: Path) -> Check:
    """``/readyz``: PostgreSQL answers with every migration applied, and so does the broker."""
    async def readiness() -> tuple[bool, str]:
        try:
            async with probe.connection() as connection:
                pending = await migrations.pending(connection, migrations_dir)
        except errors.Unavailable:
            return False, "database unreachable"
        if pending:
            return False, f"migrations pending: {', '.join(pending)}"
        if not await broker.ping(timeout=2):
            return False, "broker unreachable"
        return True, "ready"
    return readiness


def metrics_scrape(probe: ProbeConnection, broker: KafkaBroker,
                   metrics: Metrics) -> Callable[[], Awaitable[str]]:
    """``/metrics``: the outbox gauges and the consumer lag refreshed, then every metric."""
    async def scrape() -> str:
        try:  # the other metrics still answer while PostgreSQL is down
            async with probe.connection() as connection:
                backlog = await asyncio.wait_for(outbox_relay.backlog(connection), 2)
        except errors.Unavailable:
            backlog = None
        if backlog is not None:
            metrics.outbox_backlog.set(backlog.rows)
            metrics.outbox_oldest.set(backlog.oldest_seconds)
            metrics.outbox_parked.set(backlog.parked)
        for topic, partition, lag in await partition_lag(broker.subscribers):
            metrics.lag.labels(topic, str(partition)).set(lag)
        return metrics.render()
    return scrape
