"""The ``creditnotes dev`` and ``creditnotes demo`` commands (docs/contract.md).

:mod:`service.entrypoints.cli` parses their command lines and calls these
only when the ``embedded`` extra is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import socket
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from service.adapters.migrations import migrate
from service.devtools import dev_state, stack
from service.devtools.demo import run_demo
from service.devtools.devstack import create_topics
from service.entrypoints.cli import serve
from service.entrypoints.console.server import Console as ConsoleServer
from service.logging import configure_logging
from service.settings import Settings, redact_url


def _unwind_on_sigterm() -> None:
    """SIGTERM outside the service loop unwinds like Ctrl-C, so embedded servers are stopped."""
    def leave(signum: int, _: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, leave)


def local_console(settings: Settings) -> dict[str, object]:
    """The console settings of ``dev`` and ``demo``: on this machine only (unless
    CREDITNOTES_CONSOLE_HOST says otherwise), over plain HTTP (cookies not ``Secure``)."""
    updates: dict[str, object] = {"console_secure_cookies": False}
    if "CREDITNOTES_CONSOLE_HOST" not in os.environ:
        updates["console_host"] = "127.0.0.1"
    host = str(updates.get("console_host", settings.console_host))
    if "CREDITNOTES_CONSOLE_PORT" not in os.environ and not _free(host, settings.console_port):
        updates["console_port"] = 0  # the default port is taken: any other (the banner says)
    return updates


def _free(host: str, port: int) -> bool:
    try:
        socket.create_server((host, port)).close()
    except OSError:
        return False
    return True


def console_banner(console: ConsoleServer) -> str:
    """Where the console is and the one-time token that opens a session there."""
    token = console.one_time_token()
    return "\n".join([
        f"  console     {console.url}/login  [dim](ops console and HTTP API)[/]",
        f"  one-time operator token: [bold]{token}[/]  [dim](signs in once; "
        "`creditnotes console token` makes lasting ones)[/]",
    ])


def _print_console(console: ConsoleServer) -> None:
    Console(stderr=True, highlight=False).print(console_banner(console), soft_wrap=True)


def dev(args: argparse.Namespace, settings: Settings) -> int:
    _unwind_on_sigterm()
    data_dir = args.data_dir or dev_state.data_dir("dev")
    # a local stack: topics without an allow-list accept any source (logged at start)
    open_settings = settings.model_copy(update={"allow_any_source": True,
                                                **local_console(settings)})
    try:
        with dev_state.exclusive(data_dir, "dev"), \
                stack.servers(open_settings, data_dir) as local:
            asyncio.run(_prepare(local))
            with dev_state.advertised(data_dir, local.database_url,
                                      local.kafka_bootstrap_servers, local.http_port):
                Console(stderr=True, highlight=False).print(_dev_banner(local, data_dir),
                                                            soft_wrap=True)
                asyncio.run(serve(local, console=ConsoleServer(local),
                                  on_console_ready=_print_console))
    except dev_state.StackBusy as busy:
        print(f"creditnotes dev: {busy}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        print(f"creditnotes dev: the console's port {open_settings.console_port} is in use: "
              "set CREDITNOTES_CONSOLE_PORT to another", file=sys.stderr)
        return 3
    return 0


def _dev_banner(local: Settings, data_dir: Path) -> str:
    embedded_db = "CREDITNOTES_DATABASE_URL" not in os.environ
    embedded_kafka = "CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS" not in os.environ
    cli = ".venv/bin/creditnotes" if Path(".venv/bin/creditnotes").exists() else "creditnotes"
    return "\n".join([
        "[bold]creditnotes dev[/] is running (Ctrl-C stops everything it started)",
        f"  PostgreSQL  {escape(redact_url(local.database_url))}"
        + (f"  [dim](tables kept in {data_dir}/postgres across restarts)[/]"
           if embedded_db else ""),
        f"  Kafka       {escape(local.kafka_bootstrap_servers)}"
        + ("  [dim](tansu keeps topics in memory: they and their dead letters are gone "
           "when dev stops)[/]" if embedded_kafka else ""),
        f"  health      http://127.0.0.1:{local.http_port}/readyz",
        f"The other commands find these servers through {data_dir}/servers.json. Try, in "
        "another terminal:",
        f"  {cli} publish invoices schemas/examples/invoice.finalized.json",
        f"  {cli} publish invoices schemas/examples/invoice.payment_succeeded.json",
        f"  {cli} publish credit-note-commands schemas/examples/credit_note.issue.json",
        f"  {cli} invoice show in_1001",
        f"  {cli} publish refund-results schemas/examples/refund.failed.json",
        f"  {cli} invoice show in_1001",
        f"  {cli} dlq list credit-note-commands.dlq",
    ])


def demo(args: argparse.Namespace, settings: Settings) -> int:
    _unwind_on_sigterm()
    data_dir = args.data_dir or dev_state.data_dir("demo")
    console = Console(width=None if sys.stdout.isatty() else 200)
    # the table is the output: keep the service's own logs to warnings unless asked otherwise
    level = "WARNING" if settings.log_level == "INFO" else settings.log_level
    configure_logging(settings.log_format, level)
    quiet = settings.model_copy(update={"http_port": 0, "log_level": level,
                                        "allow_any_source": True, "console_port": 0,
                                        **local_console(settings)})
    try:
        with dev_state.exclusive(data_dir, "demo"), \
                stack.servers(quiet, data_dir) as local:
            asyncio.run(_prepare(local))
            ok = asyncio.run(serve(local, lambda: run_demo(local, console),
                                   console=ConsoleServer(local),
                                   on_console_ready=_print_console))
    except dev_state.StackBusy as busy:
        print(f"creditnotes demo: {busy}", file=sys.stderr)
        return 2
    return 0 if ok else 1


async def _prepare(settings: Settings) -> None:
    await migrate(settings.database_url, settings.migrations_dir)
    await create_topics(settings.kafka_bootstrap_servers, settings.topics.all())
