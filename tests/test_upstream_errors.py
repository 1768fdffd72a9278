"""When the upstream refuses, fails or stalls: a clear answer in its shape, never a trace, never a retried submit."""

from __future__ import annotations

import time

import pytest
from aiohttp import web

from proxy.simulator.server import Fault, Simulator
from tests.conftest import UPSTREAM_KEY, Gateway, LoopbackServer, auth, free_port, wait_for_status


def job_statuses(gateway: Gateway) -> list[tuple[str, str | None]]:
    return gateway.sql("SELECT status, upstream_id FROM jobs ORDER BY id")


HELD = ". The request may have reached the upstream, so its cost stays reserved until the gateway resolves it; retry with the same Idempotency-Key to learn the outcome."

REFUSALS = [
    (Fault(op="submit", status=402), 402, {"error": "Insufficient Balance", "message": "Your wallet does not have enough balance."}),
    (Fault(op="submit", status=400), 400, {"error": "Bad Request", "message": "Simulated upstream fault"}),
    (Fault(op="submit", status=403), 403, {"error": "Forbidden", "message": "Simulated upstream fault"}),
    (Fault(op="submit", status=500), 500, {"error": "Internal Server Error", "message": "Simulated upstream fault"}),
    (Fault(op="submit", status=503), 503, {"error": "Service Unavailable", "message": "Simulated upstream fault"}),
    (Fault(op="submit", kind="reset"), 502, {"error": "Bad Gateway",
                                             "message": "The upstream connection failed before it answered" + HELD}),
    (Fault(op="submit", kind="malformed"), 502, {"error": "Bad Gateway",
                                                 "message": "The upstream answered with an unreadable body" + HELD}),
    (Fault(op="submit", kind="truncated"), 502, {"error": "Bad Gateway",
                                                 "message": "The upstream answered with an unreadable body" + HELD}),
]


@pytest.mark.parametrize(("fault", "code", "body"), REFUSALS, ids=[f"{f.kind}-{f.status}" for f, _, _ in REFUSALS])
async def test_upstream_refusals_map_to_its_status_and_shape_and_are_not_retried(
    gateway: Gateway, simulator: Simulator, fault: Fault, code: int, body: dict
) -> None:
    simulator.add_fault(fault)

    status, answer, _ = await gateway.submit()

    assert (status, answer) == (code, body)
    assert len(simulator.calls_of("submit")) == 1
    # An error status is a refusal (released); a reset or an unreadable answer may hide an accepted job (held)
    assert job_statuses(gateway) == [("INDETERMINATE" if fault.kind != "status" else "REJECTED", None)]


async def test_an_upstream_429_pauses_submits_for_its_retry_after_instead_of_failing(gateway: Gateway,
                                                                                   simulator: Simulator) -> None:
    simulator.add_fault(Fault(op="submit", status=429, retry_after="7"))
    before = time.time()

    code, body, headers = await gateway.submit()

    assert (code, body["status"], headers["X-Proxy-Queue-Position"]) == (202, "QUEUED", "1")
    [(paused_until,)] = gateway.sql("SELECT next_send FROM upstream_gate")
    assert before + 7 <= paused_until <= time.time() + 7
    assert gateway.sql("SELECT status FROM jobs") == [("WAITING",)]


async def test_a_slow_upstream_is_504_and_the_submit_is_not_resent(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(upstream_timeout=0.3)
    simulator.add_fault(Fault(op="submit", kind="delay", delay=1.0))

    code, body, _ = await gateway.submit()

    assert (code, body) == (504, {"error": "Gateway Timeout",
                                  "message": "The upstream did not answer within 0.3 seconds" + HELD})
    assert len(simulator.calls_of("submit")) == 1
    assert job_statuses(gateway) == [("INDETERMINATE", None)]


async def test_an_unreachable_upstream_is_502(start_gateway) -> None:
    gateway = await start_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")

    code, body, _ = await gateway.submit()

    assert (code, body) == (502, {"error": "Bad Gateway", "message": "The upstream could not be reached"})


async def test_a_wrong_upstream_key_is_the_upstreams_401(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(upstream_key="not-the-real-key-at-all")

    code, body, _ = await gateway.submit()

    assert (code, body) == (401, {"error": "Unauthorized", "message": "Access denied due to invalid subscription key"})


async def test_an_upstream_that_echoes_the_key_has_it_scrubbed(start_gateway) -> None:
    async def echo(request: web.Request) -> web.Response:
        key = request.headers["Ocp-Apim-Subscription-Key"]
        return web.json_response({"error": f"Bad key {key}", "message": f"key {key} is wrong"}, status=400)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    fake = LoopbackServer(app, host="127.0.0.1", port=free_port())
    await fake.start_server()
    try:
        gateway = await start_gateway(upstream_url=str(fake.make_url("")).rstrip("/"))
        code, body, _ = await gateway.submit()
    finally:
        await fake.close()

    assert (code, body) == (400, {"error": "Bad key [redacted]", "message": "key [redacted] is wrong"})
    assert UPSTREAM_KEY not in str(body)


async def test_status_serves_the_stored_state_while_upstream_fails_then_recovers(gateway: Gateway, simulator: Simulator) -> None:
    _, submitted, _ = await gateway.submit()
    simulator.add_fault(Fault(op="status", status=503, times=3))

    code, body = await gateway.status(submitted["request_id"])
    assert (code, body["status"]) == (200, "QUEUED")

    final = await wait_for_status(gateway, submitted["request_id"], {"COMPLETED"})
    assert final["status"] == "COMPLETED"


@pytest.mark.parametrize("kind", ["malformed", "truncated", "reset"])
async def test_status_survives_garbage_from_upstream(gateway: Gateway, simulator: Simulator, kind: str) -> None:
    _, submitted, _ = await gateway.submit()
    simulator.add_fault(Fault(op="status", kind=kind))

    code, body = await gateway.status(submitted["request_id"])

    assert (code, body["status"]) == (200, "QUEUED")
    assert (await wait_for_status(gateway, submitted["request_id"], {"COMPLETED"}))["status"] == "COMPLETED"


async def test_a_job_the_upstream_forgot_keeps_its_last_known_state(gateway: Gateway, simulator: Simulator) -> None:
    simulator.queue_outcomes("STUCK")
    _, submitted, _ = await gateway.submit()
    await wait_for_status(gateway, submitted["request_id"], {"PROCESSING"})
    simulator.forget(next(iter(simulator.jobs)))

    code, body = await gateway.status(submitted["request_id"], auth())

    assert (code, body["status"]) == (200, "PROCESSING")
