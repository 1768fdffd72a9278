"""The simulator behaves like the upstream document says Pixazo does."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

from proxy.simulator.server import Simulator
from tests.conftest import EDIT_PATH, TEXT_PATH, UPSTREAM_KEY, LoopbackServer, free_port, until

KEY = {"Ocp-Apim-Subscription-Key": UPSTREAM_KEY}


class Receiver:
    """A webhook receiver on loopback that records what it got, failing the first ``fail`` calls."""

    def __init__(self, fail: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.fail = fail

    async def handle(self, request: web.Request) -> web.Response:
        if self.fail:
            self.fail -= 1
            return web.Response(status=500)
        self.received.append(await request.json())
        return web.Response(status=200)


async def start_receiver(receiver: Receiver) -> LoopbackServer:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = LoopbackServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    return server


async def submit(simulator: Simulator, body: dict, headers: dict | None = None, path: str = TEXT_PATH) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(simulator.url + path, json=body, headers=KEY | (headers or {})) as response:  # type: ignore[attr-defined]
            return response.status, await response.json()


async def status(simulator: Simulator, request_id: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{simulator.url}/v2/requests/status/{request_id}", headers=KEY) as response:  # type: ignore[attr-defined]
            return response.status, await response.json()


async def test_the_key_is_checked(simulator: Simulator) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(simulator.url + TEXT_PATH, json={"prompt": "p"}) as response:  # type: ignore[attr-defined]
            assert (response.status, await response.json()) == (
                401, {"error": "Unauthorized", "message": "Access denied due to missing subscription key"})
        async with http.get(simulator.url + "/v2/requests/status/x", headers={"Ocp-Apim-Subscription-Key": "wrong"}) as response:  # type: ignore[attr-defined]
            assert (response.status, await response.json()) == (
                401, {"error": "Unauthorized", "message": "Access denied due to invalid subscription key"})
    assert simulator.jobs == {}


async def test_status_flow_is_queued_processing_completed(simulator: Simulator) -> None:
    simulator.settings.queued_seconds, simulator.settings.processing_seconds = 0.2, 0.3
    code, body = await submit(simulator, {"prompt": "p"})
    assert code == 202 and body["status"] == "QUEUED"
    assert body["polling_url"] == f"{simulator.url}/v2/requests/status/{body['request_id']}"  # type: ignore[attr-defined]

    seen = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        _, current = await status(simulator, body["request_id"])
        if not seen or seen[-1] != current["status"]:
            seen.append(current["status"])
        if current["status"] == "COMPLETED":
            break
        await asyncio.sleep(0.03)

    assert seen == ["QUEUED", "PROCESSING", "COMPLETED"]
    assert current["completed_at"] == current["updated_at"]


async def test_validation_and_unknown_model_match_the_document(simulator: Simulator) -> None:
    assert await submit(simulator, {"prompt": "p", "duration": 30}) == (
        400, {"error": "Bad Request", "message": "Invalid request for grok-imagine-video-text-to-video: 'duration' must be between 3 and 10"})
    assert await submit(simulator, {"prompt": "p"}, path="/grok-imagine-video-x/v1/grok-imagine-video-x-request") == (
        400, {"error": "Model not found", "message": "Model 'grok-imagine-video-x' not found or is disabled"})
    assert await status(simulator, "nope") == (404, {"error": "Not Found", "message": "Request not found"})


async def test_edit_video_output_uses_the_configured_length_and_auto_is_720p(simulator: Simulator) -> None:
    simulator.settings.edit_video_seconds = 9
    _, body = await submit(simulator, {"prompt": "p", "video_url": "https://v.example.com/a.mp4"}, path=EDIT_PATH)

    assert simulator.media_shape(simulator.jobs[body["request_id"]]) == (9, "720p")


async def test_terminal_webhook_fires_exactly_once(simulator: Simulator) -> None:
    receiver = Receiver()
    server = await start_receiver(receiver)
    try:
        _, body = await submit(simulator, {"prompt": "p"}, {"X-Webhook-URL": str(server.make_url("/hook"))})
        # the simulator's delivery task ends right after the terminal POST succeeds: nothing can follow it
        await until(lambda: any(d["ok"] and d["status"] == "COMPLETED" for d in simulator.webhook_deliveries))
    finally:
        await server.close()

    assert [(r["request_id"], r["status"]) for r in receiver.received] == [(body["request_id"], "COMPLETED")]
    assert receiver.received[0]["output"]["media_type"] == "video/mp4"


async def test_sync_webhook_fires_on_each_change_and_retries_failures(simulator: Simulator) -> None:
    simulator.settings.processing_seconds = 0.6  # room for the retried QUEUED delivery before PROCESSING ends
    simulator.queue_outcomes("ERROR")
    receiver = Receiver(fail=1)
    server = await start_receiver(receiver)
    try:
        _, body = await submit(simulator, {"prompt": "p"},
                               {"X-Webhook-URL": str(server.make_url("/hook")), "X-Webhook-Mode": "sync"})
        await until(lambda: any(d["ok"] and d["status"] == "ERROR" for d in simulator.webhook_deliveries))
    finally:
        await server.close()

    assert [r["status"] for r in receiver.received] == ["QUEUED", "PROCESSING", "ERROR"]
    assert receiver.received[-1]["error"] == "Internal error while processing the request"
    assert receiver.received[-1]["output"] is None
    assert [d["ok"] for d in simulator.webhook_deliveries] == [False, True, True, True]


async def test_plain_http_webhooks_are_rejected_as_documented(simulator: Simulator) -> None:
    simulator.settings.allow_http_webhooks = False

    code, body = await submit(simulator, {"prompt": "p"}, {"X-Webhook-URL": "http://example.com/hook"})

    assert (code, body) == (400, {"error": "Bad Request", "message": "X-Webhook-URL must be an https:// URL"})


async def test_control_api_sets_faults_outcomes_and_lists_calls(simulator: Simulator) -> None:
    async with aiohttp.ClientSession(headers=KEY) as http:
        base = simulator.url + "/_simulator"  # type: ignore[attr-defined]
        async with http.post(base + "/faults", json={"op": "submit", "status": 429, "retry_after": "3"}) as r:
            assert (r.status, await r.json()) == (200, {"faults": 1})
        async with http.post(base + "/faults", json={"op": "submit", "kind": "explode"}) as r:
            assert r.status == 400
        async with http.post(base + "/outcomes", json={"outcomes": ["FAILED"]}) as r:
            assert (r.status, await r.json()) == (200, {"outcomes": ["FAILED"]})
        async with http.post(simulator.url + TEXT_PATH, json={"prompt": "p"}) as r:  # type: ignore[attr-defined]
            assert (r.status, r.headers["Retry-After"]) == (429, "3")
        async with http.post(simulator.url + TEXT_PATH, json={"prompt": "p"}) as r:  # type: ignore[attr-defined]
            job_id = (await r.json())["request_id"]
        async with http.get(base + "/calls") as r:
            calls = await r.json()
        async with http.post(base + "/jobs/" + job_id + "/finish", json={"outcome": "COMPLETED"}) as r:
            assert r.status == 200
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/calls") as r:
            assert r.status == 401

    assert [(c["op"], c["body"]) for c in calls] == [("submit", {"prompt": "p"}), ("submit", {"prompt": "p"})]
    assert simulator.jobs[job_id].outcome == "COMPLETED"
    assert (await status(simulator, job_id))[1]["status"] == "COMPLETED"
