"""``creditnotes demo``: the docs/rules.md worked examples, as upstream events, end to end.

Publishes each example's invoice, payments, commands and refund outcomes as
CloudEvents, waits for what the service publishes in return, and prints a
table of every credit note, refund outcome and payment, the invoice after it
and the events out, each checked against the figures docs/rules.md gives. Any
mismatch makes the command exit non-zero.

Payments publish nothing (unless they overpay), so the demo waits for each to
be in the service's processed-message ledger before it goes on (a credit note
on another topic could otherwise overtake it), and reads the invoice's amount
paid from the database. Refund outcomes (example 16) are published with the
refund ids the demo read from ``refund.requested``, as a payment system would.

Ids carry a per-run suffix, so the demo can run again on the same database.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from service.adapters.kafka_producer import connection_options
from service.entrypoints.display import major_units
from service.settings import Settings

SOURCE = "/creditnotes/demo"
Data = dict[str, Any] | Callable[[dict[str, str]], dict[str, Any]]


#: (payment_id, amount) of a refund; payment_id None: the payment recorded at finalization
RefundOnPayment = tuple[str | None, int]
#: (reason, amount) of a customer_balance.credited
BalanceCredit = tuple[str, int]


@dataclass(frozen=True)
class Expect:
    #: credit_note.issued | .voided | .rejected | .refund_succeeded | .refund_failed | payment
    outcome: str
    total: int | None = None
    pre_payment: int | None = None
    refund: int = 0
    balance: int = 0
    out_of_band: int = 0
    remaining: int | None = None
    status: str | None = None
    reason: str | None = None
    events: frozenset[str] = frozenset()
    #: the refunds requested (``refund.requested``, in order) and the credit note's refunds
    #: that are new, not linked; None: not checked beyond ``refund``
    refunds: tuple[RefundOnPayment, ...] | None = None
    #: the linked refunds on the credit note (``refunds`` with ``linked: true``)
    linked: tuple[RefundOnPayment, ...] = ()
    refund_status: str | None = None
    #: customer_balance.credited for this step; None: ``balance`` as reason credit_note
    balance_credits: tuple[BalanceCredit, ...] | None = None
    amount_paid: int | None = None

    def credits(self) -> tuple[BalanceCredit, ...]:
        if self.balance_credits is not None:
            return self.balance_credits
        return (("credit_note", self.balance),) if self.balance else ()


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
        "refund.succeeded": topics.refund_results, "refund.failed": topics.refund_results,
    }.get(type_, topics.invoices if type_.startswith("invoice.")
          else topics.credit_note_commands)


def examples(run: str) -> list[Example]:
    """docs/rules.md worked examples 1 to 18 in order (as events), then a downgrade."""
    def number(example: Example) -> int:
        last = example.name.split()[-1]
        return int(last) if last.isdigit() else 99

    return sorted(_examples(run), key=number)


def _examples(run: str) -> list[Example]:
    def inv(key: str) -> str:
        return f"in_{key}_{run}"

    return [*_money_loop_examples(run, inv),
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


def _refund_outcome(invoice_id: str, note_label: str, payment_id: str,
                    failure_reason: str | None = None) -> Data:
    """A payment system's answer for the refund the demo read from ``refund.requested``."""
    def data(notes: dict[str, str]) -> dict[str, Any]:
        outcome = {"refund_id": notes[refund_key(note_label, payment_id)],
                   "invoice_id": invoice_id}
        return outcome | ({"failure_reason": failure_reason} if failure_reason else {})
    return data


def refund_key(note_label: str, payment_id: str | None) -> str:
    return f"{note_label} / refund on {payment_id}"


def _money_loop_examples(run: str, inv: Callable[[str], str]) -> list[Example]:
    """Examples 15 to 18: payments, refunds per payment and their outcomes, linked refunds."""
    def pay(key: str, payment_id: str, amount: int) -> dict[str, Any]:
        return {"invoice_id": inv(key), "amount": amount, "currency": "usd",
                "payment_id": payment_id}

    linked = f"re_1_{run}"  # a refund id appears once, ever: one per run
    return [
        Example("Example 15", "Refunds go back to the newest payment first, capped per payment", [
            Step("invoice 100.00", "invoice.finalized", invoice(run, "15", [line("il_1", 1, 10_000)])),
            Step("pay_1 pays 60.00", "invoice.payment_succeeded", pay("15", "pay_1", 6_000)),
            Step("pay_2 pays 40.00", "invoice.payment_succeeded", pay("15", "pay_2", 4_000)),
            Step("credit 70.00", "credit_note.issue",
                 {"invoice_id": inv("15"), "amount": 7_000, "refund_amount": 7_000},
                 Expect("credit_note.issued", total=7_000, pre_payment=0, refund=7_000,
                        remaining=0, status="paid", events=frozenset({"refund.requested"}),
                        refunds=(("pay_2", 4_000), ("pay_1", 3_000)),
                        refund_status="pending")),
        ]),
        Example("Example 16", "A failed refund goes to the balance and its cash is refundable again", [
            Step("pay_2's refund fails", "refund.failed",
                 _refund_outcome(inv("15"), "credit 70.00", "pay_2", "card expired"),
                 Expect("credit_note.refund_failed", refund=4_000, balance=4_000,
                        refund_status="pending",
                        balance_credits=(("refund_failed", 4_000),),
                        events=frozenset({"customer_balance.credited"}))),
            Step("pay_1's refund succeeds", "refund.succeeded",
                 _refund_outcome(inv("15"), "credit 70.00", "pay_1"),
                 Expect("credit_note.refund_succeeded", refund=3_000,
                        refund_status="partially_failed")),
            Step("credit 30.00", "credit_note.issue",
                 {"invoice_id": inv("15"), "amount": 3_000, "refund_amount": 3_000},
                 Expect("credit_note.issued", total=3_000, pre_payment=0, refund=3_000,
                        remaining=0, status="paid", events=frozenset({"refund.requested"}),
                        refunds=(("pay_2", 3_000),), refund_status="pending")),
        ]),
        Example("Example 17", "A refund made in the payment system, linked once", [
            Step("paid invoice 50.00", "invoice.finalized",
                 invoice(run, "17", [line("il_1", 1, 5_000)], status="paid")),
            Step("credit 20.00 linking re_1", "credit_note.issue",
                 {"invoice_id": inv("17"), "amount": 2_000,
                  "refunds": [{"refund_id": linked, "amount": 2_000}]},
                 Expect("credit_note.issued", total=2_000, pre_payment=0, refund=2_000,
                        remaining=0, status="paid", refunds=(), linked=((None, 2_000),),
                        refund_status="succeeded")),
            Step("credit 10.00 linking re_1 again", "credit_note.issue",
                 {"invoice_id": inv("17"), "amount": 1_000,
                  "refunds": [{"refund_id": linked, "amount": 1_000}]},
                 Expect("credit_note.rejected", reason="refund_already_linked")),
        ]),
        Example("Example 18", "A payment that races a credit note: the overpayment goes to the balance", [
            Step("invoice 100.00", "invoice.finalized", invoice(run, "18", [line("il_1", 1, 10_000)])),
            Step("credit 30.00", "credit_note.issue", {"invoice_id": inv("18"), "amount": 3_000},
                 Expect("credit_note.issued", total=3_000, pre_payment=3_000, remaining=7_000,
                        status="open")),
            Step("pay_1 pays 100.00", "invoice.payment_succeeded", pay("18", "pay_1", 10_000),
                 Expect("payment", balance=3_000, status="paid", amount_paid=7_000,
                        balance_credits=(("overpayment", 3_000),),
                        events=frozenset({"customer_balance.credited"}))),
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
        #: every event read, in the order read (per topic and key: the order published)
        self.events: list[dict[str, Any]] = []
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
                self.events.append(event)
                trigger = data.get("trigger") or {}
                if event["type"].startswith("credit_note.") and "id" in trigger:
                    self.by_trigger[trigger["id"]] = event
                elif "credit_note_id" in data:
                    self.by_credit_note.setdefault(data["credit_note_id"], set()).add(event["type"])

    def find(self, type_: str, **fields: Any) -> list[dict[str, Any]]:
        """The events of this type whose ``data`` has these values, in the order read."""
        return [event for event in self.events if event["type"] == type_ and all(
            event["data"].get(name) == value for name, value in fields.items())]

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


@dataclass
class Context:
    """What one demo run needs while it checks: the outputs read, the database, what it saw."""

    outputs: Outputs
    database: asyncpg.Connection
    timeout_s: float
    #: step label -> credit note id; refund_key(label, payment_id) -> refund id
    notes: dict[str, str] = field(default_factory=dict)
    #: credit note id -> its number
    numbers: dict[str, str] = field(default_factory=dict)


async def run_demo(settings: Settings, console: Console, timeout_s: float = 90.0,
                   only: frozenset[str] | None = None) -> bool:
    """Publish every example (or those named in ``only``), check what comes out.

    True when every figure matched.
    """
    run = secrets.token_hex(3)
    producer = AIOKafkaProducer(**connection_options(settings), enable_idempotence=False,
                                acks="all")
    outputs = Outputs(settings)
    database = await asyncpg.connect(settings.database_url)
    await producer.start()
    await outputs.start()
    all_ok = True
    context = Context(outputs, database, timeout_s)
    try:
        console.print(f"[bold]creditnotes demo[/] (run {run}): the docs/rules.md worked examples, "
                      "published as CloudEvents, checked against what the service publishes")
        for example in examples(run):
            if only is not None and example.name not in only:
                continue
            table = _table(f"{example.name}: {example.title} (amounts in {CURRENCY.upper()})")
            for index, step in enumerate(example.steps):
                event_id = f"demo-{run}-{example.name.split()[-1]}-{index}"
                data = step.data(context.notes) if callable(step.data) else step.data
                topic = _topic(settings, step.type)
                key = data.get("invoice_id") or data.get("invoice", {}).get("id")
                await producer.send_and_wait(topic, key=key.encode() if key else None,
                                             value=json.dumps({
                    "specversion": "1.0", "id": event_id, "source": SOURCE, "type": step.type,
                    "datacontenttype": "application/json", "data": data}).encode(),
                    headers=[("content-type", b"application/cloudevents+json")])
                if step.type == "invoice.payment_succeeded" and not await _processed(
                        context, event_id):
                    all_ok = False
                    table.add_row(step.label, "[red]not applied", *[""] * 8, "[red]✗ mismatch")
                    continue
                if step.expect is None:
                    applied = step.type == "invoice.payment_succeeded"
                    table.add_row(step.label, "[dim]applied" if applied else "[dim]published")
                    continue
                ok, cells = await _check(context, event_id, step, data)
                all_ok &= ok
                table.add_row(step.label, *cells, "[green]✓" if ok else "[red]✗ mismatch")
            console.print(table)
    finally:
        await producer.stop()
        await outputs.stop()
        await database.close()
    verdict = ("[bold green]every example matched docs/rules.md" if all_ok
               else "[bold red]some figures differ from docs/rules.md")
    console.print(verdict)
    return all_ok


async def _processed(context: Context, event_id: str) -> bool:
    """Wait until the service's ledger shows this event applied (a payment publishes nothing)."""
    deadline = time.monotonic() + context.timeout_s
    while time.monotonic() < deadline:
        outcome = await context.database.fetchval(
            "SELECT outcome FROM processed_messages WHERE source = $1 AND id = $2",
            SOURCE, event_id)
        if outcome is not None:
            return bool(outcome == "applied")
        await context.outputs.poll()  # keep reading meanwhile
    return False


def _table(title: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    numeric = ("total", "pre-payment", "refund", "balance", "out of band")
    for column in ("step", "outcome", "credit note", *numeric, "invoice after", "other events",
                   "check"):
        # every column keeps its figures whole; the events out take a line each
        table.add_column(column, justify="right" if column in numeric else "left",
                         no_wrap=column != "other events", min_width=12 if column == "other events" else None)
    return table


async def _check(context: Context, event_id: str, step: Step,
                 data: dict[str, Any]) -> tuple[bool, list[str]]:
    assert step.expect is not None
    if step.expect.outcome == "payment":
        return await _check_payment(context, data, step.expect)
    if step.type.startswith("refund."):
        return await _check_refund_outcome(context, data, step.expect)
    return await _check_credit_note(context, event_id, step.expect, step.label)


async def _check_credit_note(context: Context, event_id: str, expect: Expect,
                             label: str) -> tuple[bool, list[str]]:
    outputs = context.outputs
    if not await outputs.wait_for(lambda: event_id in outputs.by_trigger, context.timeout_s):
        return False, ["[red]nothing came out", *[""] * 8]
    event = outputs.by_trigger[event_id]
    data = event["data"]
    note_id = data.get("id")
    if event["type"] == "credit_note.issued":
        context.notes[label] = note_id
        context.numbers[note_id] = data["number"]
    wanted_events = set(expect.events)
    credits = expect.credits() if event["type"] == "credit_note.issued" else ()
    if credits:
        wanted_events.add("customer_balance.credited")
    requested = expect.refunds if expect.refunds is not None else ()
    if wanted_events:
        await outputs.wait_for(
            lambda: wanted_events <= outputs.by_credit_note.get(note_id, set())
            and len(outputs.find("refund.requested", credit_note_id=note_id)) >= len(requested)
            and len(_balance_credits(outputs, credit_note_id=note_id)) >= len(credits), 10)
    if event["type"] == "credit_note.issued" and expect.refunds == ():
        # nothing may be requested: read on a moment, to see one that should not come
        await outputs.wait_for(lambda: False, 1)
    for refund in outputs.find("refund.requested", credit_note_id=note_id):
        # what a payment system answers with (example 16)
        context.notes[refund_key(label, refund["data"].get("payment_id"))] = refund["data"]["id"]
    events = {event["type"], *outputs.by_credit_note.get(note_id, set())} if note_id else {
        event["type"]}
    after = data.get("invoice", {})
    got = {
        "outcome": event["type"], "total": data.get("total"),
        "pre": data.get("pre_payment_amount"), "refund": data.get("refund_amount", 0),
        "balance": data.get("credit_amount", 0), "oob": data.get("out_of_band_amount", 0),
        "remaining": after.get("amount_remaining"), "status": after.get("status"),
        "reason": data.get("reason") if event["type"] == "credit_note.rejected" else None,
        "events": events - {event["type"]},
    }
    wanted: dict[str, Any] = {
        "outcome": expect.outcome, "total": expect.total, "pre": expect.pre_payment,
        "refund": expect.refund, "balance": expect.balance, "oob": expect.out_of_band,
        "remaining": expect.remaining, "status": expect.status, "reason": expect.reason,
        "events": wanted_events,
    }
    details = []
    if event["type"] == "credit_note.issued":
        refunds = outputs.find("refund.requested", credit_note_id=note_id)
        got["requested"] = [(r["data"].get("payment_id"), r["data"]["amount"]) for r in refunds]
        got["refunds"] = [(r.get("payment_id"), r["amount"], r.get("linked"))
                          for r in data.get("refunds", [])]
        got["refund_status"] = data.get("refund_status")
        got["credits"] = [(c["data"]["reason"], c["data"]["amount"])
                          for c in _balance_credits(outputs, credit_note_id=note_id)]
        wanted["requested"] = [*requested] if expect.refunds is not None else got["requested"]
        wanted["refunds"] = ([(p, a, True) for p, a in expect.linked]
                             + [(p, a, False) for p, a in requested]
                             if expect.refunds is not None else got["refunds"])
        wanted["refund_status"] = expect.refund_status or got["refund_status"]
        wanted["credits"] = [*credits]
        details += _requested_cell(got["requested"], got["refunds"], got["refund_status"])
        details += _credits_cell(got["credits"])
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
    others = sorted(got["events"] - {"refund.requested", "customer_balance.credited"})
    return ok, [outcome, data.get("number", ""), money(got["total"]), money(got["pre"]),
                money(got["refund"]), money(got["balance"]), money(got["oob"]), invoice_after,
                "\n".join([*others, *details])]


async def _check_refund_outcome(context: Context, data: dict[str, Any],
                                expect: Expect) -> tuple[bool, list[str]]:
    """A refund outcome: the credit note's event, and the balance credit of a failure."""
    outputs = context.outputs
    refund_id = data["refund_id"]
    if not await outputs.wait_for(lambda: bool(outputs.find(expect.outcome, refund_id=refund_id)),
                                  context.timeout_s):
        return False, ["[red]nothing came out", *[""] * 8]
    event = outputs.find(expect.outcome, refund_id=refund_id)[0]["data"]
    credits = expect.credits()
    await outputs.wait_for(
        lambda: len(_balance_credits(outputs, refund_id=refund_id)) >= len(credits), 10)
    got_credits = [(c["data"]["reason"], c["data"]["amount"])
                   for c in _balance_credits(outputs, refund_id=refund_id)]
    balance = sum(amount for _, amount in got_credits)
    got = {"refund": event.get("amount"), "balance": balance,
           "refund_status": event.get("refund_status"), "credits": got_credits}
    wanted = {"refund": expect.refund, "balance": expect.balance,
              "refund_status": expect.refund_status, "credits": [*credits]}
    outcome = expect.outcome.removeprefix("credit_note.")
    if event.get("resettled_to"):
        outcome += f" (to {event['resettled_to']})"
    details = [f"refund_status {event.get('refund_status')}", *_credits_cell(got_credits)]
    note = event.get("credit_note_id", "")
    return got == wanted, [outcome, context.numbers.get(note, note), "", "", money(got["refund"]),
                           money(balance), "", "", "\n".join(details)]


async def _check_payment(context: Context, data: dict[str, Any],
                         expect: Expect) -> tuple[bool, list[str]]:
    """A payment publishes nothing but an overpayment; the invoice is read from the database."""
    outputs = context.outputs
    credits = expect.credits()
    match = {"invoice_id": data["invoice_id"], "payment_id": data.get("payment_id")}
    await outputs.wait_for(lambda: len(_balance_credits(outputs, **match)) >= len(credits),
                           context.timeout_s)
    got_credits = [(c["data"]["reason"], c["data"]["amount"])
                   for c in _balance_credits(outputs, **match)]
    row = await context.database.fetchrow(
        "SELECT amount_paid, status FROM invoices WHERE id = $1", data["invoice_id"])
    paid, status = (row["amount_paid"], row["status"]) if row else (None, None)
    balance = sum(amount for _, amount in got_credits)
    got = {"paid": paid, "status": status, "credits": got_credits}
    wanted = {"paid": expect.amount_paid, "status": expect.status, "credits": [*credits]}
    after = f"{money(paid)} {CURRENCY.upper()} paid, {status}" if row else "unknown"
    return got == wanted, ["applied", "", "", "", "", money(balance), "", after,
                           "\n".join(_credits_cell(got_credits))]


def _balance_credits(outputs: Outputs, **fields: Any) -> list[dict[str, Any]]:
    return outputs.find("customer_balance.credited", **fields)


def _requested_cell(requested: list[tuple[str | None, int]],
                    refunds: list[tuple[str | None, int, bool | None]],
                    refund_status: str | None) -> list[str]:
    cells = []
    if requested:
        cells.append("refund.requested " + ", ".join(
            f"{money(amount)} on {payment or 'the finalization payment'}"
            for payment, amount in requested))
    linked = [(payment, amount) for payment, amount, is_linked in refunds if is_linked]
    if linked:
        cells.append("linked " + ", ".join(money(amount) for _, amount in linked))
    if refund_status not in (None, "none"):
        cells.append(f"refund_status {refund_status}")
    return cells


def _credits_cell(credits: list[tuple[str, int]]) -> list[str]:
    return [f"customer_balance.credited {money(amount)} ({reason})" for reason, amount in credits]
