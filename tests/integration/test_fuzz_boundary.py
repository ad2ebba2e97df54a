"""Fuzzing the boundary on the real service: every record gets exactly one outcome.

Hypothesis builds valid CloudEvents for every input type on every input topic and
mutates them the way a hostile or careless upstream would: huge, negative and
floating numbers, NaN and Infinity tokens, naive and far-future times, long and
non-ASCII strings (four-byte characters too), control characters, deep nesting,
wrong types, missing and extra fields, binary content mode (``ce_*`` headers),
invalid UTF-8, empty values and tombstones. Every string carries personal data.

Each bad record is followed, on the same topic and partition (same key), by a
known-good record. One Hypothesis example is a whole batch of such pairs, sent
through the real running service at once (a service round trip per record would
not fit CI's budget). The invariant, per example:

- every record sent gets exactly one outcome (applied, rejected, duplicate: its
  "message processed" log line and, for the first two, its ledger row; or one
  dead letter naming its offset) within a bounded time;
- every good record is applied;
- no dead-letter header and no log line carries the personal data;
- ``creditnotes verify`` finds every invariant of the database intact.

``CREDITNOTES_FUZZ_EXAMPLES`` sets how many examples run (default 4, about 30
records each); a long run: ``CREDITNOTES_FUZZ_EXAMPLES=200``.
"""

from __future__ import annotations

import copy
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from service.domain.commands import Trigger
from service.domain.credit_note import derived_id
from service.domain.refunds import PaymentCash, refund_id_for
from service.settings import Settings
from tests.support import SOURCE, Kafka, RunningService, cloudevent, creditnotes, fetch

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("CREDITNOTES_FUZZ_EXAMPLES", "4"))
PAIRS = 30  # bad records per example, each followed by a good one
OUTCOME_TIMEOUT_S = 90.0
MARKER = "jane.roe@example.com"
NAME = "Jane Roe"
PERSONAL = (MARKER, NAME, MARKER.encode("unicode_escape").decode())
CE_JSON = ("content-type", b"application/cloudevents+json")
PERIOD = {"start": "2026-10-01T00:00:00Z", "end": "2026-10-31T00:00:00Z"}
MID = "2026-10-16T00:00:00Z"
FOUR_BYTE = "".join(chr(0x20000 + (n * 7_919) % 40_000) for n in range(1_024))

#: topic attribute -> the types it reads
TYPES = {
    "invoices": ["invoice.finalized", "invoice.payment_succeeded", "invoice.voided",
                 "invoice.marked_uncollectible"],
    "credit_note_commands": ["credit_note.issue", "credit_note.void", "credit_note.update"],
    "refund_results": ["refund.succeeded", "refund.failed"],
    "returns": ["return.received"],
    "sla_breaches": ["sla.breached"],
    "downgrades": ["subscription.downgraded"],
    "cancellations": ["subscription.canceled"],
}
ALL_TYPES = [type_ for types in TYPES.values() for type_ in types]

# ----------------------------------------------------------------------- valid events


def invoice(invoice_id: str, *, paid: bool = False) -> dict[str, Any]:
    return {"invoice": {
        "id": invoice_id, "number": f"N-{invoice_id}", "customer_id": "cus_fuzz",
        "currency": "usd", "status": "paid" if paid else "open",
        "amount_paid": 100_000 if paid else 0,
        "lines": [{"id": "il_1", "description": f"Plan for {NAME}", "quantity": 10,
                   "unit_amount": 10_000, "period": dict(PERIOD)}]}}


def data_of(type_: str, invoice_id: str, tag: str) -> dict[str, Any]:
    """Valid data of ``type_`` about ``invoice_id``."""
    return {
        "invoice.finalized": lambda: invoice(f"{invoice_id}-new"),
        "invoice.payment_succeeded": lambda: {"invoice_id": invoice_id, "amount": 1_000,
                                              "currency": "usd", "payment_id": f"pay-{tag}"},
        "invoice.voided": lambda: {"invoice_id": invoice_id},
        "invoice.marked_uncollectible": lambda: {"invoice_id": invoice_id},
        "credit_note.issue": lambda: {"invoice_id": invoice_id, "amount": 1_000,
                                      "memo": f"For {NAME}", "metadata": {"ticket": MARKER},
                                      "effective_at": MID,
                                      "refunds": [{"refund_id": f"re-{tag}", "amount": 100}]},
        "credit_note.void": lambda: {"credit_note_id": f"cn_{tag}"},
        "credit_note.update": lambda: {"credit_note_id": f"cn_{tag}", "memo": f"For {NAME}",
                                       "metadata": {"ticket": MARKER, "old": None}},
        "refund.succeeded": lambda: {"refund_id": f"rf_{tag}", "invoice_id": invoice_id},
        "refund.failed": lambda: {"refund_id": f"rf_{tag}", "invoice_id": invoice_id,
                                  "failure_reason": f"Card of {NAME} <{MARKER}> expired"},
        "return.received": lambda: {"invoice_id": invoice_id, "return_id": f"r-{tag}",
                                    "lines": [{"invoice_line_id": "il_1", "quantity": 1}]},
        "sla.breached": lambda: {"invoice_id": invoice_id, "sla_id": f"s-{tag}",
                                 "credit_amount": 100},
        "subscription.downgraded": lambda: {"invoice_id": invoice_id,
                                            "invoice_line_id": "il_1", "effective_at": MID},
        "subscription.canceled": lambda: {"invoice_id": invoice_id, "invoice_line_id": "il_1",
                                          "canceled_at": MID},
    }[type_]()


def refund_of(good_invoice: str, tag: str) -> str:
    """The refund id of :func:`refunded_credit`: its credit note's, on the payment at
    finalization (the good invoices are paid then)."""
    note = derived_id("cn", Trigger(SOURCE, f"setup-{tag}", "credit_note.issue"))
    return refund_id_for(note, PaymentCash(0, None, 100_000))


def refunded_credit(good_invoice: str, tag: str) -> dict[str, Any]:
    """A credit of a good invoice refunded in cash: its refund is what the good outcome settles."""
    return cloudevent("credit_note.issue", {"invoice_id": good_invoice, "amount": 1_000,
                                            "refund_amount": 1_000}, id_=f"setup-{tag}")


def good_event(topic: str, good_invoice: str, tag: str) -> dict[str, Any]:
    """A record that must be applied: on ``invoices`` a new invoice, on ``refund_results``
    the outcome of a pending refund, elsewhere a credit."""
    type_ = {"invoices": "invoice.finalized", "credit_note_commands": "credit_note.issue"
             }.get(topic, TYPES[topic][0])
    if topic == "invoices":
        data = invoice(good_invoice)
    elif topic == "refund_results":
        data = {"refund_id": refund_of(good_invoice, tag), "invoice_id": good_invoice}
    elif topic == "sla_breaches":
        data = {"invoice_id": good_invoice, "sla_id": f"s-{tag}", "credit_amount": 100}
    else:
        data = data_of(type_, good_invoice, tag)
    return cloudevent(type_, data, id_=f"good-{tag}")


# ----------------------------------------------------------------------- mutations

RAW = {  # placeholders replaced in the encoded JSON text by what json.dumps cannot write
    "@@BIGINT@@": "1" + "0" * 5_000,
    "@@NAN@@": "NaN", "@@INF@@": "Infinity", "@@-INF@@": "-Infinity",
    "@@DEEP50@@": "[" * 50 + "]" * 50, "@@DEEP3000@@": "[" * 3_000 + "]" * 3_000,
    "@@DEEPOBJ@@": '{"a":' * 900 + "1" + "}" * 900,
}

TEXTS = st.one_of(
    st.sampled_from(["", MARKER, NAME, f"{NAME} <{MARKER}>", MARKER + "x" * 10_000,
                     FOUR_BYTE + MARKER, FOUR_BYTE[:1_000], FOUR_BYTE[:200] + MARKER,
                     f"{MARKER}\n{NAME}", f"{NAME}\x85", f"{MARKER}\x00",
                     "\u202e" + MARKER, "2026-10-16T00:00:00", "2026-10-16T00:00:00+05:30",
                     "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00",
                     "9999-12-31T23:59:59Z", "2026-13-45T99:00:00Z", "usd", "eur", "il_1",
                     "refund", "customer_balance", "out_of_band", "invoice_line_item",
                     "custom_line_item", "paid", "open", "uncollectible", "1.0", "100"]),
    st.sampled_from(ALL_TYPES),
    st.text(max_size=30).map(lambda text: f"{text}{MARKER}"),
)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**15, 10**15 + 1, 10_000,
                     10_001, 1_000_000_000]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["@@BIGINT@@", "@@NAN@@", "@@INF@@", "@@-INF@@"]),
)
SHAPES = st.one_of(
    st.none(), st.booleans(), st.just([]), st.just({}),
    st.sampled_from(["@@DEEP50@@", "@@DEEP3000@@", "@@DEEPOBJ@@"]),
    st.lists(TEXTS, max_size=3), st.dictionaries(TEXTS, TEXTS, max_size=3),
)
VALUES = st.one_of(TEXTS, NUMBERS, SHAPES)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += [(*prefix, key), *paths(value, (*prefix, key))]
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += [(*prefix, index), *paths(value, (*prefix, index))]
    return found


def parent_of(document: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        document = document[part]
    return document


@dataclass
class Bad:
    topic: str
    type_: str
    value: bytes | None
    headers: list[tuple[str, bytes]]
    mutations: list[str]


@st.composite
def bad_records(draw: st.DrawFn, invoice_id: str, tag: str) -> Bad:
    topic = draw(st.sampled_from(sorted(TYPES)))
    type_ = draw(st.sampled_from(TYPES[topic]))
    event = copy.deepcopy(cloudevent(type_, data_of(type_, invoice_id, tag), id_=f"bad-{tag}"))
    mutations: list[str] = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        targets = paths(event)
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "extra"]))
        path = draw(st.sampled_from(targets))
        parent = parent_of(event, path)
        if kind == "set":
            parent[path[-1]] = draw(VALUES)
        elif kind == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif kind == "extra":
            holder = parent if isinstance(parent, dict) else event
            holder[draw(TEXTS)] = draw(VALUES)
        mutations.append(f"{kind} {'.'.join(map(str, path))[:60]}")
    headers = [CE_JSON]
    if draw(st.integers(min_value=0, max_value=4)) == 0:  # binary content mode
        mutations.append("binary mode")
        headers = [("content-type", b"application/json")] + [
            (f"ce_{name}", (value if isinstance(value, str) else json.dumps(value)).encode())
            for name, value in event.items() if name != "data"]
        body: Any = event.get("data")
    else:
        body = event
    value: bytes | None = encode(body).encode("utf-8", "surrogatepass")
    raw = draw(st.integers(min_value=0, max_value=11))
    if raw == 0:
        mutations.append("invalid utf-8")
        assert value is not None
        at = draw(st.integers(min_value=0, max_value=len(value)))
        value = value[:at] + b"\xff\xfe" + value[at:]
    elif raw == 1:
        mutations.append("truncated")
        assert value is not None
        value = value[:draw(st.integers(min_value=0, max_value=max(len(value) - 1, 0)))]
    elif raw == 2:
        mutations.append(draw(st.sampled_from(["empty value", "tombstone"])))
        value = b"" if mutations[-1] == "empty value" else None
    elif raw == 3 and len(headers) > 1:
        mutations.append("invalid utf-8 in a ce_ header")
        index = draw(st.integers(min_value=1, max_value=len(headers) - 1))
        headers[index] = (headers[index][0], headers[index][1] + b"\xc3\x28")
    return Bad(topic, type_, value, headers, mutations)


def encode(value: Any) -> str:
    text = json.dumps(value, allow_nan=True)
    for placeholder, raw in RAW.items():
        text = text.replace(f'"{placeholder}"', raw)
    return text


# ----------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Sent:
    role: str  # "bad" or "good"
    pair: int
    topic: str
    partition: int
    offset: int


def outcomes(kafka: Kafka, settings: Settings, logs: list[dict[str, Any]]
             ) -> Counter[tuple[str, int, int]]:
    """How many outcomes each (topic, partition, offset) got: log lines plus dead letters."""
    seen: Counter[tuple[str, int, int]] = Counter()
    for entry in logs:
        if entry.get("event") == "message processed":
            seen[(entry["topic"], entry["partition"], entry["offset"])] += 1
    for topic in settings.topics.inputs():
        for record in kafka.on(f"{topic}.dlq"):
            headers = record.headers
            seen[(headers["dlq.original.topic"].decode(),
                  int(headers["dlq.original.partition"]),
                  int(headers["dlq.original.offset"]))] += 1
    return seen


def processed_outcomes(logs: list[dict[str, Any]]) -> dict[tuple[str, int, int], str]:
    return {(entry["topic"], entry["partition"], entry["offset"]): str(entry["outcome"])
            for entry in logs if entry.get("event") == "message processed"}


async def wait_until_stored(settings: Settings, kafka: Kafka, ids: list[str]) -> None:
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while len(await fetch(settings, "SELECT 1 FROM invoices WHERE id = ANY($1::text[])",
                          ids)) < len(ids):
        assert time.monotonic() < deadline, "the setup's invoices were not stored"
        await kafka.poll()


def leaks(logs: list[dict[str, Any]], kafka: Kafka, settings: Settings) -> list[str]:
    """Personal data in a dead-letter header or in a log line (ids of processed messages,
    which are logged by design, excepted)."""
    found = []
    for topic in settings.topics.inputs():
        for record in kafka.on(f"{topic}.dlq"):
            for name, value in record.headers.items():
                text = value.decode("utf-8", "replace")
                if name.startswith("dlq.") and any(marker in text for marker in PERSONAL):
                    found.append(f"dead-letter header {name}: {text[:200]}")
    for entry in logs:
        shown = {key: value for key, value in entry.items()
                 if not (entry.get("event") == "message processed"
                         and key in {"event_id", "invoice_id", "credit_note_id"})}
        text = repr(shown)
        if any(marker in text for marker in PERSONAL):
            found.append(f"log line: {text[:300]}")
    return found


# no shrinking: an example costs seconds of real servers, and its report names each mutation
@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 4,
          phases=[Phase.explicit, Phase.reuse, Phase.generate], report_multiple_bugs=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
async def test_every_fuzzed_record_gets_one_outcome_and_the_good_record_after_it_applies(
        service: RunningService, kafka: Kafka, settings: Settings, data: st.DataObject) -> None:
    run = uuid.uuid4().hex[:8]
    pairs = []
    for n in range(PAIRS):
        invoice_id = f"fz{run}-{n}"
        bad = data.draw(bad_records(invoice_id, f"{run}-{n}"), label=f"bad record {n}")
        pairs.append((invoice_id, bad))
    topics = settings.topics
    # the invoices the bad records refer to, and a paid one per good credit
    setup = [(f"{invoice_id}", False) for invoice_id, _ in pairs] + [
        (f"{invoice_id}-good", True) for invoice_id, bad in pairs if bad.topic != "invoices"]
    for invoice_id, paid in setup:
        await kafka.publish(topics.invoices, cloudevent("invoice.finalized",
                                                        invoice(invoice_id, paid=paid)))
    await wait_until_stored(settings, kafka, [invoice_id for invoice_id, _ in setup])
    refunded = [f"{invoice_id}-good" for invoice_id, bad in pairs if bad.topic == "refund_results"]
    for n, (invoice_id, bad) in enumerate(pairs):
        if bad.topic == "refund_results":
            await kafka.publish(topics.credit_note_commands,
                                refunded_credit(f"{invoice_id}-good", f"{run}-{n}"))
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while len(await fetch(settings, "SELECT 1 FROM credit_notes WHERE invoice_id = ANY($1)",
                          refunded)) < len(refunded):
        assert time.monotonic() < deadline, "the setup's refunded credit notes were not stored"
        await kafka.poll()

    sent: list[Sent] = []
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        for n, (invoice_id, bad) in enumerate(pairs):
            topic = getattr(topics, bad.topic)
            good = good_event(bad.topic, f"{invoice_id}-good", f"{run}-{n}")
            for role, value, headers in (("bad", bad.value, bad.headers),
                                         ("good", json.dumps(good).encode(), [CE_JSON])):
                metadata = await kafka._producer.send_and_wait(
                    topic, value=value, key=invoice_id.encode(), headers=headers)
                sent.append(Sent(role, n, topic, metadata.partition, metadata.offset))

        def missing() -> list[Sent]:
            seen = outcomes(kafka, settings, logs)
            return [record for record in sent
                    if seen[(record.topic, record.partition, record.offset)] == 0]

        while missing():
            waiting = [(s.role, pairs[s.pair][1].mutations) for s in missing()][:5]
            assert time.monotonic() - started < OUTCOME_TIMEOUT_S, (
                f"no outcome within {OUTCOME_TIMEOUT_S} s for {len(missing())} records,"
                f" e.g. {waiting}")
            await kafka.poll()
        await kafka.settle(1.0)

    seen = outcomes(kafka, settings, logs)
    processed = processed_outcomes(logs)
    twice = [(s.role, pairs[s.pair][1].mutations) for s in sent
             if seen[(s.topic, s.partition, s.offset)] != 1]
    assert not twice, f"records with more than one outcome: {twice}"
    not_applied = [(pairs[s.pair][1].mutations, processed.get((s.topic, s.partition, s.offset)))
                   for s in sent if s.role == "good"
                   and processed.get((s.topic, s.partition, s.offset)) != "applied"]
    assert not not_applied, f"good records not applied after: {not_applied}"
    ledger = await fetch(settings, "SELECT topic, kafka_partition, kafka_offset, outcome"
                         " FROM processed_messages WHERE id LIKE $1", f"good-{run}-%")
    assert sorted(row["outcome"] for row in ledger) == ["applied"] * PAIRS
    assert leaks(logs, kafka, settings) == []
    for outcome in sorted({*processed.values(), *(
            record.headers["dlq.error.reason"].decode() for topic in topics.inputs()
            for record in kafka.on(f"{topic}.dlq"))}):
        event(f"outcome seen: {outcome}")  # pytest --hypothesis-show-statistics
    verified = await creditnotes(settings, "verify")  # every invariant of the database holds
    assert verified.returncode == 0, verified.stdout + verified.stderr



# ----------------------------------------------------------------------- personal data


def with_personal_data(node: Any) -> Any:
    """Every string value replaced by personal data, and a key of personal data added to
    every object: the worst an upstream can put in a record."""
    if isinstance(node, dict):
        copied = {key: with_personal_data(value) for key, value in node.items()}
        copied[f"{NAME} <{MARKER}>"] = MARKER
        return copied
    if isinstance(node, list):
        return [with_personal_data(value) for value in node]
    if isinstance(node, str):
        return f"{NAME} {MARKER}"
    return node


async def test_personal_data_in_any_key_or_value_reaches_no_dead_letter_header_or_log_line(
        settings: Settings, kafka: Kafka) -> None:
    """Keys and values of every string position, in structured and binary mode, on every
    topic, plus a refused source and an unknown type: the dead letters' ``dlq.*`` headers and
    the service's log lines name places, never the data."""
    guarded = settings.model_copy(update={"allowed_sources_credit_note_commands": ["/tests"]})
    records: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []
    for topic, types in TYPES.items():
        for type_ in types:
            event = cloudevent(type_, data_of(type_, "in_pd", "pd"), id_=f"pd-{type_}")
            records.append((topic, json.dumps(with_personal_data(event)).encode(), [CE_JSON]))
            data = with_personal_data(event["data"])
            records.append((topic, json.dumps(data).encode(), [
                ("content-type", b"application/json"), ("ce_specversion", b"1.0"),
                ("ce_id", f"pd-bin-{type_}".encode()), ("ce_source", MARKER.encode()),
                ("ce_type", type_.encode()), (f"ce_{NAME.replace(' ', '')}", MARKER.encode())]))
    commands = "credit_note_commands"
    for name, change in [("source", {"source": f"/{MARKER}"}),  # not on the allow-list
                         ("type", {"type": f"{MARKER}.issue"}),  # not read from the topic
                         ("data", {"data": {MARKER: NAME}}),
                         ("metadata", {"data": {"invoice_id": "in_pd", "amount": 1,
                                                "metadata": {MARKER: 7, "x" * 41: NAME}}})]:
        event = {**cloudevent("credit_note.issue", {}, id_=f"pd-{name}"), **change}
        records.append((commands, json.dumps(event).encode(), [CE_JSON]))
    # accepted ones, personal data where the contract allows it (memo, metadata, description)
    records.append(("invoices", json.dumps(cloudevent("invoice.finalized", invoice("in_pd"),
                                                      id_="pd-inv")).encode(), [CE_JSON]))

    with structlog.testing.capture_logs() as logs:
        async with RunningService(guarded):
            for topic, value, headers in records:
                await kafka.publish(getattr(settings.topics, topic), value, key="in_pd",
                                    headers=headers)
            expected = len(records) - 1  # all but the valid invoice are dead-lettered
            await kafka.wait_for(lambda: sum(len(kafka.on(f"{topic}.dlq"))
                                             for topic in settings.topics.inputs()) >= expected,
                                 OUTCOME_TIMEOUT_S)
            await kafka.settle(1.0)

    reasons = Counter(record.headers["dlq.error.reason"].decode()
                      for topic in settings.topics.inputs() for record in kafka.on(f"{topic}.dlq"))
    assert reasons["unauthorized_source"] >= 1 and reasons["unsupported_type"] >= 1
    assert sum(reasons.values()) == expected
    assert any(entry.get("event") == "message processed" for entry in logs)
    assert leaks(logs, kafka, settings) == []
