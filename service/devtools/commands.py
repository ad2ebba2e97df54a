"""The ``creditnotes dev`` and ``creditnotes demo`` commands (docs/contract.md).

:mod:`service.entrypoints.cli` parses their command lines and calls these
only when the ``embedded`` extra is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from service.adapters.migrations import migrate
from service.devtools import dev_state, stack
from service.devtools.demo import run_demo
from service.devtools.devstack import create_topics
from service.entrypoints.cli import serve
from service.logging import configure_logging
from service.settings import Settings, redact_url


def _unwind_on_sigterm() -> None:
    """SIGTERM outside the service loop unwinds like Ctrl-C, so embedded servers are stopped."""
    def leave(signum: int, _: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, leave)


def dev(args: argparse.Namespace, settings: Settings) -> int:
    _unwind_on_sigterm()
    data_dir = args.data_dir or dev_state.data_dir("dev")
    # a local stack: topics without an allow-list accept any source (logged at start)
    open_settings = settings.model_copy(update={"allow_any_source": True})
    try:
        with dev_state.exclusive(data_dir, "dev"), \
                stack.servers(open_settings, data_dir) as local:
            asyncio.run(_prepare(local))
            with dev_state.advertised(data_dir, local.database_url,
                                      local.kafka_bootstrap_servers, local.http_port):
                Console(stderr=True, highlight=False).print(_dev_banner(local, data_dir),
                                                            soft_wrap=True)
                asyncio.run(serve(local))
    except dev_state.StackBusy as busy:
        print(f"creditnotes dev: {busy}", file=sys.stderr)
        return 2
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
                                        "allow_any_source": True})
    try:
        with dev_state.exclusive(data_dir, "demo"), \
                stack.servers(quiet, data_dir) as local:
            asyncio.run(_prepare(local))
            ok = asyncio.run(serve(local, lambda: run_demo(local, console)))
    except dev_state.StackBusy as busy:
        print(f"creditnotes demo: {busy}", file=sys.stderr)
        return 2
    return 0 if ok else 1


async def _prepare(settings: Settings) -> None:
    await migrate(settings.database_url, settings.migrations_dir)
    await create_topics(settings.kafka_bootstrap_servers, settings.topics.all())
