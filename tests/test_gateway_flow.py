"""The drop-in path end to end: submit through the gateway, poll, get the simulator's video."""

from __future__ import annotations

import io
import re

from hachoir.metadata import extractMetadata
from hachoir.parser import guessParser
from hachoir.stream import InputIOStream

from proxy.simulator.server import Simulator
from tests.conftest import (
    EDIT_PATH,
    IMAGE_PATH,
    REFERENCE_PATH,
    TEXT_PATH,
    UPSTREAM_KEY,
    Gateway,
    auth,
    make_token,
    wait_for_status,
)

HANDLE = re.compile(r"^grok-imagine-video-text-to-video_[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


async def test_submit_answers_202_with_the_gateways_own_handle_and_polling_url(gateway: Gateway, simulator: Simulator) -> None:
    code, body, _ = await gateway.submit(TEXT_PATH, {"prompt": "a lighthouse at dusk"})

    assert code == 202
    assert set(body) == {"request_id", "status", "polling_url"}
    assert HANDLE.match(body["request_id"])
    assert body["status"] == "QUEUED"
    assert body["polling_url"] == f"{gateway.url}/v2/requests/status/{body['request_id']}"
    upstream_ids = list(simulator.jobs)
    assert len(upstream_ids) == 1
    assert body["request_id"] != upstream_ids[0]


async def test_forwarded_call_carries_the_real_key_and_the_normalized_body_only(gateway: Gateway, simulator: Simulator) -> None:
    token = make_token()
    headers = auth(token) | {"Authorization": f"Bearer {token}", "X-Custom": "kept-out"}

    code, _, _ = await gateway.submit(TEXT_PATH, {"prompt": "a lighthouse", "duration": 4}, headers=headers)

    assert code == 202
    [call] = simulator.calls_of("submit")
    assert call.path == TEXT_PATH
    assert call.headers["Ocp-Apim-Subscription-Key"] == UPSTREAM_KEY
    assert "Authorization" not in call.headers
    assert "X-Custom" not in call.headers
    assert token not in str(call.headers)
    assert call.body == {"prompt": "a lighthouse", "duration": 4, "aspect_ratio": "16:9", "resolution": "720p"}


async def test_each_model_forwards_its_defaults(gateway: Gateway, simulator: Simulator) -> None:
    image = "https://img.example.com/knight.png"
    video = "https://vid.example.com/in.mp4"
    cases = [
        (IMAGE_PATH, {"prompt": "knight", "image_url": image},
         {"prompt": "knight", "image_url": image, "duration": 6, "aspect_ratio": "auto", "resolution": "720p"}),
        (EDIT_PATH, {"prompt": "Colorize the video", "video_url": video},
         {"prompt": "Colorize the video", "video_url": video, "resolution": "auto"}),
        (REFERENCE_PATH, {"prompt": "A @Image1 running", "reference_image_urls": [image]},
         {"prompt": "A @Image1 running", "reference_image_urls": [image], "duration": 8, "aspect_ratio": "16:9",
          "resolution": "480p"}),
    ]
    for path, sent, forwarded in cases:
        code, body, _ = await gateway.submit(path, sent)
        assert code == 202, body
        assert simulator.calls_of("submit")[-1].body == forwarded
        assert simulator.calls_of("submit")[-1].path == path


async def test_status_follows_the_job_to_completed_and_returns_a_real_video(gateway: Gateway) -> None:
    _, submitted, _ = await gateway.submit(TEXT_PATH, {"prompt": "a lighthouse", "duration": 5, "resolution": "480p"})
    handle = submitted["request_id"]

    final = await wait_for_status(gateway, handle, {"COMPLETED"})

    assert final["status"] == "COMPLETED"
    assert final["request_id"] == handle
    assert final["model_id"] == "grok-imagine-video-text-to-video"
    assert final["error"] is None
    assert final["output"]["media_type"] == "video/mp4"
    assert final["completed_at"] is not None
    assert set(final) == {"request_id", "status", "model_id", "error", "output", "created_at", "updated_at", "completed_at"}
    [media_url] = final["output"]["media_url"]
    async with gateway.http.get(media_url) as response:
        assert response.status == 200
        assert response.content_type == "video/mp4"
        video = await response.read()
    metadata = extractMetadata(guessParser(InputIOStream(io.BytesIO(video))))
    assert metadata.get("duration").total_seconds() == 5
    assert (metadata.get("width"), metadata.get("height")) == (854, 480)


async def test_failed_and_error_outcomes_come_back_in_the_upstream_shape(gateway: Gateway, simulator: Simulator) -> None:
    simulator.queue_outcomes("FAILED", "ERROR")
    _, first, _ = await gateway.submit()
    _, second, _ = await gateway.submit()

    failed = await wait_for_status(gateway, first["request_id"], {"FAILED", "ERROR", "COMPLETED"})
    errored = await wait_for_status(gateway, second["request_id"], {"FAILED", "ERROR", "COMPLETED"})

    assert (failed["status"], failed["output"]) == ("FAILED", None)
    assert failed["error"] == "Generation failed: the model could not produce a video for this request"
    assert (errored["status"], errored["output"]) == ("ERROR", None)
    assert errored["error"] == "Internal error while processing the request"


async def test_terminal_jobs_are_never_fetched_again(gateway: Gateway, simulator: Simulator) -> None:
    _, submitted, _ = await gateway.submit()
    await wait_for_status(gateway, submitted["request_id"], {"COMPLETED"})
    calls_at_terminal = len(simulator.calls_of("status"))

    for _ in range(10):
        code, body = await gateway.status(submitted["request_id"])
        assert (code, body["status"]) == (200, "COMPLETED")

    assert len(simulator.calls_of("status")) == calls_at_terminal


async def test_200_clients_polling_one_job_make_one_upstream_call_per_interval(start_gateway, simulator: Simulator) -> None:
    import asyncio
    import math
    import time

    interval = 0.4
    gateway = await start_gateway(status_refresh_seconds=interval)
    simulator.queue_outcomes("STUCK")
    _, submitted, _ = await gateway.submit()
    headers = auth()
    started, polls = time.monotonic(), 0

    while polls < 600 or time.monotonic() - started < 1.3:  # at least three intervals, and at least 600 polls
        results = await asyncio.gather(*(gateway.status(submitted["request_id"], headers) for _ in range(200)))
        assert {code for code, _ in results} == {200}
        polls += len(results)
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started

    upstream_calls = len(simulator.calls_of("status"))
    assert polls >= 600
    assert 1 <= upstream_calls <= math.floor(elapsed / interval) + 1


async def test_handles_survive_a_restart(start_gateway, simulator: Simulator) -> None:
    first = await start_gateway()
    _, submitted, _ = await first.submit()
    await first.server.close()

    second = await start_gateway()
    final = await wait_for_status(second, submitted["request_id"], {"COMPLETED"})

    assert final["status"] == "COMPLETED"
    assert final["request_id"] == submitted["request_id"]
