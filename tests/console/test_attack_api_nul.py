"""Attack (bad input): a NUL character reaches PostgreSQL (text cannot hold one) from
a read's path, filter or page cursor: 500 "the console failed" instead of a 4xx with
a code ("bad input on every route: a clear 4xx with a reason code"). Regression: 400
``bad_request`` naming the field (pages included: they call the same actions)."""

from __future__ import annotations

import base64
import json

import pytest

from tests.console.conftest import RunningConsole

CURSOR = base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00+00:00", "cn\x00"]).encode()
                                  ).decode().rstrip("=")


@pytest.mark.parametrize("path", [
    "/api/v1/invoices/in%00x?dead_letters=false",
    "/api/v1/credit-notes/cn%00x",
    "/api/v1/credit-notes?customer_id=cus%00",
    f"/api/v1/credit-notes?page={CURSOR}",
    "/search?q=in%00x",
    "/invoices/in%00x",
    "/api/v1/invoices/in%00x/preview",
    "/api/v1/credit-notes/cn%00x/void",
])
async def test_a_nul_in_a_read_is_a_4xx(bare_console: RunningConsole, path: str) -> None:
    client = bare_console.operator()
    if path.endswith(("/preview", "/void")):
        answer = await client.post(path, json={"reason": "other", "amount": 1},
                                   headers={"Idempotency-Key": "k-nul"})
    else:
        answer = await client.get(path)
    assert 400 <= answer.status_code < 500, (path, answer.status_code, answer.text[:200])
