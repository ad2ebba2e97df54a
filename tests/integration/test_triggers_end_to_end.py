"""Upstream triggers on the real broker and PostgreSQL: returns, SLA breaches, downgrades, cancellations."""

from __future__ import annotations

from typing import Any

import pytest

from service.settings import Settings
from tests.support import Kafka, RunningService, cloudevent, fetch, invoice_data

pytestmark = pytest.mark.integration
OCTOBER = {"start": "2026-10-01T00:00:00Z", "end": "2026-11-01T00:00:00Z"}
TEN_LINES = [{"id": f"il_{n}", "quantity": 1, "unit_amount": 1_000} for n in range(1, 11)]


async def finalize(kafka: Kafka, settings: Settings, **invoice: Any) -> None:
    await kafka.publish(settings.topics.invoices,
                        cloudevent("invoice.finalized", invoice_data("in_1001", **invoice)))


async def issued(kafka: Kafka, settings: Settings, count: int = 1) -> list[dict[str, Any]]:
    records = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued", count)
    return [record.event["data"] for record in records]


@pytest.mark.parametrize(("discount", "credit"), [({"percent_off_bps": 5_000}, 500),
                                                  ({"amount_off": 1_000}, 900)],
                         ids=["example-6-half-off", "example-7-10.00-off"])
async def test_returning_one_line_credits_its_discounted_amount(
        service: RunningService, kafka: Kafka, settings: Settings,
        discount: dict[str, int], credit: int) -> None:
    await finalize(kafka, settings, lines=TEN_LINES, discounts=[discount])
    event = cloudevent("return.received", {
        "invoice_id": "in_1001", "return_id": "ret-1",
        "lines": [{"invoice_line_id": "il_3", "quantity": 1}]}, source="/warehouse/returns")
    await kafka.publish(settings.topics.returns, event)

    [note] = await issued(kafka, settings)
    assert note["total"] == credit
    assert note["reason"] == "order_change"
    assert note["trigger"] == {"source": "/warehouse/returns", "id": event["id"],
                               "type": "return.received"}
    assert note["lines"][0]["invoice_line_id"] == "il_3"
    assert note["policy"] == "return.received:max_credit_bps=10000"


async def test_example_10_sla_breach_credits_10_percent_of_a_paid_invoice_to_the_balance(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[{"id": "il_1", "quantity": 1, "unit_amount": 500_000}],
                   status="paid", amount_paid=500_000)
    await kafka.publish(settings.topics.sla_breaches, cloudevent(
        "sla.breached", {"invoice_id": "in_1001", "sla_id": "sla-7", "credit_bps": 1_000}))

    [note] = await issued(kafka, settings)
    assert (note["total"], note["credit_amount"], note["refund_amount"]) == (50_000, 50_000, 0)
    assert note["type"] == "post_payment"
    assert {"account": "customer_credit_balance", "debit": 0, "credit": 50_000} in note["journal"]
    await kafka.settle(1.0)
    assert kafka.on(settings.topics.refund_requests) == []


async def test_example_5_refund_settlement_refunds_only_the_cash_collected(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[{"id": "il_1", "quantity": 1, "unit_amount": 20_000}],
                   status="paid", customer_balance_applied=15_000, amount_paid=5_000)
    await kafka.publish(settings.topics.sla_breaches, cloudevent(
        "sla.breached", {"invoice_id": "in_1001", "sla_id": "sla-1", "credit_amount": 8_000,
                         "settlement": "refund"}))

    [note] = await issued(kafka, settings)
    [refund] = await kafka.expect(settings.topics.refund_requests, "refund.requested")
    assert (note["refund_amount"], note["credit_amount"]) == (5_000, 3_000)
    assert refund.event["data"]["amount"] == 5_000


async def test_example_11_cancellation_refunds_the_unused_16_of_31_days_with_tax(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[{"id": "il_1", "quantity": 1, "unit_amount": 3_100,
                                            "tax_rate_bps": 2_000, "period": OCTOBER}],
                   status="paid", amount_paid=3_720)
    await kafka.publish(settings.topics.cancellations, cloudevent(
        "subscription.canceled", {"invoice_id": "in_1001", "invoice_line_id": "il_1",
                                  "canceled_at": "2026-10-16T00:00:00Z"}))

    [note] = await issued(kafka, settings)
    assert (note["subtotal"], note["tax"], note["total"]) == (1_600, 320, 1_920)
    [refund] = await kafka.expect(settings.topics.refund_requests, "refund.requested")
    assert refund.event["data"]["amount"] == 1_920


async def test_a_downgrade_credits_the_unused_time_and_a_time_outside_the_period_is_rejected(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[{"id": "il_1", "quantity": 1, "unit_amount": 3_100,
                                            "period": OCTOBER},
                                           {"id": "il_2", "quantity": 1, "unit_amount": 500}])
    for line_id, at in (("il_1", "2026-10-21T12:00:00Z"), ("il_1", "2026-12-01T00:00:00Z"),
                        ("il_2", "2026-10-21T12:00:00Z")):
        await kafka.publish(settings.topics.downgrades, cloudevent(
            "subscription.downgraded",
            {"invoice_id": "in_1001", "invoice_line_id": line_id, "effective_at": at}))

    [note] = await issued(kafka, settings)
    assert (note["total"], note["pre_payment_amount"]) == (1_050, 1_050)
    assert note["reason"] == "subscription_change"
    rejected = await kafka.expect(settings.topics.credit_note_events, "credit_note.rejected", 2)
    assert sorted(r.event["data"]["reason"] for r in rejected) == [
        "no_service_period", "outside_service_period"]


async def test_a_return_beyond_what_is_left_is_capped_then_nothing_left_is_rejected(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings, lines=[{"id": "il_1", "quantity": 3, "unit_amount": 1_000}])
    for return_id in ("ret-1", "ret-2"):
        await kafka.publish(settings.topics.returns, cloudevent("return.received", {
            "invoice_id": "in_1001", "return_id": return_id,
            "lines": [{"invoice_line_id": "il_1", "quantity": 5}]}))

    [note] = await issued(kafka, settings)
    assert note["total"] == 3_000
    [rejected] = await kafka.expect(settings.topics.credit_note_events, "credit_note.rejected")
    assert rejected.event["data"]["reason"] == "nothing_left_to_credit"


async def test_the_same_trigger_on_two_topics_gives_one_credit_note(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await finalize(kafka, settings)
    event = cloudevent("sla.breached", {"invoice_id": "in_1001", "sla_id": "s",
                                        "credit_amount": 1_000}, id_="shared-id")
    await kafka.publish(settings.topics.sla_breaches, event)
    await kafka.publish(settings.topics.returns, event)  # wrong topic for the type: dead letter
    await kafka.publish(settings.topics.sla_breaches, event)

    await issued(kafka, settings)
    [dead] = await kafka.expect(f"{settings.topics.returns}.dlq")
    assert dead.headers["dlq.error.reason"] == b"unsupported_type"
    await kafka.settle(1.5)
    assert len(kafka.on(settings.topics.credit_note_events)) == 1
    assert len(await fetch(settings, "SELECT 1 FROM credit_notes")) == 1


async def test_a_source_not_on_the_allow_list_is_dead_lettered_and_has_no_effect(
        settings: Settings, kafka: Kafka) -> None:
    strict = settings.model_copy(update={"allowed_sources_returns": ["/warehouse/returns"]})
    async with RunningService(strict):
        await finalize(kafka, strict)
        await kafka.publish(strict.topics.returns, cloudevent("return.received", {
            "invoice_id": "in_1001", "return_id": "r1",
            "lines": [{"invoice_line_id": "il_1", "quantity": 1}]}, source="/intruder"))
        [dead] = await kafka.expect(f"{strict.topics.returns}.dlq")
    assert dead.headers["dlq.error.reason"] == b"unauthorized_source"
    assert kafka.on(strict.topics.credit_note_events) == []
    assert await fetch(strict, "SELECT 1 FROM credit_notes") == []


async def test_a_trigger_before_its_invoice_is_dead_lettered_then_replayed_once(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    event = cloudevent("sla.breached", {"invoice_id": "in_1001", "sla_id": "s",
                                        "credit_amount": 2_500})
    await kafka.publish(settings.topics.sla_breaches, event)
    [dead] = await kafka.expect(f"{settings.topics.sla_breaches}.dlq", timeout_s=30)
    assert dead.headers["dlq.error.reason"] == b"invoice_not_found"
    assert int(dead.headers["dlq.attempts"]) > 1

    await finalize(kafka, settings)
    for _ in range(2):  # replayed twice: still one effect
        await kafka.publish(settings.topics.sla_breaches, dead.value or b"", key="in_1001")
    [note] = await issued(kafka, settings)
    assert note["total"] == 2_500
    await kafka.settle(1.5)
    assert len(kafka.on(settings.topics.credit_note_events)) == 1
