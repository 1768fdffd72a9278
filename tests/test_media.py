"""Local copies of output media: cached answers outlive the upstream's links."""

from __future__ import annotations

import hashlib

from proxy.simulator import Simulator
from proxy.sim_media import build_mp4
from tests.conftest import EDIT_PATH, TEXT_PATH, policies_with, wait_for_status


async def test_outputs_are_kept_and_served_by_the_gateway_after_upstream_links_expire(
    start_gateway, simulator: Simulator, tmp_path
) -> None:
    media_dir = tmp_path / "kept"
    gateway = await start_gateway(policies_dir=policies_with(
        tmp_path, cache=f'media: keep_copies = true\nmedia: directory = "{media_dir}"'))
    body = {"prompt": "a heron", "duration": 4, "resolution": "480p"}
    _, first, _ = await gateway.submit(TEXT_PATH, body)
    done = await wait_for_status(gateway, first["request_id"], {"COMPLETED"})
    expected = build_mp4(4, "480p")
    name = f"{hashlib.sha256(expected).hexdigest()}.mp4"

    assert done["output"] == {"media_url": [f"{gateway.url}/media/{name}"], "media_type": "video/mp4"}
    assert (media_dir / name[:2] / name).read_bytes() == expected

    simulator.settings.media_available = False  # the upstream's links have expired
    _, hit, headers = await gateway.submit(TEXT_PATH, body)
    answer = (await gateway.status(hit["request_id"]))[1]
    async with gateway.http.get(answer["output"]["media_url"][0]) as response:
        assert (response.status, response.content_type, await response.read()) == (200, "video/mp4", expected)
    assert headers["X-Proxy-Cache"] == "HIT"
    async with gateway.http.get(f"{gateway.url}/media/{'0' * 64}.mp4") as response:
        assert response.status == 404
    async with gateway.http.get(f"{gateway.url}/media/..%2Fgateway.db") as response:
        assert response.status == 404


async def test_a_kept_copy_is_what_settles_an_edit(start_gateway, simulator: Simulator, tmp_path) -> None:
    gateway = await start_gateway(policies_dir=policies_with(
        tmp_path, cache=f'media: keep_copies = true\nmedia: directory = "{tmp_path / "kept"}"'))
    simulator.settings.edit_video_seconds = 5
    _, body, _ = await gateway.submit(EDIT_PATH, {"prompt": "p", "video_url": "https://v.example.com/in.mp4"})

    await wait_for_status(gateway, body["request_id"], {"COMPLETED"})

    assert gateway.ledger_rows("kind", "spent_delta", "seconds", "basis")[-1] == ("settle", 400_000, 5, "output-probe")
    assert len(simulator.calls_of("submit")) == 1


async def test_without_the_policy_upstream_links_are_passed_on(gateway) -> None:
    _, body, _ = await gateway.submit()
    done = await wait_for_status(gateway, body["request_id"], {"COMPLETED"})

    assert done["output"]["media_url"][0].startswith(gateway.services.config.upstream_url + "/media/")
