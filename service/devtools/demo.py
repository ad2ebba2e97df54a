"""``creditnotes demo``: the docs/rules.md worked examples, as upstream events, end to end.

Publishes each example's invoice and commands as CloudEvents, waits for what
the service publishes in return, and prints a table of every credit note, the
invoice after it and the events out, each checked against the figures
docs/rules.md gives. Any mismatch makes the command exit non-zero.

Ids carry a per-run suffix, so the demo can run again on the same database.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from service.adapters.kafka_producer import connection_options
from service.entrypoints.display import major_units
from service.settings import Settings

SOURCE = "/creditnotes/demo"
Data = dict[str, Any] | Callable[[dict[str, str]], dict[str, Any]]


@dataclass(frozen=True)
class Expect:
    outcome: str  # credit_note.issued | credit_note.voided | credit_note.rejected
    total: int | None = None
    pre_payment: int | None = None
    refund: int = 0
    balance: int = 0
    out_of_band: int = 0
    remaining: int | None = None
    status: str | None = None
    reason: str | None = None
    events: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Step:
    label: str
    type: str
    data: Data
    expect: Expect | None = None


@dataclass
class Example:
    name: str
    title: str
    steps: list[Step] = field(default_factory=list)


def invoice(run: str, key: str, lines: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"invoice": {"id": f"in_{key}_{run}", "number": f"ACME-{run}-{key}",
                        "customer_id": f"cus_{key}", "currency": "usd", "status": "open",
                        "lines": lines, **extra}}


def line(line_id: str, quantity: int, unit_amount: int, tax_rate_bps: int = 0,
         description: str = "Widget", period: tuple[str, str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"id": line_id, "description": description, "quantity": quantity,
                            "unit_amount": unit_amount, "tax_rate_bps": tax_rate_bps}
    if period:
        data["period"] = {"start": period[0], "end": period[1]}
    return data


OCTOBER = ("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z")
TEN_LINES = [line(f"il_{n}", 1, 1_000) for n in range(1, 11)]


def _topic(settings: Settings, type_: str) -> str:
    topics = settings.topics
    return {
        "return.received": topics.returns, "sla.breached": topics.sla_breaches,
        "subscription.downgraded": topics.downgrades,
        "subscription.canceled": topics.cancellations,
    }.get(type_, topics.invoices if type_.startswith("invoice.")
          else topics.credit_note_commands)


def examples(run: str) -> list[Example]:
    """docs/rules.md worked examples 1 to 12 in order (as events), then a downgrade."""
    def number(example: Example) -> int:
        last = example.name.split()[-1]
        return int(last) if last.isdigit() else 99

    return sorted(_examples(run), key=number)


def _examples(run: str) -> list[Example]:
    def inv(key: str) -> str:
        return f"in_{key}_{run}"

    return [
        Example("Example 1", "Overcharge of 200.00 on 1,000.00 due", [
            Step("invoice 1,000.00", "invoice.finalized", invoice(run, "01", [line("il_1", 1, 100_000)])),
            Step("credit 200.00", "credit_note.issue",
                 {"invoice_id": inv("01"), "amount": 20_000, "reason": "other"},
                 Expect("credit_note.issued", total=20_000, pre_payment=20_000, remaining=80_000,
                        status="open")),
        ]),
        Example("Example 2", "20.00 credit on 100.00 due", [
            Step("invoice 100.00", "invoice.finalized", invoice(run, "02", [line("il_1", 1, 10_000)])),
            Step("credit 20.00", "credit_note.issue", {"invoice_id": inv("02"), "amount": 2_000},
                 Expect("credit_note.issued", total=2_000, pre_payment=2_000, remaining=8_000,
                        status="open")),
        ]),
        Example("Example 3", "Credit all that remains: the invoice is paid", [
            Step("invoice 50.00", "invoice.finalized", invoice(run, "03", [line("il_1", 1, 5_000)])),
            Step("credit 50.00", "credit_note.issue", {"invoice_id": inv("03"), "amount": 5_000},
                 Expect("credit_note.issued", total=5_000, pre_payment=5_000, remaining=0,
                        status="paid", events=frozenset({"invoice.paid"}))),
        ]),
        Example("Example 4", "Paid invoice: 5.00 credited as refund 2.00, balance 1.00, out of band 2.00", [
            Step("paid invoice 5.00", "invoice.finalized",
                 invoice(run, "04", [line("il_1", 1, 500)], status="paid", amount_paid=500)),
            Step("credit 5.00", "credit_note.issue",
                 {"invoice_id": inv("04"), "amount": 500, "refund_amount": 200,
                  "credit_amount": 100, "out_of_band_amount": 200},
                 Expect("credit_note.issued", total=500, pre_payment=0, refund=200, balance=100,
                        out_of_band=200, remaining=0, status="paid",
                        events=frozenset({"refund.requested"}))),
        ]),
        Example("Example 8", "The credit note that crosses the total is rejected", [
            Step("invoice 100.00", "invoice.finalized", invoice(run, "08", [line("il_1", 1, 10_000)])),
            Step("credit 60.00", "credit_note.issue", {"invoice_id": inv("08"), "amount": 6_000},
                 Expect("credit_note.issued", total=6_000, pre_payment=6_000, remaining=4_000,
                        status="open")),
            Step("credit 50.00", "credit_note.issue", {"invoice_id": inv("08"), "amount": 5_000},
                 Expect("credit_note.rejected", reason="exceeds_creditable_amount")),
            Step("credit 40.00", "credit_note.issue", {"invoice_id": inv("08"), "amount": 4_000},
                 Expect("credit_note.issued", total=4_000, pre_payment=4_000, remaining=0,
                        status="paid", events=frozenset({"invoice.paid"}))),
        ]),
        Example("Example 9", "Void restores the amount due; void on a paid invoice is rejected", [
            Step("invoice 100.00", "invoice.finalized", invoice(run, "09", [line("il_1", 1, 10_000)])),
            Step("credit 30.00", "credit_note.issue", {"invoice_id": inv("09"), "amount": 3_000},
                 Expect("credit_note.issued", total=3_000, pre_payment=3_000, remaining=7_000,
                        status="open")),
            Step("void it", "credit_note.void",
                 lambda notes: {"credit_note_id": notes["credit 30.00"]},
                 Expect("credit_note.voided", total=3_000, remaining=10_000, status="open")),
            Step("paid invoice 100.00", "invoice.finalized",
                 invoice(run, "09p", [line("il_1", 1, 10_000)], status="paid",
                         amount_paid=10_000)),
            Step("credit 10.00", "credit_note.issue", {"invoice_id": inv("09p"), "amount": 1_000},
                 Expect("credit_note.issued", total=1_000, pre_payment=0, balance=1_000,
                        remaining=0, status="paid")),
            Step("void it", "credit_note.void",
                 lambda notes: {"credit_note_id": notes["credit 10.00"]},
                 Expect("credit_note.rejected", reason="not_voidable")),
        ]),
        Example("Example 12", "3 x 33.33 at 20% tax, credited one unit at a time", [
            Step("invoice 119.99", "invoice.finalized",
                 invoice(run, "12", [line("il_1", 3, 3_333, 2_000)], total=11_999)),
            *[Step(f"unit {n}", "credit_note.issue",
                   {"invoice_id": inv("12"), "lines": [
                       {"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 1}]},
                   Expect("credit_note.issued", total=total, pre_payment=total, remaining=left,
                          status=status, events=events))
              for n, total, left, status, events in (
                  (1, 4_000, 7_999, "open", frozenset()),
                  (2, 4_000, 3_999, "open", frozenset()),
                  (3, 3_999, 0, "paid", frozenset({"invoice.paid"})))],
        ]),
        Example("Example 5", "Refund settlement refunds cash only: 50.00 back, 30.00 to balance", [
            Step("invoice 200.00, 150.00 balance, 50.00 paid", "invoice.finalized",
                 invoice(run, "05", [line("il_1", 1, 20_000)], status="paid",
                         customer_balance_applied=15_000, amount_paid=5_000)),
            Step("SLA credit 80.00, refund", "sla.breached",
                 {"invoice_id": inv("05"), "sla_id": "sla-5", "credit_amount": 8_000,
                  "settlement": "refund"},
                 Expect("credit_note.issued", total=8_000, pre_payment=0, refund=5_000,
                        balance=3_000, remaining=0, status="paid",
                        events=frozenset({"refund.requested"}))),
        ]),
        Example("Example 6", "Return one of ten 10.00 lines with 50% off", [
            Step("invoice 50.00", "invoice.finalized",
                 invoice(run, "06", TEN_LINES, discounts=[{"percent_off_bps": 5_000}])),
            Step("return il_3", "return.received",
                 {"invoice_id": inv("06"), "return_id": "ret-6",
                  "lines": [{"invoice_line_id": "il_3", "quantity": 1}]},
                 Expect("credit_note.issued", total=500, pre_payment=500, remaining=4_500,
                        status="open")),
        ]),
        Example("Example 7", "Return one of ten 10.00 lines with 10.00 off", [
            Step("invoice 90.00", "invoice.finalized",
                 invoice(run, "07", TEN_LINES, discounts=[{"amount_off": 1_000}])),
            Step("return il_3", "return.received",
                 {"invoice_id": inv("07"), "return_id": "ret-7",
                  "lines": [{"invoice_line_id": "il_3", "quantity": 1}]},
                 Expect("credit_note.issued", total=900, pre_payment=900, remaining=8_100,
                        status="open")),
        ]),
        Example("Example 10", "SLA breach of 10% on a paid 5,000.00 invoice", [
            Step("paid invoice 5,000.00", "invoice.finalized",
                 invoice(run, "10", [line("il_1", 1, 500_000)], status="paid",
                         amount_paid=500_000)),
            Step("SLA breach 1000 bps", "sla.breached",
                 {"invoice_id": inv("10"), "sla_id": "sla-10", "credit_bps": 1_000},
                 Expect("credit_note.issued", total=50_000, pre_payment=0, balance=50_000,
                        remaining=0, status="paid")),
        ]),
        Example("Example 11", "Cancellation on 16 Oct of a 31.00 plan with 20% tax", [
            Step("paid invoice 37.20", "invoice.finalized",
                 invoice(run, "11", [line("il_1", 1, 3_100, 2_000, "Plan", OCTOBER)],
                         status="paid", amount_paid=3_720)),
            Step("cancel 16 Oct 00:00", "subscription.canceled",
                 {"invoice_id": inv("11"), "invoice_line_id": "il_1",
                  "canceled_at": "2026-10-16T00:00:00Z"},
                 Expect("credit_note.issued", total=1_920, pre_payment=0, refund=1_920,
                        remaining=0, status="paid", events=frozenset({"refund.requested"}))),
        ]),
        Example("Example 13", "Cancellation after half the units were returned", [
            Step("paid invoice 100.00", "invoice.finalized",
                 invoice(run, "13", [line("il_1", 10, 1_000, 0, "Seat", OCTOBER)],
                         status="paid", amount_paid=10_000)),
            Step("return 5 units", "return.received",
                 {"invoice_id": inv("13"), "return_id": "rma-13",
                  "lines": [{"invoice_line_id": "il_1", "quantity": 5}]},
                 Expect("credit_note.issued", total=5_000, pre_payment=0, refund=5_000,
                        remaining=0, status="paid", events=frozenset({"refund.requested"}))),
            Step("cancel 16 Oct 00:00", "subscription.canceled",
                 {"invoice_id": inv("13"), "invoice_line_id": "il_1",
                  "canceled_at": "2026-10-16T00:00:00Z"},
                 Expect("credit_note.issued", total=2_581, pre_payment=0, refund=2_581,
                        remaining=0, status="paid", events=frozenset({"refund.requested"}))),
        ]),
        Example("Example 14", "Downgrade, then a cancellation credits only uncovered time", [
            Step("paid invoice 100.00", "invoice.finalized",
                 invoice(run, "14", [line("il_1", 10, 1_000, 0, "Seat", OCTOBER)],
                         status="paid", amount_paid=10_000)),
            Step("downgrade 16 Oct 00:00", "subscription.downgraded",
                 {"invoice_id": inv("14"), "invoice_line_id": "il_1",
                  "effective_at": "2026-10-16T00:00:00Z"},
                 Expect("credit_note.issued", total=5_161, pre_payment=0, balance=5_161,
                        remaining=0, status="paid")),
            Step("cancel 21 Oct 00:00", "subscription.canceled",
                 {"invoice_id": inv("14"), "invoice_line_id": "il_1",
                  "canceled_at": "2026-10-21T00:00:00Z"},
                 Expect("credit_note.rejected", reason="nothing_left_to_credit")),
            Step("or cancel 11 Oct 00:00", "subscription.canceled",
                 {"invoice_id": inv("14"), "invoice_line_id": "il_1",
                  "canceled_at": "2026-10-11T00:00:00Z"},
                 Expect("credit_note.issued", total=1_613, pre_payment=0, refund=1_613,
                        remaining=0, status="paid", events=frozenset({"refund.requested"}))),
        ]),
        Example("Downgrade", "Unused time of the old plan goes to the customer balance", [
            Step("paid invoice 31.00", "invoice.finalized",
                 invoice(run, "dg", [line("il_1", 1, 3_100, 0, "Pro plan", OCTOBER)],
                         status="paid", amount_paid=3_100)),
            Step("downgrade 21 Oct 12:00", "subscription.downgraded",
                 {"invoice_id": inv("dg"), "invoice_line_id": "il_1",
                  "effective_at": "2026-10-21T12:00:00Z"},
                 Expect("credit_note.issued", total=1_050, pre_payment=0, balance=1_050,
                        remaining=0, status="paid")),
        ]),
    ]


class Outputs:
    """Reads every output topic from its end at start, indexing events as they come."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._consumer = AIOKafkaConsumer(**connection_options(settings),
                                          enable_auto_commit=False)
        self.by_trigger: dict[str, dict[str, Any]] = {}
        self.by_credit_note: dict[str, set[str]] = {}
        self.count = 0

    async def start(self) -> None:
        await self._consumer.start()
        partitions = []
        for topic in self._settings.topics.outputs():
            for partition in self._consumer.partitions_for_topic(topic) or {0}:
                partitions.append(TopicPartition(topic, partition))
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for partition in partitions:
            await self._consumer.position(partition)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def poll(self) -> None:
        batches = await self._consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for record in records:
                event = json.loads(record.value)
                data = event.get("data", {})
                self.count += 1
                trigger = data.get("trigger") or {}
                if event["type"].startswith("credit_note.") and "id" in trigger:
                    self.by_trigger[trigger["id"]] = event
                elif "credit_note_id" in data:
                    self.by_credit_note.setdefault(data["credit_note_id"], set()).add(event["type"])

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                return False
            await self.poll()
        return True


CURRENCY = "usd"  # every example's invoice


def money(amount: int | None) -> str:
    """Major units of the demo's currency; the column headers name the currency."""
    return "" if amount is None else major_units(amount, CURRENCY)


async def run_demo(settings: Settings, console: Console, timeout_s: float = 90.0) -> bool:
    """Publish every example, check what comes out; True when every figure matched."""
    run = secrets.token_hex(3)
    producer = AIOKafkaProducer(**connection_options(settings), enable_idempotence=False,
                                acks="all")
    outputs = Outputs(settings)
    await producer.start()
    await outputs.start()
    all_ok = True
    notes: dict[str, str] = {}
    try:
        console.print(f"[bold]creditnotes demo[/] (run {run}): the docs/rules.md worked examples, "
                      "published as CloudEvents, checked against what the service publishes")
        for example in examples(run):
            table = _table(f"{example.name}: {example.title} (amounts in {CURRENCY.upper()})")
            for index, step in enumerate(example.steps):
                event_id = f"demo-{run}-{example.name.split()[-1]}-{index}"
                data = step.data(notes) if callable(step.data) else step.data
                topic = _topic(settings, step.type)
                key = data.get("invoice_id") or data.get("invoice", {}).get("id")
                await producer.send_and_wait(topic, key=key.encode() if key else None,
                                             value=json.dumps({
                    "specversion": "1.0", "id": event_id, "source": SOURCE, "type": step.type,
                    "datacontenttype": "application/json", "data": data}).encode(),
                    headers=[("content-type", b"application/cloudevents+json")])
                if step.expect is None:
                    table.add_row(step.label, "[dim]published")
                    continue
                ok, cells = await _check(outputs, event_id, step.expect, notes, step.label,
                                         timeout_s)
                all_ok &= ok
                table.add_row(step.label, *cells, "[green]✓" if ok else "[red]✗ mismatch")
            console.print(table)
    finally:
        await producer.stop()
        await outputs.stop()
    verdict = ("[bold green]every example matched docs/rules.md" if all_ok
               else "[bold red]some figures differ from docs/rules.md")
    console.print(verdict)
    return all_ok


def _table(title: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    numeric = ("total", "pre-payment", "refund", "balance", "out of band")
    for column in ("step", "outcome", "credit note", *numeric, "invoice after", "other events",
                   "check"):
        table.add_column(column, justify="right" if column in numeric else "left", no_wrap=True)
    return table


async def _check(outputs: Outputs, event_id: str, expect: Expect, notes: dict[str, str],
                 label: str, timeout_s: float) -> tuple[bool, list[str]]:
    if not await outputs.wait_for(lambda: event_id in outputs.by_trigger, timeout_s):
        return False, ["[red]nothing came out", *[""] * 8]
    event = outputs.by_trigger[event_id]
    data = event["data"]
    note_id = data.get("id")
    if event["type"] == "credit_note.issued":
        notes[label] = note_id
    if expect.events:
        await outputs.wait_for(
            lambda: expect.events <= outputs.by_credit_note.get(note_id, set()), 10)
    events = {event["type"], *outputs.by_credit_note.get(note_id, set())} if note_id else {
        event["type"]}
    after = data.get("invoice", {})
    got = {
        "outcome": event["type"], "total": data.get("total"),
        "pre": data.get("pre_payment_amount"), "refund": data.get("refund_amount", 0),
        "balance": data.get("credit_amount", 0), "oob": data.get("out_of_band_amount", 0),
        "remaining": after.get("amount_remaining"), "status": after.get("status"),
        "reason": data.get("reason") if event["type"] == "credit_note.rejected" else None,
        # customer_balance.credited (the money loop) is checked once the service publishes it
        "events": events - {event["type"], "customer_balance.credited"},
    }
    wanted = {
        "outcome": expect.outcome, "total": expect.total, "pre": expect.pre_payment,
        "refund": expect.refund, "balance": expect.balance, "oob": expect.out_of_band,
        "remaining": expect.remaining, "status": expect.status, "reason": expect.reason,
        "events": set(expect.events),
    }
    if event["type"] == "credit_note.voided":
        for name in ("pre", "refund", "balance", "oob"):
            got[name] = wanted[name]  # a void event carries the total and the invoice only
    if event["type"] == "credit_note.rejected":
        got.update(total=None, pre=None, remaining=None, status=None, refund=None, balance=None,
                   oob=None)
        wanted.update(refund=None, balance=None, oob=None)
    ok = got == wanted
    outcome = event["type"].removeprefix("credit_note.")
    if got["reason"]:
        outcome += f" ({got['reason']})"
    invoice_after = (f"{money(got['remaining'])} {CURRENCY.upper()} due, {got['status']}"
                     if got["remaining"] is not None else "unchanged")
    return ok, [outcome, data.get("number", ""), money(got["total"]), money(got["pre"]),
                money(got["refund"]), money(got["balance"]), money(got["oob"]), invoice_after,
                ", ".join(sorted(got["events"]))]

