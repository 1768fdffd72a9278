"""What the gateway remembers between requests to stay fast, and the limits on how stale it may be."""

from __future__ import annotations

import asyncio
import time

import jwt

from proxy.store.factory import store_at
from proxy.store.sqlstore import TEAM_ROW_SECONDS
from tests.conftest import JWT_SECRET, Gateway, auth, make_token
from tests.test_admin import ADMIN, call


async def test_a_token_accepted_before_is_refused_once_it_expires(gateway: Gateway) -> None:
    token = make_token(ttl=2)
    expires = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])["exp"]

    before = await gateway.status("grok-imagine-video-text-to-video_unknown", auth(token))
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
    after = await gateway.status("grok-imagine-video-text-to-video_unknown", auth(token))

    assert before == (404, {"error": "Not Found", "message": "Request not found"})
    assert after == (401, {"error": "Unauthorized", "message": "The token has expired"})


async def test_a_token_with_a_string_expiry_is_treated_as_pyjwt_treats_it(gateway: Gateway) -> None:
    token = jwt.encode({"sub": "alice", "team": "design", "exp": str(int(time.time()) + 60)}, JWT_SECRET,
                       algorithm="HS256")

    first = await gateway.status("grok-imagine-video-text-to-video_unknown", auth(token))
    second = await gateway.status("grok-imagine-video-text-to-video_unknown", auth(token))

    assert first == second == (404, {"error": "Not Found", "message": "Request not found"})


LIMITED = {"design": {"budget_limit_micros": 50_000_000, "max_submits_per_minute": 5}, "research": 50_000_000}


async def test_a_team_change_through_the_admin_api_applies_to_the_next_request(start_gateway) -> None:
    gateway = await start_gateway(teams=LIMITED)
    assert (await gateway.submit())[0] == 202  # the team row (5 a minute) is now remembered

    code, _ = await call(gateway, "PATCH", "/admin/teams/design", {"max_submits_per_minute": 1}, headers=ADMIN)
    refused = await gateway.submit()

    assert code == 200
    assert refused[0] == 429
    assert refused[1]["message"].startswith("Team 'design' may submit 1 requests per minute")


async def test_a_team_change_by_another_process_applies_within_the_team_row_lifetime(start_gateway) -> None:
    gateway = await start_gateway(teams=LIMITED)
    assert (await gateway.submit())[0] == 202
    other = store_at(gateway.db_path)  # what `pixazo-proxy teams update` does
    await other.open()
    try:
        await other.update_team("design", max_submits_per_minute=1)
    finally:
        await other.close()

    await asyncio.sleep(TEAM_ROW_SECONDS + 0.05)
    refused = await gateway.submit()

    assert refused[0] == 429
    assert refused[1]["message"].startswith("Team 'design' may submit 1 requests per minute")


async def test_a_budget_change_by_another_process_applies_at_once(gateway: Gateway) -> None:
    assert (await gateway.submit())[0] == 202
    other = store_at(gateway.db_path)
    await other.open()
    try:
        await other.update_team("design", budget_limit_micros=100_000)
    finally:
        await other.close()

    code, body, _ = await gateway.submit()  # reservations read the team inside their own transaction

    assert code == 402
    assert body["error"] == "Insufficient Balance"
