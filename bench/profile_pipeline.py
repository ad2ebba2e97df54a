"""Python CPU per message in the consume pipeline, PostgreSQL faked (no servers).

Drives ``Pipeline.process_batch`` with the in-memory unit of work of
``tests/fakes.py`` and the benchmark's message mix (``bench/load.py``): the
invoices first, then batches of credit messages, as the service gets them.
Logging is configured as the benchmark runs the service (JSON, ``WARNING``).
Prints microseconds of CPU per credit message (best of ``--repeat``); with
``--profile``, the top functions of one more pass by cumulative time.

    .venv/bin/python -m bench.profile_pipeline [--messages 4000] [--batch 200] [--profile]

The test fake checks every rule PostgreSQL has (scans of the whole store, deep
copies): :class:`LeanStore` keeps its bookkeeping and drops those checks and
copies (the mix has no duplicates and no refusals), so what is measured is the
service's code: decoding, translating, the domain, encoding the outbox events,
metrics and logs. The real unit of work's row decoding and SQL are not in it.
Figures are for comparing code, not for the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bench.load import HEADERS, Outgoing, invoices, mix
from service.adapters.unavailable import Backoff
from service.domain.credit_note import CreditNote
from service.domain.invoice import Invoice
from service.entrypoints.consumer import Pipeline
from service.entrypoints.dead_letters import DeadLetterWriter
from service.entrypoints.translators import routes
from service.logging import configure_logging
from service.ports import Claims, Locked, Message, key_of
from service.settings import Settings
from tests.fakes import FakeStore, FakeUnitOfWork, LedgerRow


@dataclass
class Record:
    """The parts of an aiokafka ``ConsumerRecord`` the pipeline reads."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None
    timestamp: int
    headers: tuple[tuple[str, bytes], ...] | list[tuple[str, bytes]]


class NoProducer:
    async def send(self, topic: str, *, value: bytes | None, key: bytes | None,
                   headers: list[tuple[str, bytes]], timestamp_ms: int | None = None) -> None:
        raise AssertionError(f"a dead letter in the profile run ({topic})")


class LeanStore(FakeStore):
    def unit_of_work(self) -> FakeUnitOfWork:
        return LeanUnitOfWork(self)

    def has_effect(self, key: tuple[str, str]) -> bool:
        return False  # the mix has no redelivery: only the ledger is looked up


class LeanUnitOfWork(FakeUnitOfWork):
    """The fake's bookkeeping without its whole-store checks and deep copies."""

    async def claim(self, messages: Sequence[Message]) -> Claims:
        claimed = set()
        for message in messages:
            key = key_of(message.command.trigger)
            if key in claimed or self._row(key) is not None:
                continue
            self._deliveries.setdefault(key, message.delivery)
            self._ledger[key] = LedgerRow(message.command.trigger.type, message.delivery,
                                          "applied")
            claimed.add(key)
        self._claimed |= claimed
        return Claims(frozenset(claimed))

    async def lock(self, invoice_ids: Iterable[str], credit_note_ids: Iterable[str] = (),
                   refund_ids: Iterable[str] = ()) -> Locked:
        invoices: dict[str, Invoice | None] = {}
        for invoice_id in sorted(set(invoice_ids)):
            if invoice_id not in self._invoices:
                self._invoices[invoice_id] = self.store.invoices.get(invoice_id)
            invoices[invoice_id] = self._invoices[invoice_id]
        notes: dict[str, CreditNote | None] = {
            note_id: self.store.credit_notes.get(note_id) for note_id in credit_note_ids}
        return Locked(invoices, notes, frozenset())

    def _commit(self) -> None:
        rows = self._outbox_rows(self._collect_new_events())
        self.store.ledger.update(self._ledger)
        for key, outcome in self._outcomes.items():
            self.store.ledger[key].outcome = outcome
        for invoice in [*self._new_invoices, *self._saved_invoices.values()]:
            self.store.invoices[invoice.id] = invoice
        for note in [*self._new_notes, *self._voided]:
            self.store.credit_notes[note.id] = note
        self.store.outbox += rows
        self.store.commits += 1


def records(outgoing: Iterable[Outgoing]) -> list[Record]:
    return [Record(item.topic, 0, offset, item.value, item.key, 1_764_000_000_000,
                   list(HEADERS)) for offset, item in enumerate(outgoing)]


def batches(items: Sequence[Record], size: int) -> list[Sequence[Record]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


async def one_pass(settings: Settings, invoice_count: int, messages: int, batch: int,
                   run: str, profiler: cProfile.Profile | None = None) -> float:
    """Seconds of CPU per credit message for one fresh store."""
    store = LeanStore()
    pipeline = Pipeline(store.unit_of_work, routes(settings),
                        DeadLetterWriter(NoProducer(), "creditnotes", "profile"),  # type: ignore[arg-type]
                        Backoff(0.01, 0.02), not_found_retry_s=0.0, max_message_bytes=1_000_000)
    for group in batches(records(invoices(settings, invoice_count, run)), batch):
        await pipeline.process_batch(group)
    credits = batches(records(mix(settings, messages, invoice_count, run, "profile")), batch)
    if profiler is not None:
        profiler.enable()
    started = time.process_time()
    for group in credits:
        outcomes = await pipeline.process_batch(group)
        assert None not in outcomes, "a credit message was dead-lettered"
    spent = time.process_time() - started
    if profiler is not None:
        profiler.disable()
    return spent / messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--invoices", type=int, default=500)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    configure_logging("json", "WARNING")
    settings = Settings(_env_file=None)
    figures = [asyncio.run(one_pass(settings, args.invoices, args.messages, args.batch,
                                    f"r{attempt}"))
               for attempt in range(args.repeat)]
    print(f"{min(figures) * 1e6:.1f} us CPU per message (best of {args.repeat}; all: "
          + ", ".join(f"{figure * 1e6:.1f}" for figure in figures) + ")")
    if args.profile:
        profiler = cProfile.Profile()
        asyncio.run(one_pass(settings, args.invoices, args.messages, args.batch, "p", profiler))
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
