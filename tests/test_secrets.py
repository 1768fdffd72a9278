"""The upstream key and the JWT secret never appear in a response, a log line, or a call upstream."""

from __future__ import annotations

import logging

import pytest

from proxy.simulator.server import Fault, Simulator
from tests.conftest import EDIT_PATH, JWT_SECRET, TEXT_PATH, UPSTREAM_KEY, Gateway, auth, make_token, wait_for_status


async def test_nothing_leaks_across_success_and_every_kind_of_failure(
    gateway: Gateway, simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    token = make_token()

    async def call(method: str, path: str, **kwargs) -> None:
        async with gateway.http.request(method, gateway.url + path, **kwargs) as response:
            seen.append(f"{response.status} {dict(response.headers)} {await response.text()}")

    _, submitted, _ = await gateway.submit(headers=auth(token))
    await wait_for_status(gateway, submitted["request_id"], {"COMPLETED"})
    await call("GET", f"/v2/requests/status/{submitted['request_id']}", headers=auth(token))
    await call("POST", TEXT_PATH, json={"prompt": "p"}, headers=auth(UPSTREAM_KEY))
    await call("POST", TEXT_PATH, json={"prompt": "p"}, headers=auth(make_token(secret="x" * 40)))
    await call("POST", TEXT_PATH, json={"prompt": 1}, headers=auth(token))
    await call("POST", EDIT_PATH, data=b"{", headers=auth(token))
    await call("POST", "/no-such-model/v1/x", json={}, headers=auth(token))
    for n, fault in enumerate((Fault(op="submit", status=401), Fault(op="submit", status=500),
                               Fault(op="submit", kind="reset"), Fault(op="submit", kind="malformed"))):
        simulator.add_fault(fault)  # distinct bodies: a lost answer holds its own body's fingerprint
        await call("POST", TEXT_PATH, json={"prompt": f"p{n}"}, headers=auth(token))
    simulator.add_fault(Fault(op="status", status=503))
    _, second, _ = await gateway.submit(headers=auth(token))
    await call("GET", f"/v2/requests/status/{second['request_id']}", headers=auth(token))

    captured = "\n".join(seen) + "\n" + caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert len(seen) == 11
    assert UPSTREAM_KEY not in captured
    assert JWT_SECRET not in captured
    assert token not in "\n".join(str(call.headers) + str(call.body) for call in simulator.calls)
    assert all(call.headers["Ocp-Apim-Subscription-Key"] == UPSTREAM_KEY for call in simulator.calls)
