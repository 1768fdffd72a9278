"""A known sequence of requests, for tests that check what the gateway reports about them."""

from __future__ import annotations

from proxy.simulator.server import Fault, Simulator
from tests.conftest import TEXT_PATH, Gateway, Receiver, auth, until, wait_for_status

SCENARIO_TEAM = {"design": {"budget_limit_micros": 1_000_000, "soft_threshold_percent": 80}}


async def run_scenario(gateway: Gateway, simulator: Simulator) -> str:
    """Drive ``gateway`` (team design, $1.00) through a fixed story; the handle of the job left running.

    A: completed ($0.42, with a webhook), A again: a cache hit, B: ERROR (released), E: the upstream says 429, so it waits and is cancelled (released); C waits out the 3 s pause, then runs
    upstream (released), C: stuck PROCESSING ($0.42 reserved; usage reaches 84 %: one soft alert),
    D: refused 402 (only $0.16 left).
    """
    async with Receiver() as receiver:
        body_a = {"prompt": "scenario A"}
        _, a, _ = await gateway.submit(TEXT_PATH, body_a, headers=auth() | {"X-Webhook-URL": receiver.url()})
        await wait_for_status(gateway, a["request_id"], {"COMPLETED"})
        await until(lambda: len(receiver.calls) == 1)
        assert (await gateway.submit(TEXT_PATH, body_a))[2]["X-Proxy-Cache"] == "HIT"
        simulator.queue_outcomes("ERROR")
        _, b, _ = await gateway.submit(TEXT_PATH, {"prompt": "scenario B"})
        await wait_for_status(gateway, b["request_id"], {"ERROR"})
        simulator.add_fault(Fault(op="submit", status=429, retry_after="3"))
        code, e, _ = await gateway.submit(TEXT_PATH, {"prompt": "scenario E"})
        assert (code, e["status"]) == (202, "QUEUED")  # the upstream's 429 is absorbed: E waits out its Retry-After
        async with gateway.http.delete(f"{gateway.url}/v2/requests/status/{e['request_id']}", headers=auth()) as gone:
            assert gone.status == 200  # and is cancelled while it waits: released, never sent again
        simulator.queue_outcomes("STUCK")
        _, c, _ = await gateway.submit(TEXT_PATH, {"prompt": "scenario C"})  # waits out the pause E met, then runs
        await wait_for_status(gateway, c["request_id"], {"PROCESSING"}, timeout=15)
        assert (await gateway.submit(TEXT_PATH, {"prompt": "scenario D"}))[0] == 402
    return c["request_id"]
