"""Attack (availability, no credentials; /work/notes/attack-up): uvicorn arms no timer
before a first request is complete and the console takes at most 100 connections, so
100 sockets sending half a request head kept every user, /healthz and /readyz out.
A connection now has REQUEST_HEAD_SECONDS to send a whole head."""

from __future__ import annotations

import asyncio

import pytest

from service.entrypoints.console.server import MAX_CONNECTIONS, REQUEST_HEAD_SECONDS
from tests.console.conftest import RunningConsole

pytestmark = pytest.mark.integration


async def test_half_open_connections_do_not_lock_everyone_out(
        bare_console: RunningConsole) -> None:
    port = bare_console.console.port
    held = []
    try:
        for _ in range(MAX_CONNECTIONS + 10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            await writer.drain()
            held.append((reader, writer))
        client = bare_console.client()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REQUEST_HEAD_SECONDS + 10
        status = 0
        while loop.time() < deadline and status != 200:
            await asyncio.sleep(1)
            status = (await client.get("/healthz")).status_code
        assert status == 200, status
        assert (await client.get("/readyz")).status_code == 200
        # and the half-open connections were closed by the console
        assert await asyncio.wait_for(held[0][0].read(), 5) == b""
    finally:
        for _, writer in held:
            writer.close()


async def test_a_kept_alive_connection_cannot_hold_a_half_head_either(
        bare_console: RunningConsole) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", bare_console.console.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), 5)
        assert answer.startswith(b"HTTP/1.1 200")
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # the next head, never finished
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), REQUEST_HEAD_SECONDS + 5) == b""
    finally:
        writer.close()


async def test_a_head_sent_in_pieces_within_the_deadline_is_answered(
        bare_console: RunningConsole) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", bare_console.console.port)
    try:
        for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(REQUEST_HEAD_SECONDS / 4)
        answer = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), 5)
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
