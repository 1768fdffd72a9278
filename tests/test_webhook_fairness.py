"""One team's slow receiver, or its flood of cache hits, cannot stall another team's webhooks."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from proxy.simulator.server import Simulator
from tests.conftest import TEXT_PATH, Gateway, Receiver, auth, loopback_server, policies_with, until, wait_for_status

SLOW_RECEIVERS = """
delivery: poll_seconds = 0.05
delivery: timeout_seconds = 30
"""


async def test_a_hanging_receiver_of_one_team_does_not_delay_another_teams_webhook(
        start_gateway, simulator: Simulator, tmp_path) -> None:
    gateway: Gateway = await start_gateway(webhook_allow_private=True,
                                           policies_dir=policies_with(tmp_path, webhooks=SLOW_RECEIVERS))
    release = asyncio.Event()
    hung: list[str] = []

    async def hang(request: web.Request) -> web.Response:
        hung.append((await request.json())["request_id"])
        await release.wait()  # a receiver that never answers within the delivery timeout
        return web.Response()

    async with loopback_server(("POST", "/hook", hang)) as slow:
        body = {"prompt": "the same scene, again and again"}
        _, first, _ = await gateway.submit(TEXT_PATH, body)
        await wait_for_status(gateway, first["request_id"], {"COMPLETED"})
        flood = auth() | {"X-Webhook-URL": str(slow.make_url("/hook"))}
        hits = await asyncio.gather(*(gateway.submit(TEXT_PATH, body, headers=flood) for _ in range(60)))
        assert {(code, headers["X-Proxy-Cache"]) for code, _, headers in hits} == {(202, "HIT")}
        await until(lambda: len(hung) == 2)  # the slow receiver holds its per-receiver slots

        async with Receiver() as receiver:
            _, fresh, _ = await gateway.submit(headers=auth(team="research") | {"X-Webhook-URL": receiver.url()})
            await wait_for_status(gateway, fresh["request_id"], {"COMPLETED"}, headers=auth(team="research"))
            completed_at = time.monotonic()
            await until(lambda: len(receiver.calls) == 1, timeout=10)
            delay = receiver.calls[0][2] - completed_at
            assert json.loads(receiver.calls[0][1])["request_id"] == fresh["request_id"]
        assert delay < 1.0, f"team research's webhook waited {delay:.2f} s behind team design's receiver"
        assert len(hung) == 2  # still hung: no more than per_host of the flood were ever attempted
        release.set()


async def test_joining_a_processing_job_in_sync_mode_hears_processing_first(start_gateway, simulator: Simulator,
                                                                            tmp_path) -> None:
    gateway: Gateway = await start_gateway(webhook_allow_private=True, policies_dir=policies_with(
        tmp_path, webhooks="delivery: poll_seconds = 0.05"))
    simulator.queue_outcomes("STUCK")  # PROCESSING until the test ends it
    body = {"prompt": "a long render"}
    _, first, _ = await gateway.submit(TEXT_PATH, body)
    await wait_for_status(gateway, first["request_id"], {"PROCESSING"})

    async with Receiver() as receiver:
        code, joined, headers = await gateway.submit(TEXT_PATH, body, headers=auth() | {
            "X-Webhook-URL": receiver.url(), "X-Webhook-Mode": "sync"})
        assert (code, headers["X-Proxy-Cache"], joined["status"]) == (202, "COALESCED", "PROCESSING")
        await until(lambda: len(receiver.calls) == 1)
        [job] = simulator.jobs
        simulator.finish(job, "COMPLETED")
        await until(lambda: len(receiver.calls) == 2)

    assert [(d["request_id"], d["status"]) for d in receiver.delivered()] == [
        (joined["request_id"], "PROCESSING"), (joined["request_id"], "COMPLETED")]
