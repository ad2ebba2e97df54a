"""The console in a real browser, as an operator and a viewer use it: every action goes
through the service's command topic and has one effect (issue 14).

Screenshots of each screen land in docs/console/ (see conftest.screenshot).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import pytest
from playwright.async_api import Page, expect

from service.settings import Settings
from tests.browser.conftest import NewPage, screenshot, sign_in
from tests.support import Kafka, cloudevent, fetch, fetchrow

pytestmark = pytest.mark.integration


def finalized(invoice_id: str) -> dict[str, Any]:
    """An open invoice of 99.00 USD: two widgets at 25.00 and a support plan at 40.00, 10% tax."""
    return cloudevent("invoice.finalized", {"invoice": {
        "id": invoice_id, "number": f"ACME-{invoice_id[-4:]}", "customer_id": "cus_42",
        "currency": "usd", "status": "open",
        "lines": [{"id": "il_1", "description": "Widget", "quantity": 2, "unit_amount": 2_500,
                   "tax_rate_bps": 1_000},
                  {"id": "il_2", "description": "Support plan", "quantity": 1,
                   "unit_amount": 4_000, "tax_rate_bps": 1_000}]}}, source="/billing/invoices")


def paid(invoice_id: str, amount: int) -> dict[str, Any]:
    return cloudevent("invoice.payment_succeeded", {
        "invoice_id": invoice_id, "amount": amount, "currency": "usd",
        "payment_id": f"pay_{uuid.uuid4().hex[:6]}"}, source="/billing/payments")


async def eventually(settings: Settings, query: str, *args: Any,
                     timeout_s: float = 20.0) -> Any:
    """The first row of ``query`` once there is one."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = await fetchrow(settings, query, *args)
        if row is not None:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing for {query} {args} after {timeout_s} s")
        await asyncio.sleep(0.1)


async def invoice_with_payment(kafka: Kafka, settings: Settings, invoice_id: str) -> None:
    await kafka.publish(settings.topics.invoices, finalized(invoice_id))
    await kafka.publish(settings.topics.invoices, paid(invoice_id, 3_000))
    await eventually(settings, "SELECT 1 FROM invoices WHERE id = $1 AND amount_paid = 3000",
                     invoice_id)


def clean(page: Page) -> None:
    """No script error and no CSP violation on the page so far."""
    errors = page.js_errors  # type: ignore[attr-defined]
    assert not errors, errors


async def test_operator_previews_issues_and_voids_a_credit_note(
        console: Any, kafka: Kafka, new_page: NewPage) -> None:
    settings: Settings = console.settings
    await invoice_with_payment(kafka, settings, "in_1001")
    page = await new_page()
    await sign_in(page, console.base_url, console.operator_token, photographed=True)
    await screenshot(page, "home")

    await page.fill("input[name=q]", "in_1001")
    await page.press("input[name=q]", "Enter")
    await page.wait_for_url(re.compile(r"/invoices/in_1001$"))
    await expect(page.locator("h1")).to_contain_text("in_1001")
    await expect(page.locator("#issue-button")).to_be_hidden()  # not before a preview

    await page.fill("input[name=line-0-quantity]", "1")
    await page.select_option("select[name=reason]", "product_unsatisfactory")
    await page.fill("input[name=memo]", "One widget arrived broken")
    preview = page.locator("#preview")
    await expect(preview.locator("[data-preview=ok]")).to_be_visible()
    await expect(preview.locator("[data-maximum=creditable]")).to_have_text("99.00 USD")
    await expect(preview.locator("[data-maximum=refundable]")).to_have_text("30.00 USD")
    await expect(preview).to_contain_text("27.50 USD")  # 25.00 + 10% tax
    await expect(preview).to_contain_text("69.00 USD \u2192 41.50 USD")  # still owed
    assert await fetch(settings, "SELECT 1 FROM credit_notes") == []  # a preview saves nothing
    await expect(page.locator("#issue-button")).to_be_visible()
    await screenshot(page, "issue-preview")

    # The same form sent twice (a double click, a retry): one credit note.
    fields = await page.locator("#issue-form").evaluate(
        "form => Object.fromEntries(new FormData(form))")
    first = await page.request.post(f"{console.base_url}/invoices/in_1001/issue", form=fields,
                                    headers={"Origin": console.base_url})
    assert first.status == 200 and 'data-status="applied"' in await first.text()
    await page.click("#issue-button")
    outcome = page.locator("#outcome")
    await expect(outcome).to_have_attribute("data-status", re.compile("applied|duplicate"))
    await expect(outcome).to_contain_text("27.50 USD")
    await screenshot(page, "outcome-applied")
    [note] = await fetch(settings, "SELECT id, number, status FROM credit_notes"
                                   " WHERE invoice_id = 'in_1001'")
    assert note["status"] == "issued"
    [command] = await fetch(settings, "SELECT source FROM processed_messages"
                                      " WHERE source LIKE '/console/%'")
    assert command["source"] == "/console/otto"  # the console and its user, on the command

    await page.click("#outcome-note")
    await page.wait_for_url(re.compile(r"/credit-notes/"))
    await expect(page.locator("#note-status")).to_have_text("issued")
    await expect(page.locator("#journal")).to_contain_text("contra_revenue")
    await screenshot(page, "credit-note")

    await page.fill("#new-memo", "One widget arrived broken; replaced")
    await page.fill("#metadata", "ticket=SUP-1234")
    await page.click("#edit-button")
    await expect(page.locator("#outcome")).to_have_attribute("data-status", "applied")
    await page.click("#outcome-note")
    await expect(page.locator("#memo")).to_have_text("One widget arrived broken; replaced")
    await expect(page.locator("#metadata-shown")).to_contain_text("SUP-1234")

    await page.click("#void-button")
    await expect(page.locator("#outcome")).to_have_attribute("data-status", "applied")
    await page.click("#outcome-note")
    await expect(page.locator("#note-status")).to_have_text("void")
    await expect(page.locator("#void-button")).to_be_disabled()
    await expect(page.locator("#void-why")).to_contain_text("already void")
    await screenshot(page, "credit-note-void")
    rows = await fetch(settings, "SELECT status FROM credit_notes WHERE invoice_id = 'in_1001'")
    assert [row["status"] for row in rows] == ["void"]

    await page.goto(f"{console.base_url}/invoices/in_1001")
    timeline = page.locator("#timeline li")
    await expect(timeline.first).to_contain_text("in: invoice ACME-1001 for 99.00 USD")
    await expect(timeline.nth(1)).to_contain_text("in: payment pay_")
    await expect(page.locator("#timeline")).to_contain_text("credit_note.voided")
    await expect(page.locator("#amount-remaining")).to_have_text("69.00 USD")
    await screenshot(page, "invoice")
    clean(page)

    # Without JavaScript: Preview is drawn on the server, then Issue sends what it showed.
    plain = await new_page(javascript=False)
    await sign_in(plain, console.base_url, console.operator_token)
    await plain.goto(f"{console.base_url}/invoices/in_1001")
    await expect(plain.locator("#issue-button")).to_be_hidden()
    await plain.check("input[name=mode][value=amount]")
    await plain.fill("#amount", "5")
    await plain.click("#preview-button")
    await expect(plain.locator("#preview [data-preview=ok]")).to_contain_text("ACME-1001-CN-02")
    await plain.click("#issue-button")
    await expect(plain.locator("#outcome")).to_have_attribute("data-status", "applied")
    await expect(plain.locator("#outcome")).to_contain_text("ACME-1001-CN-02")
    rows = await fetch(settings, "SELECT number, status, pre_payment_amount FROM credit_notes"
                                 " WHERE invoice_id = 'in_1001' ORDER BY number")
    assert [(row["number"], row["status"], row["pre_payment_amount"]) for row in rows] == [
        ("ACME-1001-CN-01", "void", 2_750), ("ACME-1001-CN-02", "issued", 500)]


async def test_a_dead_letter_is_replayed_from_the_inbox_after_a_dry_run(
        console: Any, kafka: Kafka, new_page: NewPage) -> None:
    settings: Settings = console.settings
    commands = settings.topics.credit_note_commands
    # A credit for an invoice that has not arrived yet: retried, then dead-lettered.
    early = cloudevent("credit_note.issue", {"invoice_id": "in_2001", "amount": 1_500,
                                             "reason": "service_credit"}, source="/support")
    await kafka.publish(commands, early)
    # And one nobody can apply: a quantity of zero (invalid_message, the field named).
    broken = cloudevent("credit_note.issue", {"invoice_id": "in_2002", "lines": [
        {"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 0}]},
        source="/support")
    await kafka.publish(commands, broken)
    await kafka.expect(f"{commands}.dlq", count=2, timeout_s=30)
    await invoice_with_payment(kafka, settings, "in_2001")  # the invoice arrives after all

    page = await new_page()
    await sign_in(page, console.base_url, console.operator_token)
    await page.click("text=Dead letters")
    groups = page.locator("#groups")
    await expect(groups).to_contain_text("invoice_not_found")
    await expect(groups).to_contain_text("invalid_message")
    await screenshot(page, "dead-letters")

    await groups.locator("tr", has_text="invalid_message").locator("a").click()
    await page.locator("#records a").first.click()
    await expect(page.locator("#dl-reason")).to_have_text("invalid_message")
    await expect(page.locator("#dl-field")).to_contain_text("quantity")
    await expect(page.locator("#failing-line")).to_contain_text('"quantity"')
    await screenshot(page, "dead-letter")

    await page.goto(f"{console.base_url}/dead-letters")
    await groups.locator("tr", has_text="invoice_not_found").locator("a").click()
    await expect(page.locator("#records")).to_contain_text("in_2001")
    await screenshot(page, "dead-letter-list")
    await page.locator("#records input[name=selected]").first.check()
    await page.click("#dry-run-selected")
    await expect(page.locator("#verdicts")).to_contain_text("would replay")
    await expect(page.locator("#resends")).to_contain_text('"amount": 1500')  # what goes back
    assert await fetch(settings, "SELECT 1 FROM credit_notes") == []  # a dry run sends nothing
    await screenshot(page, "replay-dry-run")

    await page.click("#confirm-replay")
    await expect(page.locator("#replay-summary")).to_contain_text("republished 1")
    await expect(page.locator("#verdicts")).to_contain_text("replayed to")
    await screenshot(page, "replay-done")
    note = await eventually(settings, "SELECT total, status FROM credit_notes"
                                      " WHERE invoice_id = 'in_2001'")
    assert (note["total"], note["status"]) == (1_500, "issued")

    await page.goto(f"{console.base_url}/invoices/in_2001")
    await expect(page.locator("#credit-notes")).to_contain_text("15.00 USD")
    await page.click("text=Flow health")
    await expect(page.locator("#health-figures")).to_contain_text("Consumer lag")
    await screenshot(page, "health")
    clean(page)


async def test_a_viewer_sees_no_action_buttons_and_a_forged_post_is_refused(
        console: Any, kafka: Kafka, new_page: NewPage) -> None:
    settings: Settings = console.settings
    await invoice_with_payment(kafka, settings, "in_3001")
    await kafka.publish(settings.topics.credit_note_commands, cloudevent(
        "credit_note.issue", {"invoice_id": "in_3001", "amount": 1_000}, source="/support"))
    note = await eventually(settings, "SELECT id FROM credit_notes WHERE invoice_id = 'in_3001'")

    page = await new_page(javascript=False)  # and the pages work without JavaScript
    await sign_in(page, console.base_url, console.viewer_token)
    await expect(page.locator("[data-role]")).to_have_text("viewer")
    await expect(page.locator("#credit-notes")).to_contain_text("ACME-3001-CN-01")  # latest
    await page.fill("input[name=q]", "cus_42")  # a customer: their credit notes
    await page.press("input[name=q]", "Enter")
    await expect(page.locator("h2")).to_contain_text("Credit notes of customer cus_42")
    await expect(page.locator("#credit-notes")).to_contain_text("10.00 USD")
    await page.goto(f"{console.base_url}/invoices/in_3001")
    await page.fill("input[name=line-1-quantity]", "1")
    await page.click("#preview-button")  # a read: drawn on the server
    await expect(page.locator("#preview [data-preview=ok]")).to_be_visible()
    await expect(page.locator("#preview [data-maximum=creditable]")).to_have_text("89.00 USD")
    await expect(page.locator("#remaining-after")).to_have_text("59.00 USD \u2192 19.44 USD")
    await expect(page.locator("input[name=line-1-quantity]")).to_have_value("1")
    await expect(page.locator("#issue-button")).to_have_count(0)
    await expect(page.locator("#viewer-note")).to_be_visible()

    await page.goto(f"{console.base_url}/credit-notes/{note['id']}")
    await expect(page.locator("#note-status")).to_have_text("issued")
    for button in ("#void-button", "#edit-button"):
        await expect(page.locator(button)).to_have_count(0)
    await screenshot(page, "viewer-credit-note")

    # The viewer forges the operator's form: a valid session and CSRF token, the wrong role.
    csrf = await page.locator("input[name=csrf_token]").first.get_attribute("value")
    forged = await page.request.post(
        f"{console.base_url}/credit-notes/{note['id']}/void",
        form={"csrf_token": csrf or "", "idempotency_key": "forged-1"},
        headers={"Origin": console.base_url}, max_redirects=0)
    assert forged.status == 403
    assert "forbidden" in await forged.text()
    await asyncio.sleep(0.5)
    rows = await fetch(settings, "SELECT status FROM credit_notes WHERE invoice_id = 'in_3001'")
    assert [row["status"] for row in rows] == ["issued"]
    assert await fetch(settings, "SELECT 1 FROM processed_messages"
                                 " WHERE source LIKE '/console/%'") == []

    missing = await page.goto(f"{console.base_url}/invoices/in_nope")
    assert missing is not None and missing.status == 404
    await expect(page.locator("#error")).to_contain_text("invoice_not_found")

    await page.goto(f"{console.base_url}/dead-letters")
    await expect(page.locator("#groups")).to_be_visible()
    await expect(page.locator("input[name=selected]")).to_have_count(0)
    clean(page)
