"""Edit-video cannot overspend: the most the upstream can charge is reserved; a cost past it is shown, not hidden."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from proxy.simulator.mp4 import build_mp4
from proxy.simulator.server import Simulator
from tests.conftest import EDIT_PATH, Gateway, auth, loopback_server, policies_with, until, wait_for_status
from tests.test_metrics import scrape, value


@pytest.fixture
async def short_video() -> AsyncIterator[str]:
    """A 1 s MP4 served on loopback: what a hostile client shows the gateway while Pixazo gets a long one."""
    async def one(request: web.Request) -> web.Response:
        return web.Response(body=build_mp4(1, "480p"), content_type="video/mp4")

    async with loopback_server(("GET", "/one.mp4", one)) as server:
        yield str(server.make_url("/one.mp4"))


async def admin_get(gateway: Gateway, path: str) -> dict:
    async with gateway.http.get(gateway.url + path, headers=auth(role="admin")) as response:
        assert response.status == 200
        return await response.json()


async def test_the_attack_cannot_spend_past_the_budget(start_gateway, simulator: Simulator, short_video: str) -> None:
    """The repro: budget 0.20, a 1 s input shown to the gateway, 8 s outputs. Each submit would have reserved 0.06."""
    gateway: Gateway = await start_gateway(teams={"design": 200_000})
    body = {"prompt": "p", "video_url": short_video, "resolution": "480p"}

    answers = [await gateway.submit(EDIT_PATH, body) for _ in range(3)]

    assert [code for code, _, _ in answers] == [402, 402, 402]
    assert "estimated at $0.90" in answers[0][1]["message"]  # 15 s (the policy's maximum) at 480p's $0.06
    assert simulator.calls_of("submit") == []
    assert gateway.ledger_rows("kind") == []


async def test_a_job_that_costs_more_than_was_reserved_is_charged_in_full_and_shown(
        start_gateway, simulator: Simulator, short_video: str) -> None:
    gateway: Gateway = await start_gateway(teams={"design": 1_000_000})
    simulator.settings.edit_video_seconds = 20  # longer than the policy's 15 s maximum: the upstream charges 1.20

    code, body, headers = await gateway.submit(EDIT_PATH, {"prompt": "p", "video_url": short_video, "resolution": "480p"})
    assert (code, headers["X-Proxy-Estimate-USD"]) == (202, "0.90")
    await wait_for_status(gateway, body["request_id"], {"COMPLETED"})
    await until(lambda: [k for (k,) in gateway.ledger_rows("kind")] == ["reserve", "settle"])

    settle = gateway.ledger_rows("kind", "spent_delta", "reserved_delta", "seconds", "basis", "note")[1]
    assert settle == ("settle", 1_200_000, -900_000, 20, "output-probe",
                      "COMPLETED; overrun: cost $1.20, $0.30 more than the $0.90 reserved")
    spend = await admin_get(gateway, "/admin/teams/design/spend")
    assert (spend["spent_usd"], spend["remaining_usd"]) == ("1.20", "-0.20")  # never clamped to 0
    assert (await admin_get(gateway, "/admin/teams/design"))["current"]["remaining_usd"] == "-0.20"
    samples = await scrape(gateway)
    assert value(samples, "pixazo_proxy_budget_overruns_total", team="design") == 1
    assert value(samples, "pixazo_proxy_budget_overrun_usd_total", team="design") == pytest.approx(0.30)
    assert value(samples, "pixazo_proxy_budget_remaining_usd", team="design") == pytest.approx(-0.20)
    assert [a for a in gateway.services.alerts.sent if a["alert"] == "budget_overrun"] == [{
        "alert": "budget_overrun", "team": "design", "period": spend["period"], "request_id": body["request_id"],
        "reserved_usd": "0.90", "charged_usd": "1.20", "overrun_usd": "0.30"}]

    refused, message, _ = await gateway.submit()  # the team is over budget: its next paid submit is refused
    assert refused == 402 and "$0.00 left" in message["message"]
    assert await gateway.services.store.ledger_mismatches() == []


async def test_trusting_the_input_probe_is_an_explicit_policy(start_gateway, simulator: Simulator, short_video: str,
                                                              tmp_path) -> None:
    gateway: Gateway = await start_gateway(teams={"design": 200_000},
                                           policies_dir=policies_with(tmp_path, budgets="probe: trust_input = true"))

    code, body, headers = await gateway.submit(EDIT_PATH, {"prompt": "p", "video_url": short_video, "resolution": "480p"})
    await wait_for_status(gateway, body["request_id"], {"COMPLETED"})
    await until(lambda: len(gateway.ledger_rows("kind")) == 2)

    assert (code, headers["X-Proxy-Estimate-USD"]) == (202, "0.06")
    spend = await admin_get(gateway, "/admin/teams/design/spend")
    assert (spend["spent_usd"], spend["remaining_usd"]) == ("0.48", "-0.28")  # the overrun the policy allowed, shown
    assert (await gateway.submit(EDIT_PATH, {"prompt": "q", "video_url": short_video, "resolution": "480p"}))[0] == 402
