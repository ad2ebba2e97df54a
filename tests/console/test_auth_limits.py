"""Rate limits, secure headers, the API's error shape, the request size limit, the
probes and metrics, and the audit table's own guarantees, on a real console and its
real PostgreSQL."""

from __future__ import annotations

import copy
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.entrypoints.console.app import CONTENT_SECURITY_POLICY, is_api
from service.entrypoints.console.deps import RateLimiter
from tests.console.conftest import OPERATOR, RunningConsole
from tests.console.test_auth import app_of, endpoints, published

SECURE = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def assert_secure(headers: Any, what: object) -> None:
    for name, value in SECURE.items():
        assert headers.get(name) == value, (what, name)
    assert "unsafe-inline" not in headers["content-security-policy"]


async def test_every_answer_carries_the_secure_headers(bare_console: RunningConsole) -> None:
    anonymous, viewer = bare_console.client(), bare_console.viewer()
    session = await bare_console.session(bare_console.viewer_token)
    answers = [await anonymous.get(path) for path in
               ("/healthz", "/readyz", "/login", "/", "/api/v1/me", "/nowhere",
                "/api/v1/nowhere", "/static/console.css")]
    answers += [await anonymous.post("/login", data={"token": "wrong"}),
                await viewer.delete("/api/v1/me"),
                await session.post("/logout"),  # refused: no CSRF token
                await viewer.post("/api/v1/me", content=b"x" * 2_000_000)]
    for method, path, _ in endpoints(app_of(bare_console)):
        for client in (anonymous, viewer):
            answers.append(await client.request(method, path))
    assert {answer.status_code for answer in answers} >= {200, 303, 401, 403, 404, 405, 413}
    for answer in answers:
        assert_secure(answer.headers, (answer.request.method, answer.request.url.path,
                                       answer.status_code))


async def test_api_errors_have_one_shape(bare_console: RunningConsole) -> None:
    viewer = bare_console.viewer()
    missing = await viewer.get("/api/v1/nowhere")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found",
                                        "message": "nothing at /api/v1/nowhere"}}
    wrong_method = await viewer.delete("/api/v1/me")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    too_large = await viewer.post("/api/v1/me", content=b"{" * 2_000_000)
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "request_too_large"
    # FastAPI's own validation errors: 422 invalid_request naming the field
    typed = [(path, route) for method, path, route in endpoints(app_of(bare_console))
             if method == "GET" and is_api(path) and any(
                 param.field_info.annotation is int or "int" in str(param.field_info.annotation)
                 for param in route.dependant.query_params)]
    if typed:
        path, route = typed[0]
        name = next(param.alias for param in route.dependant.query_params
                    if "int" in str(param.field_info.annotation))
        invalid = await viewer.get(path, params={name: "not-a-number"})
        assert invalid.status_code == 422, (path, invalid.text)
        error = invalid.json()["error"]
        assert error["code"] == "invalid_request" and error["field"] == name


async def test_pages_answer_errors_as_pages(bare_console: RunningConsole) -> None:
    viewer = bare_console.viewer()
    missing = await viewer.get("/nowhere")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("text/html")
    assert "not_found" in missing.text or "nowhere" in missing.text


async def test_failed_sign_in_attempts_from_one_address_are_limited(console_factory: Any) -> None:
    async with console_factory(console_write_rate_per_minute=3) as running:
        browser = running.client()
        tried = [await browser.post("/login", data={"token": f"cn_guess-{n}"}) for n in range(3)]
        assert [answer.status_code for answer in tried] == [401, 401, 401]
        limited = await browser.post("/login", data={"token": "cn_guess-3"})
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 61
        assert "cn_session" not in browser.cookies
        # a valid token is never held back by failures (its own or anyone's): tokens are
        # 256 random bits, the limit bounds floods, not the odds of a guess
        signed_in = await browser.post("/login", data={"token": running.operator_token})
        assert signed_in.status_code == 303
        assert "cn_session" in browser.cookies


async def test_writes_beyond_the_rate_are_refused_with_retry_after_and_nothing_published(
        console_factory: Any) -> None:
    async with console_factory(console_write_rate_per_minute=2) as running:
        writes = [(method, path) for method, path, route in endpoints(app_of(running))
                  if method == "POST" and is_api(path) and any(
                      getattr(dependency.call, "__name__", "") == "write_limited"
                      for dependency in route.dependant.dependencies)]
        # issue, void, update and replay are all rate-limited: finding none means the
        # dependency went missing, which this test must catch, not skip
        assert writes, "no API write route is rate-limited"
        method, path = writes[0]
        before = await published(running.settings)
        otto = running.operator()
        answers = [await otto.request(method, path, json={"not": "a command"},
                                      headers={"Idempotency-Key": f"rate-{n}"})
                   for n in range(4)]
        statuses = [answer.status_code for answer in answers]
        assert statuses[2:] == [429, 429], statuses
        assert all(400 <= status < 500 and status != 429 for status in statuses[:2]), statuses
        limited = answers[2]
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 61
        assert await published(running.settings) == before
        rows = await running.deps.pool.fetch(
            "SELECT outcome FROM console_audit WHERE actor = $1 AND outcome = "
            "'refused:rate_limited'", OPERATOR)
        assert len(rows) == 1  # the first refusal of a burst is audited, not every one
        # a viewer's reads are not writes: never limited by it
        viewer = running.viewer()
        assert {(await viewer.get("/api/v1/me")).status_code for _ in range(5)} == {200}


async def test_probes_answer_anyone_and_metrics_count_requests_by_route(
        bare_console: RunningConsole) -> None:
    anonymous = bare_console.client()
    assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
    assert (await anonymous.get("/readyz")).json() == {"status": "ready"}
    assert (await anonymous.get("/metrics")).status_code == 401
    await bare_console.viewer().get("/api/v1/me")
    await bare_console.client().post("/login", data={"token": "cn_wrong"})
    text = (await bare_console.viewer().get("/metrics")).text
    assert 'creditnotes_console_requests_total{route="/api/v1/me",status="200"} 1.0' in text
    assert 'creditnotes_console_requests_total{route="/healthz",status="200"} 1.0' in text
    assert 'route="/login",status="401"' in text
    assert "creditnotes_console_commands_published_total" in text or (
        "creditnotes_console_commands_published" in text)
    assert "creditnotes_console_audit_rows_total" in text or (
        "creditnotes_console_audit_rows" in text)


async def test_readiness_fails_while_a_migration_is_pending(
        bare_console: RunningConsole) -> None:
    pool = bare_console.deps.pool
    await pool.execute("DELETE FROM schema_migrations WHERE version = "
                       "(SELECT max(version) FROM schema_migrations)")
    answer = await bare_console.client().get("/readyz")
    assert answer.status_code == 503
    assert "migrations pending: 0019_console.sql" in answer.json()["reason"] or (
        "migrations pending" in answer.json()["reason"])


# ------------------------------------------------------------- the audit table itself


async def test_the_audit_is_append_only_but_for_one_outcome_from_pending(
        bare_console: RunningConsole) -> None:
    from service.adapters import console_audit

    pool = bare_console.deps.pool
    row = await console_audit.begin(pool, actor="otto", role="operator", via="token",
                                    action="issue", target="in_1", idempotency_key="k1",
                                    request_digest="d" * 64)
    found = await console_audit.find(pool, "otto", "k1")
    assert found is not None and (found.outcome, found.finished_at) == ("pending", None)
    assert await console_audit.finish(pool, row, "applied") is True
    assert await console_audit.finish(pool, row, "rejected:x") is False  # once
    found = await console_audit.find(pool, "otto", "k1")
    assert found is not None and found.outcome == "applied" and found.finished_at is not None
    with pytest.raises(asyncpg.UniqueViolationError):  # one command per user and key
        await console_audit.begin(pool, actor="otto", role="operator", via="token",
                                  action="issue", target="in_1", idempotency_key="k1",
                                  request_digest="e" * 64)
    # a refusal takes no key: the same key may be used once allowed
    await console_audit.begin(pool, actor="otto", role="operator", via="token", action="void",
                              target=None, idempotency_key="k2", request_digest=None,
                              outcome="refused:csrf_failed")
    await console_audit.begin(pool, actor="otto", role="operator", via="token", action="void",
                              target=None, idempotency_key="k2", request_digest=None)
    for statement in ("UPDATE console_audit SET outcome = 'applied' WHERE outcome <> 'pending'",
                      "UPDATE console_audit SET actor = 'mallory'",
                      "UPDATE console_audit SET outcome = 'pending'",
                      "DELETE FROM console_audit",
                      "TRUNCATE console_audit"):
        with pytest.raises(asyncpg.PostgresError):
            await pool.execute(statement)  # refused even to the superuser the tests run as
    assert [r.outcome for r in await console_audit.recent(pool, 10)] == [
        "pending", "refused:csrf_failed", "applied"]


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 5), gaps=st.lists(st.floats(0, 30, allow_nan=False), max_size=60))
def test_the_limiter_never_allows_more_than_the_rate_in_any_minute(
        rate: int, gaps: list[float]) -> None:
    limiter = RateLimiter(rate)
    now, allowed = 0.0, []
    for gap in gaps:
        now += gap
        ok, retry_after, _ = limiter.check("otto", now)
        if ok:
            allowed.append(now)
        else:
            assert 1 <= retry_after <= 61
            # waiting as told is enough
            assert copy.deepcopy(limiter).check("otto", now + retry_after)[0]
    for at in allowed:
        assert len([other for other in allowed if at <= other < at + 60]) <= rate
