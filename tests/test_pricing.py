"""Prices from policies/, exact: every model's estimate, and edit-video's length read from its input."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from proxy.domain.budget import period_key
from proxy.simulator.mp4 import build_mp4
from proxy.simulator.server import Simulator
from tests.conftest import (
    EDIT_PATH,
    IMAGE_PATH,
    REFERENCE_PATH,
    TEXT_PATH,
    Gateway,
    LoopbackServer,
    auth,
    free_port,
    policies_with,
)

DRY = {"X-Proxy-Dry-Run": "1"}
IMG = "https://img.example.com/a.png"


FETCHES: list[str] = []


@pytest.fixture
async def videos() -> AsyncIterator[str]:
    """A loopback file server: /seven.mp4 is a 7 s 480p MP4, /garbage.mp4 is not a video; FETCHES counts GETs."""
    app = web.Application()
    FETCHES.clear()

    async def seven(request: web.Request) -> web.Response:
        FETCHES.append(request.path)
        return web.Response(body=build_mp4(7, "480p"), content_type="video/mp4")

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=b"not a video" * 100, content_type="video/mp4")

    app.router.add_get("/seven.mp4", seven)
    app.router.add_get("/garbage.mp4", garbage)
    server = LoopbackServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def quote(gateway: Gateway, path: str, body: dict) -> dict:
    code, answer, headers = await gateway.submit(path, body, headers=auth() | DRY)
    assert code == 200, answer
    assert headers["X-Proxy-Estimate-USD"] == answer["estimate_usd"]
    return answer


@pytest.mark.parametrize(("path", "body", "usd", "seconds", "resolution"), [
    (TEXT_PATH, {"prompt": "p"}, "0.42", 6, "720p"),
    (TEXT_PATH, {"prompt": "p", "duration": 10, "resolution": "480p"}, "0.50", 10, "480p"),
    (TEXT_PATH, {"prompt": "p", "duration": 3}, "0.21", 3, "720p"),
    (IMAGE_PATH, {"prompt": "p", "image_url": IMG}, "0.42", 6, "720p"),
    (REFERENCE_PATH, {"prompt": "p", "reference_image_urls": [IMG]}, "0.40", 8, "480p"),
    (REFERENCE_PATH, {"prompt": "p", "reference_image_urls": [IMG], "duration": 15, "resolution": "720p"}, "1.05", 15, "720p"),
])
async def test_estimates_follow_the_upstream_price_tables(gateway: Gateway, simulator: Simulator, path: str,
                                                         body: dict, usd: str, seconds: int, resolution: str) -> None:
    answer = await quote(gateway, path, body)

    assert (answer["estimate_usd"], answer["seconds"], answer["resolution"], answer["basis"]) == (
        usd, seconds, resolution, "params")
    assert simulator.calls == []


async def test_edit_video_reserves_the_most_the_upstream_can_charge_and_fetches_nothing(gateway: Gateway,
                                                                                          videos: str) -> None:
    """A client controls what a probe of its input sees, so by default the input is not trusted (nor fetched)."""
    auto = await quote(gateway, EDIT_PATH, {"prompt": "p", "video_url": f"{videos}/seven.mp4"})
    fixed = await quote(gateway, EDIT_PATH, {"prompt": "p", "video_url": f"{videos}/seven.mp4", "resolution": "480p"})

    assert (auto["estimate_usd"], auto["seconds"], auto["resolution"], auto["basis"]) == ("1.20", 15, "720p", "policy-max")
    assert (fixed["estimate_usd"], fixed["seconds"], fixed["resolution"], fixed["basis"]) == ("0.90", 15, "480p", "policy-max")
    assert FETCHES == []


@pytest.fixture
async def trusting(start_gateway, tmp_path) -> Gateway:
    """A gateway whose policy trusts the input probe (probe.trust_input = true)."""
    return await start_gateway(policies_dir=policies_with(tmp_path, budgets="probe: trust_input = true"))


async def test_a_trusted_input_probe_reserves_the_probed_length(trusting: Gateway, videos: str) -> None:
    auto = await quote(trusting, EDIT_PATH, {"prompt": "p", "video_url": f"{videos}/seven.mp4"})
    fixed = await quote(trusting, EDIT_PATH, {"prompt": "p", "video_url": f"{videos}/seven.mp4", "resolution": "480p"})

    assert (auto["estimate_usd"], auto["seconds"], auto["resolution"], auto["basis"]) == ("0.56", 7, "720p", "policy-max")
    assert (fixed["estimate_usd"], fixed["seconds"], fixed["resolution"], fixed["basis"]) == ("0.42", 7, "480p", "input-probe")
    assert FETCHES == ["/seven.mp4", "/seven.mp4"]


@pytest.mark.parametrize("video", ["/garbage.mp4", "/missing.mp4"])
async def test_edit_video_falls_back_to_the_policy_maximum(trusting: Gateway, videos: str, video: str) -> None:
    answer = await quote(trusting, EDIT_PATH, {"prompt": "p", "video_url": videos + video, "resolution": "480p"})

    assert (answer["estimate_usd"], answer["seconds"], answer["basis"]) == ("0.90", 15, "policy-max")


async def test_probing_never_reaches_private_addresses_unless_allowed(start_gateway, videos: str, tmp_path) -> None:
    gateway = await start_gateway(probe_allow_private=False,
                                  policies_dir=policies_with(tmp_path, budgets="probe: trust_input = true"))
    for url in (f"{videos}/seven.mp4", videos.replace("127.0.0.1", "localhost") + "/seven.mp4"):
        answer = await quote(gateway, EDIT_PATH, {"prompt": "p", "video_url": url, "resolution": "480p"})
        assert (answer["seconds"], answer["basis"]) == (15, "policy-max"), url


async def test_a_dry_run_reserves_nothing_and_says_what_is_left(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(teams={"design": 1_000_000})
    await gateway.submit()  # reserves 0.42

    answer = await quote(gateway, TEXT_PATH, {"prompt": "p", "duration": 10})

    assert answer == {
        "dry_run": True, "model_id": "grok-imagine-video-text-to-video", "estimate_usd": "0.70", "seconds": 10,
        "resolution": "720p", "basis": "params", "team": "design",
        "period": period_key("month", gateway.services.clock.now()),
        "budget_limit_usd": "1.00", "budget_spent_usd": "0.00", "budget_reserved_usd": "0.42",
        "budget_remaining_usd": "0.58", "admitted": False,
        "reason": f"Team 'design' has $0.58 left of its $1.00 month budget ({period_key('month', gateway.services.clock.now())}); "
                  "this request is estimated at $0.70",
    }
    assert len(simulator.calls_of("submit")) == 1
    assert [row[0] for row in gateway.ledger_rows("kind")] == ["reserve"]
