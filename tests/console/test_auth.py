"""Nobody reads or writes through the console without signing in, and a viewer never
writes: every route of the running app is tried (so a route added later is covered),
on a real console with its real PostgreSQL and broker."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from fastapi import FastAPI
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.entrypoints.console import deps as console_deps
from service.entrypoints.console.app import all_routes, is_api, is_public
from service.settings import Settings
from tests.console.conftest import OPERATOR, VIEWER, RunningConsole

SAFE = {"GET", "HEAD", "OPTIONS"}


def app_of(running: RunningConsole) -> FastAPI:
    assert running.console.app is not None
    return running.console.app


def filled(path: str) -> str:
    """A route's path with each parameter given a value ("0" fits int and str alike)."""
    return re.sub(r"\{[^}]+\}", "0", path)


def endpoints(app: FastAPI) -> Iterator[tuple[str, str, APIRoute]]:
    """(method, path, route) of every route of the app, of every included router."""
    for route in all_routes(app.router.routes):
        if isinstance(route, APIRoute):
            for method in sorted((route.methods or set()) - {"HEAD"}):
                yield method, filled(route.path), route


def _calls(dependant: Any) -> Iterator[Any]:
    for dependency in dependant.dependencies:
        yield dependency.call
        yield from _calls(dependency)


def operator_only(route: APIRoute) -> bool:
    calls = set(_calls(route.dependant))
    return console_deps.operator in calls or console_deps.write_limited in calls


async def published(settings: Settings) -> int:
    """Records on credit-note-commands (all partitions): what the console would have sent."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        topic = settings.topics.credit_note_commands
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or {0}]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


async def audit_rows(running: RunningConsole, actor: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await running.deps.pool.fetch(
        "SELECT action, target, role, via, idempotency_key, outcome FROM console_audit "
        "WHERE actor = $1 ORDER BY id", actor)
    return rows


def test_the_app_has_api_and_page_routes_to_try(bare_console: RunningConsole) -> None:
    tried = list(endpoints(app_of(bare_console)))
    assert any(is_api(path) for _, path, _ in tried)
    assert any(method == "POST" for method, _, _ in tried)
    assert [path for _, path, _ in tried if is_public(path)] == ["/healthz", "/readyz",
                                                                  "/login", "/login"]


async def test_without_a_user_the_api_says_401_and_pages_send_to_sign_in(
        bare_console: RunningConsole) -> None:
    anonymous = bare_console.client()
    for method, path, _ in endpoints(app_of(bare_console)):
        if is_public(path):
            continue
        answer = await anonymous.request(method, path, json={} if method not in SAFE else None)
        if is_api(path):
            assert answer.status_code == 401, (method, path)
            assert answer.json()["error"]["code"] == "unauthenticated", (method, path)
            assert answer.headers["www-authenticate"].startswith("Bearer")
        else:
            assert answer.status_code == 303, (method, path)
            assert answer.headers["location"].startswith("/login"), (method, path)
    # and nothing leaked: no API answer carried data
    assert (await anonymous.get("/api/v1/me")).status_code == 401


async def test_a_wrong_token_a_forged_cookie_or_an_untrusted_proxy_header_is_nobody(
        bare_console: RunningConsole) -> None:
    attempts: list[dict[str, str]] = [
        {"Authorization": "Bearer cn_not-a-token"},
        {"Authorization": f"Bearer {bare_console.operator_token}x"},
        {"Authorization": f"Basic {bare_console.operator_token}"},
        {"Authorization": f"bearer{bare_console.operator_token}"},
        {"Authorization": ""},
        {"Cookie": "cn_session=eyJ1Ijoib3R0byIsInIiOiJvcGVyYXRvciJ9.00"},
        {"X-Forwarded-User": OPERATOR},  # no proxy is trusted by this console
        # a valid cookie does not rescue a request whose Authorization header is wrong
        {"Authorization": "Bearer nope"},
    ]
    for headers in attempts:
        answer = await bare_console.client(headers=headers).get("/api/v1/me")
        assert answer.status_code == 401, headers


async def test_each_configured_token_is_its_user_and_role(bare_console: RunningConsole) -> None:
    vera = (await bare_console.viewer().get("/api/v1/me")).json()
    otto = (await bare_console.operator().get("/api/v1/me")).json()
    assert vera == {"name": VIEWER, "role": "viewer", "via": "token", "csrf_token": ""}
    assert otto == {"name": OPERATOR, "role": "operator", "via": "token", "csrf_token": ""}


async def test_a_viewer_cannot_write_anywhere_and_each_refusal_is_audited(
        bare_console: RunningConsole) -> None:
    writes = [(method, path, route) for method, path, route in endpoints(app_of(bare_console))
              if method not in SAFE and operator_only(route)]
    assert writes, "no operator-only route found: the role checks have nothing to check"
    before = await published(bare_console.settings)
    bearer = bare_console.viewer()
    session = await bare_console.session(bare_console.viewer_token)
    csrf = bare_console.csrf_token(session)
    for n, (method, path, _) in enumerate(writes):
        key = f"viewer-try-{n}"
        if is_api(path):
            answer = await bearer.request(method, path, json={"invoice_id": "in_1"},
                                          headers={"Idempotency-Key": key})
            assert answer.status_code == 403, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "forbidden"
        else:
            answer = await session.request(method, path,
                                           data={"csrf_token": csrf, "idempotency_key": key})
            assert answer.status_code == 403, (method, path, answer.text)
    assert await published(bare_console.settings) == before  # nothing went out
    refused = await audit_rows(bare_console, VIEWER)
    assert [row["outcome"] for row in refused] == ["signed_in"] + ["refused:forbidden"] * len(
        writes)
    assert [row["action"] for row in refused[1:]] == [route.name for _, _, route in writes]
    assert {row["role"] for row in refused} == {"viewer"}
    api_rows = [row for row, (_, path, _) in zip(refused[1:], writes, strict=True)
                if is_api(path)]
    assert all(row["idempotency_key"].startswith("viewer-try-") for row in api_rows)


async def test_tokens_are_configured_hashed_and_never_shown(
        bare_console: RunningConsole, capfd: Any) -> None:
    configured = bare_console.settings
    for token in (bare_console.viewer_token, bare_console.operator_token):
        assert token not in repr(configured)
        assert token not in configured.model_dump_json()
    await bare_console.operator().get("/api/v1/me")
    session = await bare_console.session()
    await session.get("/api/v1/me")
    await bare_console.client().post("/login", data={"token": "cn_wrong-guess"})
    output = "".join(capfd.readouterr())
    assert "console sign-in" in output  # the log was captured
    for secret in (bare_console.viewer_token, bare_console.operator_token, "cn_wrong-guess",
                   session.cookies["cn_session"]):
        assert secret not in output


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(authorization=st.one_of(
           st.none(),
           st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                   min_size=1, max_size=80).map(lambda text: "Bearer " + text),
           st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                   max_size=80).map(str.strip)),
       cookie=st.one_of(st.none(), st.text(alphabet=st.characters(
           min_codepoint=0x21, max_codepoint=0x7e, exclude_characters=";,\""), max_size=120)),
       proxy_user=st.one_of(st.none(), st.sampled_from([OPERATOR, VIEWER, "admin"]),
                            st.text(alphabet=st.characters(min_codepoint=0x21,
                                                           max_codepoint=0x7e), max_size=30)))
async def test_random_credentials_never_authenticate(
        bare_console: RunningConsole, authorization: str | None, cookie: str | None,
        proxy_user: str | None) -> None:
    headers = {}
    if authorization:
        headers["Authorization"] = authorization
    if cookie is not None:
        headers["Cookie"] = f"cn_session={cookie}"
    if proxy_user is not None:
        headers["X-Forwarded-User"] = proxy_user
    client = bare_console.client(headers=headers)
    try:
        answer = await client.get("/api/v1/me")
        assert answer.status_code == 401, (headers, answer.text)
        page = await client.get("/")
        assert page.status_code == 303
    finally:
        await client.aclose()
