"""A real headless Chromium (Debian's ``chromium``, driven by Playwright) against the
console of ``tests/console/conftest.py``: one browser for the session, a fresh
context (cookies, storage) per test.

Each screen a test reaches is photographed into ``docs/console/<screen>.png``, the
pictures ``docs/console.md`` shows: the docs are redrawn by every run.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.console.conftest import console  # noqa: F401  (the running service and console)

CHROMIUM = os.environ.get("CREDITNOTES_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CHROMIUM_PRESENT = Path(CHROMIUM).is_file()
expect.set_options(timeout=15_000)  # a write waits for its outcome (up to 5 s)
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM_PRESENT:
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium "
                    "(`apt-get install chromium`; .ci/run does it)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM,
                                                    args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


NewPage = Callable[..., Awaitable[Page]]


@pytest.fixture
async def new_page(browser: Browser) -> AsyncIterator[NewPage]:
    """Pages in fresh contexts (each its own cookies: one user per context)."""
    contexts = []

    async def make(javascript: bool = True) -> Page:
        context = await browser.new_context(viewport={"width": 1280, "height": 900},
                                            locale="en-US", timezone_id="UTC",
                                            java_script_enabled=javascript)
        context.set_default_timeout(15_000)
        contexts.append(context)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        # script errors and CSP refusals ("Refused to ..."); a 4xx a test asks for is not one
        page.on("console", lambda message: errors.append(message.text)
                if message.type == "error"
                and not message.text.startswith("Failed to load resource") else None)
        page.js_errors = errors  # type: ignore[attr-defined]
        return page

    yield make
    for context in contexts:
        await context.close()


async def screenshot(page: Page, screen: str) -> None:
    """The screen as docs/console.md shows it."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{screen}.png"), full_page=True)


async def sign_in(page: Page, base_url: str, token: str, photographed: bool = False) -> None:
    """What a person does: open the console, get the sign-in page, paste the token."""
    await page.goto(base_url + "/")
    assert "/login" in page.url
    if photographed:
        await screenshot(page, "sign-in")
    await page.fill("#token", token)
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    assert page.url == base_url + "/", (page.url, await page.inner_text("body"))

