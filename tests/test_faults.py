"""Upstream faults, one by one: a clear answer in the upstream's shape, no leaked reservation, no submit sent twice."""

from __future__ import annotations

import pytest

from proxy.simulator.server import Fault, Simulator
from tests.conftest import Gateway, until, wait_for_status

SUBMIT_FAULTS = [
    # (an upstream 429 is no refusal: the job waits in the local queue, see test_queue.py)
    (Fault(op="submit", status=500), 500, "Internal Server Error", {}),
    (Fault(op="submit", status=502), 502, "Bad Gateway", {}),
    (Fault(op="submit", status=503, retry_after="30"), 503, "Service Unavailable", {"Retry-After": "30"}),
    (Fault(op="submit", kind="reset"), 502, "Bad Gateway", {}),
    (Fault(op="submit", kind="malformed"), 502, "Bad Gateway", {}),
    (Fault(op="submit", kind="truncated"), 502, "Bad Gateway", {}),
    (Fault(op="submit", kind="delay", delay=1.0), 504, "Gateway Timeout", {}),
    (Fault(op="submit", kind="delay", delay=1.0, stage="after"), 504, "Gateway Timeout", {}),  # created upstream, answer lost
]


@pytest.mark.parametrize(("fault", "code", "title", "headers"), SUBMIT_FAULTS,
                         ids=[f"{f.kind}-{f.status}-{f.stage}-{bool(f.retry_after)}" for f, *_ in SUBMIT_FAULTS])
async def test_a_submit_fault_is_answered_clearly_never_resent_and_held_only_if_it_may_have_run(
    start_gateway, simulator: Simulator, fault: Fault, code: int, title: str, headers: dict
) -> None:
    gateway: Gateway = await start_gateway(upstream_timeout=0.5)
    simulator.add_fault(fault)

    status, body, response_headers = await gateway.submit()

    assert (status, set(body), body["error"]) == (code, {"error", "message"}, title)
    assert "Traceback" not in body["message"] and len(body["message"]) < 300
    assert {name: response_headers.get(name) for name in headers} == headers
    assert len(simulator.calls_of("submit")) == 1
    # Policy (settlement.indeterminate): an upstream error status is a refusal, released at once; a reset, an
    # unreadable answer or a timeout after sending may hide a job the upstream accepted: its money stays held.
    held = 0 if fault.kind == "status" else 420_000
    assert [row[1:] for row in gateway.totals()] == [(0, held, 0)]
    assert await gateway.services.store.ledger_mismatches() == []
    assert (await gateway.submit())[0] == 202  # and the gateway carries on once upstream does


STATUS_FAULTS = [
    Fault(op="status", status=429, retry_after="1", times=3),
    Fault(op="status", status=500, times=3),
    Fault(op="status", status=502, times=3),
    Fault(op="status", status=503, times=3),
    Fault(op="status", kind="reset", times=3),
    Fault(op="status", kind="malformed", times=3),
    Fault(op="status", kind="truncated", times=3),
    Fault(op="status", kind="delay", delay=1.0, times=2),
]


@pytest.mark.parametrize("fault", STATUS_FAULTS, ids=[f"{f.kind}-{f.status}" for f in STATUS_FAULTS])
async def test_the_tracker_recovers_from_status_faults_and_settles(start_gateway, simulator: Simulator,
                                                                  fault: Fault) -> None:
    gateway: Gateway = await start_gateway(upstream_timeout=0.5, status_refresh_seconds=0.05)
    simulator.add_fault(fault)

    code, body, _ = await gateway.submit()
    assert code == 202
    await until(lambda: [r[0] for r in gateway.ledger_rows("kind")] == ["reserve", "settle"], timeout=15)

    final = await wait_for_status(gateway, body["request_id"], {"COMPLETED"})
    assert final["status"] == "COMPLETED"
    assert simulator.faults == []
    assert len(simulator.calls_of("submit")) == 1
    assert [row[1:] for row in gateway.totals()] == [(420_000, 0, 0)]
