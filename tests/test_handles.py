"""Handles belong to a team: another team's id reads exactly like one that does not exist."""

from __future__ import annotations

import json

from proxy.simulator.server import Simulator
from tests.conftest import Gateway, auth, wait_for_status


async def test_another_teams_handle_is_404_like_an_unknown_one(start_gateway, simulator: Simulator) -> None:
    # A long refresh interval keeps the tracker from polling during the test (it would be counted as a call);
    # the job is then made due by hand, so a 404 that refreshed before checking the team would be seen.
    gateway: Gateway = await start_gateway(status_refresh_seconds=60.0)
    _, submitted, _ = await gateway.submit(headers=auth(team="design"))
    handle = submitted["request_id"]
    gateway.execute("UPDATE jobs SET checked_at = 0")
    calls_before = len(simulator.calls_of("status"))

    other_team = await gateway.status(handle, auth(team="research"))
    unknown = await gateway.status("grok-imagine-video-text-to-video_00000000-0000-7000-8000-000000000000", auth(team="research"))
    too_long = await gateway.status("x" * 500, auth(team="research"))

    expected = (404, {"error": "Not Found", "message": "Request not found"})
    assert other_team == expected
    assert unknown == expected
    assert too_long == expected
    assert len(simulator.calls_of("status")) == calls_before
    owner = await gateway.status(handle, auth(team="design"))  # the job was due: its owner's poll does refresh it
    assert owner[0] == 200 and len(simulator.calls_of("status")) == calls_before + 1


async def test_a_colleague_in_the_same_team_and_an_admin_can_read_it(gateway: Gateway) -> None:
    _, submitted, _ = await gateway.submit(headers=auth(team="design", user="alice"))

    colleague = await wait_for_status(gateway, submitted["request_id"], {"COMPLETED"}, auth(team="design", user="bob"))
    code, admin_view = await gateway.status(submitted["request_id"], auth(team="research", user="root", role="admin"))

    assert colleague["status"] == "COMPLETED"
    assert code == 200
    assert admin_view == colleague


async def test_a_handle_the_upstream_refused_is_never_visible(gateway: Gateway, simulator: Simulator) -> None:
    from proxy.simulator.server import Fault

    simulator.add_fault(Fault(op="submit", status=500))
    await gateway.submit()
    [(handle,)] = gateway.sql("SELECT id FROM handles")

    assert await gateway.status(handle) == (404, {"error": "Not Found", "message": "Request not found"})


async def raw_status(gateway: Gateway, handle: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
    async with gateway.http.get(f"{gateway.url}/v2/requests/status/{handle}", headers=headers) as response:
        return response.status, response.headers["Content-Type"], await response.read()


async def test_a_finished_jobs_remembered_answer_is_the_stores_answer_and_still_checks_the_team(
        gateway: Gateway, simulator: Simulator) -> None:
    _, submitted, _ = await gateway.submit(headers=auth(team="design", user="alice"))
    handle = submitted["request_id"]
    finished = await wait_for_status(gateway, handle, {"COMPLETED"}, auth(team="design", user="alice"))
    first = await raw_status(gateway, handle, auth(team="design", user="alice"))  # from the store, then kept
    calls_at_terminal = len(simulator.calls_of("status"))

    again = await raw_status(gateway, handle, auth(team="design", user="bob"))  # from memory
    other_team = await gateway.status(handle, auth(team="research"))
    admin = await raw_status(gateway, handle, auth(team="research", user="root", role="admin"))

    assert first[0] == 200 and first[1] == "application/json; charset=utf-8"
    assert again == first and admin == first
    assert json.loads(again[2]) == finished
    assert other_team == (404, {"error": "Not Found", "message": "Request not found"})
    assert len(simulator.calls_of("status")) == calls_at_terminal
