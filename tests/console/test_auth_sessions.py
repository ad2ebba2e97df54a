"""Browser sessions, CSRF and the trusted-proxy mode, on a real console.

A session is a signed HttpOnly SameSite=Strict cookie made by POST /login with a
token; every POST it (or a proxy identity) sends carries the CSRF token of that
session, or is refused and audited. A Bearer request needs none. The proxy's header
names the user only when the peer is a configured proxy address.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx

from service.entrypoints.console.auth import User
from tests.console.conftest import OPERATOR, VIEWER, RunningConsole

SECRET = "s" * 40


async def outcomes(running: RunningConsole, actor: str) -> list[str]:
    return [row["outcome"] for row in await running.deps.pool.fetch(
        "SELECT outcome FROM console_audit WHERE actor = $1 ORDER BY id", actor)]


def cookie_flags(answer: httpx.Response) -> set[str]:
    [header] = answer.headers.get_list("set-cookie")
    return {part.strip().split("=")[0].lower() for part in header.split(";")[1:]}


async def test_sign_in_sets_a_session_cookie_only_scripts_cannot_read(
        bare_console: RunningConsole) -> None:
    page = await bare_console.client().get("/login")
    assert page.status_code == 200
    assert 'name="token"' in page.text and 'action="/login"' in page.text
    browser = bare_console.client()
    answer = await browser.post("/login", data={"token": bare_console.operator_token,
                                                "next": "/dead-letters"})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/dead-letters"
    assert {"httponly", "samesite", "path", "max-age"} <= cookie_flags(answer)
    assert "samesite=strict" in answer.headers["set-cookie"].lower()
    assert "secure" not in cookie_flags(answer)  # console_secure_cookies is off in tests
    me = (await browser.get("/api/v1/me")).json()
    assert (me["name"], me["role"], me["via"]) == (OPERATOR, "operator", "session")
    assert me["csrf_token"] == bare_console.csrf_token(browser)
    assert await outcomes(bare_console, OPERATOR) == ["signed_in"]


async def test_behind_tls_the_cookie_is_secure(console_factory: Any) -> None:
    async with console_factory(console_secure_cookies=True) as running:
        answer = await running.client().post("/login", data={"token": running.viewer_token})
        assert "secure" in cookie_flags(answer)


async def test_a_wrong_token_signs_nobody_in_and_sign_in_goes_nowhere_else(
        bare_console: RunningConsole) -> None:
    browser = bare_console.client()
    refused = await browser.post("/login", data={"token": "cn_guess"})
    assert refused.status_code == 401
    assert "not valid" in refused.text and "cn_session" not in browser.cookies
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:x"):
        answer = await bare_console.client().post(
            "/login", data={"token": bare_console.viewer_token, "next": target})
        assert answer.headers["location"] == "/", target


async def test_a_sign_in_posted_from_another_site_is_refused(bare_console: RunningConsole) -> None:
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "null"}):
        browser = bare_console.client(headers=headers)
        answer = await browser.post("/login", data={"token": bare_console.viewer_token})
        assert answer.status_code == 403, headers
        assert "cn_session" not in browser.cookies


async def test_a_browsers_same_origin_post_passes_though_its_origin_is_null(
        bare_console: RunningConsole) -> None:
    # with Referrer-Policy: no-referrer, Chromium sends Origin: null on a same-origin form
    # POST, and Sec-Fetch-Site says what it is
    same_origin = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}
    browser = bare_console.client(headers=same_origin)
    answer = await browser.post("/login", data={"token": bare_console.operator_token})
    assert answer.status_code == 303
    signed_out = await browser.post("/logout",
                                    data={"csrf_token": bare_console.csrf_token(browser)})
    assert signed_out.status_code == 303
    other_site = bare_console.client(headers={"Origin": "null", "Sec-Fetch-Site": "same-site"})
    assert (await other_site.post("/login", data={"token": bare_console.operator_token})
            ).status_code == 403


async def test_a_session_ends_when_it_expires_or_is_tampered_with(
        bare_console: RunningConsole) -> None:
    browser = await bare_console.session(bare_console.viewer_token)
    cookie = browser.cookies["cn_session"]
    assert (await browser.get("/api/v1/me")).status_code == 200
    payload, signature = cookie.split(".")
    forged = bare_console.client(headers={"Cookie": f"cn_session={payload}.{'0' * 64}"})
    assert (await forged.get("/api/v1/me")).status_code == 401
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert body["r"] == "viewer"
    promoted = base64.urlsafe_b64encode(json.dumps({**body, "r": "operator"}).encode()).decode()
    assert (await bare_console.client(headers={"Cookie": f"cn_session={promoted}.{signature}"})
            .get("/api/v1/me")).status_code == 401
    later = bare_console.settings.console_session_minutes * 60 + 1
    bare_console.deps.clock = lambda: time.time() + later
    try:
        assert (await browser.get("/api/v1/me")).status_code == 401
        assert (await browser.get("/")).headers["location"] == "/login"
    finally:
        bare_console.deps.clock = time.time


async def test_sessions_cross_replicas_sharing_the_secret_and_end_with_their_token(
        console_factory: Any) -> None:
    async with console_factory(console_session_secret=SECRET) as first:
        browser = await first.session(first.operator_token)
        cookie = browser.cookies["cn_session"]
        settings = first.settings
    # another replica (same secret, same tokens): the session holds there too
    async with console_factory(console_session_secret=SECRET,
                               console_tokens=settings.console_tokens) as second:
        again = second.client(headers={"Cookie": f"cn_session={cookie}"})
        assert (await again.get("/api/v1/me")).json()["name"] == OPERATOR
    # otto's token removed from the configuration: his sessions end at the restart
    async with console_factory(console_session_secret=SECRET,
                               console_tokens=[token for token in settings.console_tokens
                                               if token.name != OPERATOR]) as third:
        gone = third.client(headers={"Cookie": f"cn_session={cookie}"})
        assert (await gone.get("/api/v1/me")).status_code == 401
    # and without the shared secret a session never crosses processes
    async with console_factory(console_tokens=settings.console_tokens) as other:
        stranger = other.client(headers={"Cookie": f"cn_session={cookie}"})
        assert (await stranger.get("/api/v1/me")).status_code == 401


async def test_every_session_post_needs_its_own_csrf_token_and_a_refusal_is_audited(
        bare_console: RunningConsole) -> None:
    browser = await bare_console.session(bare_console.operator_token)
    other = await bare_console.session(bare_console.operator_token)
    for label, extra in (("none", {}), ("wrong", {"X-CSRF-Token": "0" * 64}),
                         ("another session's", {"X-CSRF-Token": bare_console.csrf_token(other)})):
        answer = await browser.post("/api/v1/credit-notes", json={"invoice_id": "in_1"},
                                    headers={"Idempotency-Key": f"k-{label}", **extra})
        assert answer.status_code == 403, label
        assert answer.json()["error"]["code"] == "csrf_failed", label
    page = await browser.post("/logout", data={"csrf_token": "nope"})
    assert page.status_code == 403
    assert "csrf_failed" in page.text
    assert "cn_session" in browser.cookies  # still signed in: the logout was refused
    assert await outcomes(bare_console, OPERATOR) == ["signed_in", "signed_in"] + [
        "refused:csrf_failed"] * 4
    # with its token (header or form field) the same session gets through
    token = bare_console.csrf_token(browser)
    signed_out = await browser.post("/logout", data={"csrf_token": token})
    assert signed_out.status_code == 303
    assert signed_out.headers["location"] == "/login"
    assert "max-age=0" in signed_out.headers["set-cookie"].lower()


async def test_a_session_post_from_another_site_is_refused_even_with_the_token(
        bare_console: RunningConsole) -> None:
    browser = await bare_console.session(bare_console.operator_token)
    token = bare_console.csrf_token(browser)
    answer = await browser.post("/logout", data={"csrf_token": token},
                                headers={"Origin": "https://evil.example"})
    assert answer.status_code == 403


async def test_bearer_requests_need_no_csrf_token(bare_console: RunningConsole) -> None:
    answer = await bare_console.operator().post("/logout")
    assert answer.status_code == 303  # past the gate: no csrf_failed
    assert await outcomes(bare_console, OPERATOR) == []


async def test_the_proxy_header_is_believed_only_from_a_trusted_address(
        console_factory: Any) -> None:
    # the tests reach the console from 127.0.0.1
    async with console_factory(console_trusted_proxies=["127.0.0.1/32"],
                               console_proxy_operators=["olga"]) as trusted:
        vic = (await trusted.client(headers={"X-Forwarded-User": "vic"}).get("/api/v1/me")).json()
        olga = (await trusted.client(headers={"X-Forwarded-User": "olga"}).get(
            "/api/v1/me")).json()
        assert (vic["name"], vic["role"], vic["via"]) == ("vic", "viewer", "proxy")
        assert (olga["name"], olga["role"], olga["via"]) == ("olga", "operator", "proxy")
        assert (await trusted.client(headers={"X-Forwarded-User": "bad name"}).get(
            "/api/v1/me")).status_code == 401
        assert (await trusted.client().get("/api/v1/me")).status_code == 401  # no header
        # a proxy identity is a browser's: its POSTs need the CSRF token
        proxied = trusted.client(headers={"X-Forwarded-User": "olga"})
        refused = await proxied.post("/logout")
        assert refused.status_code == 403
        token = trusted.deps.auth.csrf_token(User("olga", "operator", "proxy"))
        assert olga["csrf_token"] == token
        assert (await proxied.post("/logout", headers={"X-CSRF-Token": token})).status_code == 303
        assert await outcomes(trusted, "olga") == ["refused:csrf_failed"]
    for elsewhere in (["10.0.0.0/8"], ["::1/128"], []):
        async with console_factory(console_trusted_proxies=elsewhere) as untrusted:
            for name in ("vic", OPERATOR, VIEWER):
                answer = await untrusted.client(headers={"X-Forwarded-User": name}).get(
                    "/api/v1/me")
                assert answer.status_code == 401, (elsewhere, name)
