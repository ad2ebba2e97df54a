"""Sources cannot be spoofed (issue 15, finding 2): with the shipped allow-lists, an
upstream cannot publish under another's ``source`` nor claim its ``source`` + ``id``."""

from __future__ import annotations

import pytest

from service.settings import Settings
from tests.support import Kafka, RunningService, cloudevent, fetch, fetchrow, invoice_data

pytestmark = pytest.mark.integration

#: As docker-compose.yml and deploy/k8s ship them, with billing as one upstream (the attack's
#: ``/billing``).
ALLOW_LISTS = {
    "allowed_sources_invoices": ["/billing"],
    "allowed_sources_returns": ["/warehouse/returns"],
    "allowed_sources_sla_breaches": ["/monitoring/sla"],
    "allowed_sources_downgrades": ["/billing/subscriptions"],
    "allowed_sources_cancellations": ["/billing/subscriptions"],
    "allowed_sources_credit_note_commands": ["/support/console"],
    "allowed_sources_refund_results": ["/payments/refunds"],
    "allow_any_source": False,
}


async def test_a_spoofed_source_cannot_claim_another_upstreams_payment(
        settings: Settings, kafka: Kafka) -> None:
    strict = settings.model_copy(update=ALLOW_LISTS)
    assert strict.missing_allow_lists() == [] and strict.open_topics() == []
    async with RunningService(strict):
        await kafka.publish(strict.topics.invoices, cloudevent(
            "invoice.finalized", invoice_data("in_1001"), source="/billing", id_="inv-1"))
        while (invoice := await fetchrow(strict, "SELECT total FROM invoices")) is None:
            await kafka.settle(0.1)
        total = invoice["total"]

        # the attack: an sla.breached under billing's source and the id of its next payment
        await kafka.publish(strict.topics.sla_breaches, cloudevent(
            "sla.breached", {"invoice_id": "in_1001", "sla_id": "s", "credit_bps": 10_000},
            source="/billing", id_="pay-9"))
        [dead] = await kafka.expect(f"{strict.topics.sla_breaches}.dlq")
        assert dead.headers["dlq.error.reason"] == b"unauthorized_source"
        # refused before it claimed anything: billing's key is still free
        assert await fetch(strict, "SELECT outcome FROM processed_messages"
                                   " WHERE source = '/billing' AND id = 'pay-9'") == []

        await kafka.publish(strict.topics.invoices, cloudevent(
            "invoice.payment_succeeded", {"invoice_id": "in_1001", "amount": total,
                                          "currency": "usd"},
            source="/billing", id_="pay-9"))
        while (await fetch(strict, "SELECT 1 FROM processed_messages WHERE id = 'pay-9'")) == []:
            await kafka.settle(0.1)
    invoice = await fetchrow(strict, "SELECT status, amount_paid FROM invoices")
    assert invoice is not None and (invoice["status"], invoice["amount_paid"]) == ("paid", total)
    assert kafka.on(strict.topics.credit_note_events) == []
    [claim] = await fetch(strict, "SELECT topic FROM processed_messages"
                                  " WHERE source = '/billing' AND id = 'pay-9'")
    assert claim["topic"] == strict.topics.invoices


async def test_allow_any_opens_only_the_topics_without_a_list(
        settings: Settings, kafka: Kafka) -> None:
    mixed = settings.model_copy(update={"allowed_sources_sla_breaches": ["/monitoring/sla"],
                                        "allow_any_source": True})
    assert mixed.topics.sla_breaches not in mixed.open_topics()
    async with RunningService(mixed):
        await kafka.publish(mixed.topics.invoices, cloudevent(
            "invoice.finalized", invoice_data("in_1001"), source="/anyone"))
        await kafka.publish(mixed.topics.sla_breaches, cloudevent(
            "sla.breached", {"invoice_id": "in_1001", "sla_id": "s", "credit_bps": 1_000},
            source="/anyone"))
        [dead] = await kafka.expect(f"{mixed.topics.sla_breaches}.dlq")
        while await fetchrow(mixed, "SELECT 1 FROM invoices") is None:  # /anyone on invoices
            await kafka.settle(0.1)
    assert dead.headers["dlq.error.reason"] == b"unauthorized_source"


async def test_only_the_payment_system_may_tell_a_refunds_outcome(
        settings: Settings, kafka: Kafka) -> None:
    strict = settings.model_copy(update=ALLOW_LISTS)
    async with RunningService(strict):
        await kafka.publish(strict.topics.refund_results, cloudevent(
            "refund.succeeded", {"refund_id": "rf_1", "invoice_id": "in_1001"},
            source="/support/console", id_="rr-spoofed"))
        [dead] = await kafka.expect(f"{strict.topics.refund_results}.dlq")
    assert dead.headers["dlq.error.reason"] == b"unauthorized_source"
    assert await fetch(strict, "SELECT 1 FROM processed_messages WHERE id = 'rr-spoofed'") == []


async def test_a_prefix_entry_admits_the_consoles_users_and_nothing_beside_it(
        settings: Settings, kafka: Kafka) -> None:
    """``/console/*`` on credit-note-commands: ``/console/<user>`` is read, ``/console``
    itself and ``/consoles/x`` are dead-lettered ``unauthorized_source``."""
    strict = settings.model_copy(update={**ALLOW_LISTS, "allowed_sources_credit_note_commands":
                                         ["/support/console", "/console/*"]})
    async with RunningService(strict):
        await kafka.publish(strict.topics.invoices, cloudevent(
            "invoice.finalized", invoice_data("in_1001"), source="/billing", id_="inv-1"))
        for n, source in enumerate(("/console/otto", "/console", "/consoles/otto")):
            await kafka.publish(strict.topics.credit_note_commands, cloudevent(
                "credit_note.issue", {"invoice_id": "in_1001", "amount": 100},
                source=source, id_=f"cmd-{n}"))
        dead = await kafka.expect(f"{strict.topics.credit_note_commands}.dlq", count=2)
        while not await fetch(strict, "SELECT 1 FROM credit_notes"):
            await kafka.settle(0.1)
    assert sorted(record.event["source"] for record in dead) == ["/console", "/consoles/otto"]
    assert {record.headers["dlq.error.reason"] for record in dead} == {b"unauthorized_source"}
    [note] = await fetch(strict, "SELECT trigger_source FROM credit_notes")
    assert note["trigger_source"] == "/console/otto"
