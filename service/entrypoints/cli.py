"""The ``creditnotes`` command line (CONTRACT.md): run, migrate, dev, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from rich.console import Console

from service.adapters.migrations import migrate
from service.logging import configure_logging
from service.main import Service
from service.settings import Settings

log = structlog.get_logger(__name__)
DEFAULT_DATA_DIR = Path(".creditnotes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="creditnotes", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the service (consumers, outbox relay, health endpoints)")
    commands.add_parser("migrate", help="apply database migrations (idempotent)")
    for name, text in (("dev", "embedded PostgreSQL and broker, migrate, create topics, run"),
                       ("demo", "run the RULES.md worked examples end to end and check them")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                         help="where embedded servers keep their data (default: .creditnotes)")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValueError as error:
        print(f"creditnotes: invalid configuration: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    handlers: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
        "run": run, "migrate": migrate_command, "dev": dev, "demo": demo}
    return handlers[args.command](args, settings)


def run(_: argparse.Namespace, settings: Settings) -> int:
    asyncio.run(_serve(settings))
    return 0


def migrate_command(_: argparse.Namespace, settings: Settings) -> int:
    applied = asyncio.run(migrate(settings.database_url, settings.migrations_dir))
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else
                                                   "; the database is up to date"))
    return 0


def _unwind_on_sigterm() -> None:
    """SIGTERM outside the service loop unwinds like Ctrl-C, so embedded servers are stopped."""
    def leave(signum: int, _: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, leave)


def dev(args: argparse.Namespace, settings: Settings) -> int:
    from service.entrypoints import stack

    _unwind_on_sigterm()

    with stack.servers(settings, args.data_dir) as local:
        asyncio.run(_prepare(local))
        Console(stderr=True).print(
            f"[bold]creditnotes dev[/]: PostgreSQL {local.database_url}\n"
            f"  Kafka bootstrap servers {local.kafka_bootstrap_servers}\n"
            f"  health http://127.0.0.1:{local.http_port}/readyz   (Ctrl-C stops everything)")
        asyncio.run(_serve(local))
    return 0


def demo(args: argparse.Namespace, settings: Settings) -> int:
    from service.entrypoints import stack
    from service.entrypoints.demo import run_demo

    _unwind_on_sigterm()

    console = Console(width=None if sys.stdout.isatty() else 180)
    # the table is the output: keep the service's own logs to warnings unless asked otherwise
    level = "WARNING" if settings.log_level == "INFO" else settings.log_level
    configure_logging(settings.log_format, level)
    quiet = settings.model_copy(update={"http_port": 0, "log_level": level})
    with stack.servers(quiet, args.data_dir) as local:
        asyncio.run(_prepare(local))
        ok = asyncio.run(_serve(local, lambda: run_demo(local, console)))
    return 0 if ok else 1


async def _prepare(settings: Settings) -> None:
    from service.entrypoints.devstack import create_topics

    await migrate(settings.database_url, settings.migrations_dir)
    await create_topics(settings.kafka_bootstrap_servers, settings.topics.all())


async def _serve(settings: Settings,
                 task: Callable[[], Awaitable[bool]] | None = None) -> bool:
    """Run the service until SIGINT/SIGTERM, or until ``task`` (run alongside) finishes."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    service = Service(settings)
    running = asyncio.create_task(service.run(stopping))
    result = True
    try:
        if task is not None:
            await asyncio.wait([running, asyncio.ensure_future(service.ready.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if not running.done():
                result = await task()
            stopping.set()
        await running
    finally:
        stopping.set()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    return result


if __name__ == "__main__":
    sys.exit(main())
