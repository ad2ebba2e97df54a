"""Attack (hostile upstream), regression: ids are the upstream's strings and may hold
'/'. The API routes an invoice id as the rest of the path, so an invoice "in/7" opens
and previews, percent-encoded or not, in the API and the pages (search, page, preview)."""

from __future__ import annotations

from tests.console.api_helpers import seed_invoice
from tests.console.conftest import RunningConsole
from tests.support import Kafka


async def test_an_invoice_whose_id_has_a_slash_can_be_opened_and_previewed(
        console: RunningConsole, kafka: Kafka) -> None:
    await seed_invoice(console.settings, kafka, "in/7", paid=0)
    viewer = console.viewer()
    for path in ("/api/v1/invoices/in%2F7", "/api/v1/invoices/in/7"):
        api = await viewer.get(path, params={"dead_letters": "false"})
        assert api.status_code == 200, (path, api.status_code, api.text[:200])
        assert api.json()["id"] == "in/7"
    preview = await viewer.post("/api/v1/invoices/in%2F7/preview",
                                json={"reason": "other", "amount": 100})
    assert preview.status_code == 200, preview.text[:300]
    assert preview.json()["invoice_id"] == "in/7"
    assert preview.json()["credit_note"]["total"] == 100
    missing = await viewer.get("/api/v1/invoices/in/8", params={"dead_letters": "false"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "invoice_not_found"


async def test_the_pages_open_and_preview_an_invoice_whose_id_has_a_slash(
        console: RunningConsole, kafka: Kafka) -> None:
    await seed_invoice(console.settings, kafka, "in/9", paid=0)
    viewer = console.viewer()
    search = await viewer.get("/search", params={"q": "in/9"})
    assert search.status_code == 303, search.status_code
    page = await viewer.get(search.headers["location"])
    assert page.status_code == 200, page.status_code
    assert "in/9" in page.text
    browser = await console.session(console.operator_token)
    preview = await browser.post("/invoices/in%2F9/preview", data={
        "csrf_token": console.csrf_token(browser), "reason": "other", "mode": "amount",
        "amount": "1.00"})
    assert preview.status_code == 200, preview.text[:300]
