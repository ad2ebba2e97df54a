"""Attacks on signing in (found by the attackers, /work/notes/attack-up): a sign-in
limit that locked everyone out behind an ingress, a sign-out that left copies of the
cookie working, sessions outliving a rotated token, a proxy header named twice."""

from __future__ import annotations

from typing import Any

import pytest

from tests.console.conftest import OPERATOR, RunningConsole
from tests.support import fetch

pytestmark = pytest.mark.integration

SECRET = "r" * 40


async def test_an_attackers_failed_sign_ins_do_not_lock_out_a_valid_token(
        bare_console: RunningConsole) -> None:
    attacker = bare_console.client()
    per_minute = bare_console.settings.console_write_rate_per_minute
    tried = [await attacker.post("/login", data={"token": "cn_wrong", "next": "/"})
             for _ in range(per_minute + 5)]
    assert [answer.status_code for answer in tried] == [401] * per_minute + [429] * 5
    operator = bare_console.client()  # from the same address (as behind an ingress)
    answer = await operator.post("/login", data={"token": bare_console.operator_token,
                                                 "next": "/"})
    assert answer.status_code == 303, (answer.status_code, answer.headers.get("retry-after"))
    assert (await operator.get("/api/v1/me")).json()["name"] == OPERATOR


async def test_behind_a_trusted_proxy_failures_count_per_client_address(
        console_factory: Any) -> None:
    async with console_factory(console_trusted_proxies=["127.0.0.1/32"],
                               console_write_rate_per_minute=2) as running:
        def through_proxy(client_address: str) -> Any:
            # the client's own claim on the left, the address the ingress saw on the right
            return running.client(headers={"X-Forwarded-For": f"6.6.6.6, {client_address}"})
        mallory = through_proxy("203.0.113.7")
        tried = [(await mallory.post("/login", data={"token": "cn_x"})).status_code
                 for _ in range(3)]
        assert tried == [401, 401, 429]
        alice = through_proxy("203.0.113.8")
        assert (await alice.post("/login", data={"token": "cn_typo"})).status_code == 401
    # from an untrusted peer the header is ignored: no escaping the limit by naming others
    async with console_factory(console_write_rate_per_minute=2) as running:
        answers = [(await running.client(headers={"X-Forwarded-For": f"198.51.100.{n}"}).post(
            "/login", data={"token": "cn_x"})).status_code for n in range(3)]
        assert answers == [401, 401, 429]


async def test_a_signed_out_session_cookie_no_longer_works(bare_console: RunningConsole) -> None:
    browser = await bare_console.session(bare_console.operator_token)
    cookie = browser.cookies["cn_session"]
    other = await bare_console.session(bare_console.operator_token)  # another browser
    csrf = bare_console.csrf_token(browser)
    out = await browser.post("/logout", data={"csrf_token": csrf})
    assert out.status_code == 303
    copy = bare_console.client(headers={"Cookie": f"cn_session={cookie}"})
    answer = await copy.get("/api/v1/me")
    assert answer.status_code == 401, answer.text
    assert (await copy.get("/")).headers["location"] == "/login"
    assert (await other.get("/api/v1/me")).json()["name"] == OPERATOR  # only that session
    [row] = await fetch(bare_console.settings, "SELECT ended_at IS NOT NULL AS ended "
                        "FROM console_sessions WHERE actor = $1 ORDER BY opened_at LIMIT 1",
                        OPERATOR)
    assert row["ended"]


async def test_a_session_signed_out_on_one_replica_ends_on_the_other(
        console_factory: Any) -> None:
    async with console_factory(console_session_secret=SECRET) as first:
        browser = await first.session(first.operator_token)
        cookie = browser.cookies["cn_session"]
        async with console_factory(console_session_secret=SECRET,
                                   console_tokens=first.settings.console_tokens) as second:
            copy = second.client(headers={"Cookie": f"cn_session={cookie}"})
            assert (await copy.get("/api/v1/me")).status_code == 200
            await browser.post("/logout", data={"csrf_token": first.csrf_token(browser)})
            assert (await copy.get("/api/v1/me")).status_code == 401


async def test_rotating_a_leaked_token_ends_the_sessions_it_opened(console_factory: Any) -> None:
    async with console_factory(console_session_secret=SECRET) as first:
        attacker = await first.session(first.operator_token)  # opened with the leaked token
        cookie = attacker.cookies["cn_session"]
    # the operator's token is rotated: same name and role, a new token (a new sha256)
    async with console_factory(console_session_secret=SECRET) as rotated:
        assert rotated.settings.console_tokens[1].name == OPERATOR
        assert rotated.settings.console_tokens[1].sha256 != first.settings.console_tokens[1].sha256
        stale = rotated.client(headers={"Cookie": f"cn_session={cookie}"})
        answer = await stale.get("/api/v1/me")
        assert answer.status_code == 401, answer.text
        fresh = await rotated.session(rotated.operator_token)  # the new token signs in
        assert (await fresh.get("/api/v1/me")).json()["name"] == OPERATOR


@pytest.mark.parametrize("headers", [
    [("X-Forwarded-User", "olga"), ("X-Forwarded-User", "vic")],
    [("X-Forwarded-User", "vic"), ("X-Forwarded-User", "olga")],
    [("X-Forwarded-User", "olga, vic")],
    [("X-Forwarded-User", "olga,olga")],
])
async def test_two_user_headers_from_a_trusted_proxy_are_refused(
        console_factory: Any, headers: list[tuple[str, str]]) -> None:
    async with console_factory(console_trusted_proxies=["127.0.0.1/32"],
                               console_proxy_operators=["olga"]) as running:
        client = running.client()
        answer = await client.get("/api/v1/me", headers=headers)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "unauthenticated"
        assert "more than one user" in answer.json()["error"]["message"]
        page = await client.get("/", headers=headers)
        assert page.status_code in (303, 401) and "olga" not in page.text
        one = await client.get("/api/v1/me", headers=[("X-Forwarded-User", "olga")])
        assert one.json()["name"] == "olga"


async def test_a_proxy_user_named_like_a_token_user_is_refused(console_factory: Any) -> None:
    # otto has an API token: a proxy user "otto" would share his audit name, his commands'
    # source and his Idempotency-Key scope (and could be answered his commands' outcomes)
    async with console_factory(console_trusted_proxies=["127.0.0.1/32"],
                               console_proxy_operators=[OPERATOR, "olga"]) as running:
        answer = await running.client(headers={"X-Forwarded-User": OPERATOR}).get("/api/v1/me")
        assert answer.status_code == 401, answer.text
        assert "also has an API token" in answer.json()["error"]["message"]
        olga = await running.client(headers={"X-Forwarded-User": "olga"}).get("/api/v1/me")
        assert olga.json()["name"] == "olga"
        assert (await running.operator().get("/api/v1/me")).json()["name"] == OPERATOR


async def test_behind_tls_the_session_cookie_is_host_only(console_factory: Any) -> None:
    async with console_factory(console_secure_cookies=True) as running:
        answer = await running.client().post("/login", data={"token": running.viewer_token})
        [header] = answer.headers.get_list("set-cookie")
        name = header.split("=", 1)[0]
        flags = {part.strip().lower() for part in header.split(";")[1:]}
        # __Host-: the browser keeps it only if Secure, set by this host, path / (no Domain)
        assert name == "__Host-cn_session"
        assert {"secure", "path=/", "httponly", "samesite=strict"} <= flags
        assert not any(flag.startswith("domain") for flag in flags)
        cookie = header.split(";", 1)[0]
        signed_in = running.client(headers={"Cookie": cookie})
        assert (await signed_in.get("/api/v1/me")).json()["role"] == "viewer"
        old_name = running.client(headers={"Cookie": cookie.replace("__Host-", "", 1)})
        assert (await old_name.get("/api/v1/me")).status_code == 401
