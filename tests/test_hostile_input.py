"""Hostile bodies and query strings: each a 400 in the upstream's shape, never a 500 or a traceback."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from proxy.simulator.server import Simulator
from tests.conftest import TEXT_PATH, Gateway, auth

HOSTILE_BODIES = {
    "lone-surrogate-escape": (b'{"prompt": "x\\ud800y"}', "lone UTF-16 surrogate"),
    "lone-low-surrogate": (b'{"prompt": "x\\uDC00"}', "lone UTF-16 surrogate"),
    "surrogate-bytes": (b'{"prompt": "x\xed\xa0\x80y"}', "not valid JSON"),
    "deep-array": (b"[" * 200_000, "nested too deeply"),
    "deep-object": (b'{"a":' * 100_000, "nested too deeply"),
    "latin-1": (b'{"prompt": "caf\xe9"}', "not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
@pytest.mark.parametrize("route", ["submit", "admin"])
async def test_hostile_bodies_are_400_on_every_json_route(gateway: Gateway, simulator: Simulator,
                                                          caplog: pytest.LogCaptureFixture, name: str,
                                                          route: str) -> None:
    raw, expected = HOSTILE_BODIES[name]
    path, headers = (TEXT_PATH, auth() | {"Cache-Control": "no-store"}) if route == "submit" else (
        "/admin/teams/design/topups", auth(role="admin"))
    async with gateway.http.post(gateway.url + path, data=raw, headers=headers) as response:
        body = await response.json()
    assert response.status == 400, body
    assert set(body) == {"error", "message"} and expected in body["message"]
    assert simulator.calls_of("submit") == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a hostile body was logged as an error"


async def test_a_valid_surrogate_pair_is_still_accepted(gateway: Gateway) -> None:
    raw = '{"prompt": "a \\ud83c\\udf0a wave \U0001F30A"}'.encode()
    async with gateway.http.post(gateway.url + TEXT_PATH, data=raw, headers=auth()) as response:
        assert response.status == 202, await response.text()


@pytest.mark.parametrize(("query", "name"), [
    ("before=99999999999999999999999", "before"),
    ("before=%C2%B2", "before"),
    ("before=-1", "before"),
    ("before=0", "before"),
    ("before=1.5", "before"),
    ("limit=%C2%B2", "limit"),
    ("limit=0", "limit"),
    ("limit=1001", "limit"),
    ("limit=99999999999999999999999", "limit"),
    ("limit=+5", "limit"),
])
async def test_numeric_query_parameters_are_checked_strictly(gateway: Gateway, query: str, name: str) -> None:
    for path in ("/admin/teams/design/ledger", "/admin/teams/design/requests"):
        if name == "before" and path.endswith("requests"):
            continue  # there 'before' is a timestamp, not a number
        async with gateway.http.get(f"{gateway.url}{path}?{query}", headers=auth(role="admin")) as response:
            body = await response.json()
        assert response.status == 400, (path, query, body)
        assert body["error"] == "Bad Request" and f"'{name}'" in body["message"]


async def test_a_good_before_pages_the_ledger(gateway: Gateway) -> None:
    for _ in range(3):
        assert (await gateway.submit())[0] == 202
    async with gateway.http.get(f"{gateway.url}/admin/teams/design/ledger?limit=2",
                                headers=auth(role="admin")) as response:
        first = await response.json()
    async with gateway.http.get(f"{gateway.url}/admin/teams/design/ledger?before={first[-1]['id']}",
                                headers=auth(role="admin")) as response:
        rest = await response.json()
    assert response.status == 200
    assert [e["id"] for e in rest] == sorted((e["id"] for e in rest), reverse=True)
    assert all(e["id"] < first[-1]["id"] for e in rest) and len(first) + len(rest) >= 3


async def test_an_admin_body_with_surrogate_pairs_and_decimals_is_judged_not_crashed(gateway: Gateway) -> None:
    raw = b'{"budget_usd": 12.5, "max_concurrent_jobs": {"\\ud85c\\udd95": 5.7e+16}}'
    async with gateway.http.patch(gateway.url + "/admin/teams/design", data=raw, headers=auth(role="admin")) as response:
        body = await response.json()
    assert (response.status, body["message"]) == (400, "'max_concurrent_jobs' must be a whole number of at least 1")


@pytest.mark.parametrize("request_head", [
    b"GET /v2/requests/status/" + b"x" * 20_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: a\r\nOcp-Apim-Subscription-Key: " + b"t" * 20_000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Header Line\r\n\r\n",
], ids=["long-request-line", "long-header", "malformed-header"])
async def test_requests_the_http_parser_refuses_are_answered_in_the_upstream_shape(
        gateway: Gateway, request_head: bytes, caplog: pytest.LogCaptureFixture) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request_head)
    await writer.drain()
    raw = await reader.read()
    writer.close()

    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400" and b"application/json" in head
    assert json.loads(body)["error"] == "Bad Request" and set(json.loads(body)) == {"error", "message"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
