"""Property: whatever a client sends and whatever the upstream outputs, spend never passes limit + credit + overruns.

Edit-video is the one model whose cost is not known from the request: the client chooses the input the
gateway could probe, the upstream chooses the output's length. Over any sequence of such submits (inputs of
any length, outputs of any length, the input probe trusted or not), text submits and top-ups, at every step
and for every team: spent + reserved <= limit + credit + the sum of documented overruns, each overrun is a
settle entry that says so, and the report shows the truth (remaining = limit + credit - spent - reserved,
negative when overrun).
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import build_app
from proxy.config import load_config
from proxy.domain.catalog import load_catalog
from proxy.simulator.mp4 import build_mp4
from proxy.simulator.server import Simulator, SimulatorSettings
from tests.conftest import (
    EDIT_PATH,
    JWT_SECRET,
    POLICIES,
    TEXT_PATH,
    UPSTREAM_KEY,
    LoopbackServer,
    auth,
    create_teams,
    free_port,
    ledger_mismatches,
    loopback_server,
    policies_with,
)

LIMITS = {"a": 1_500_000, "b": 600_000}
PROMPTS = itertools.count()

edit = st.tuples(st.just("edit"), st.sampled_from(sorted(LIMITS)), st.integers(1, 20), st.integers(1, 20),
                 st.sampled_from(["auto", "480p", "720p"]))
text = st.tuples(st.just("text"), st.sampled_from(sorted(LIMITS)), st.integers(3, 10))
topup = st.tuples(st.just("topup"), st.sampled_from(sorted(LIMITS)), st.integers(1, 500_000))
operations = st.lists(st.one_of(edit, edit, text, topup), min_size=1, max_size=10)


async def scenario(ops: list[tuple[Any, ...]], trust_input: bool, directory: Path) -> None:
    simulator = Simulator(load_catalog(POLICIES),
                          SimulatorSettings(key=UPSTREAM_KEY, queued_seconds=0.0, processing_seconds=0.0))
    upstream = LoopbackServer(simulator.build_app(), host="127.0.0.1", port=free_port())
    await upstream.start_server()

    async def video(request: web.Request) -> web.Response:
        return web.Response(body=build_mp4(int(request.match_info["seconds"]), "480p"), content_type="video/mp4")

    db = directory / "overruns.db"
    await create_teams(db, LIMITS)
    policies = policies_with(directory, budgets=f"probe: trust_input = {'true' if trust_input else 'false'}")
    config = load_config({}, upstream_url=str(upstream.make_url("")).rstrip("/"), upstream_key=UPSTREAM_KEY,
                         jwt_secret=JWT_SECRET, db_path=str(db), policies_dir=policies, status_refresh_seconds=0.001,
                         probe_allow_private=True)
    gateway = LoopbackServer(build_app(config), host="127.0.0.1", port=free_port())
    await gateway.start_server()
    admin = auth(team="a", user="root", role="admin")
    try:
        async with aiohttp.ClientSession() as http, loopback_server(("GET", "/{seconds}.mp4", video)) as files:
            for op in ops:
                if op[0] == "topup":
                    async with http.post(gateway.make_url(f"/admin/teams/{op[1]}/topups"), headers=admin,
                                         json={"amount_usd": str(op[2] / 1_000_000), "reason": "property"}) as r:
                        assert r.status == 201, await r.text()
                    continue
                if op[0] == "edit":
                    _, team, shown, produced, resolution = op
                    simulator.settings.edit_video_seconds = produced  # what the upstream outputs, and charges
                    path, body = EDIT_PATH, {"prompt": f"p{next(PROMPTS)}", "resolution": resolution,
                                             "video_url": str(files.make_url(f"/{shown}.mp4"))}
                else:
                    _, team, seconds = op
                    path, body = TEXT_PATH, {"prompt": f"p{next(PROMPTS)}", "duration": seconds}
                async with http.post(gateway.make_url(path), headers=auth(team=team), json=body) as response:
                    assert response.status in (202, 402), await response.text()
                    handle = (await response.json()).get("request_id") if response.status == 202 else None
                if handle is not None:  # followed to its end before the upstream's output length changes
                    for _ in range(500):
                        async with http.get(gateway.make_url(f"/v2/requests/status/{handle}"), headers=admin) as r:
                            if (await r.json())["status"] in ("COMPLETED", "FAILED", "ERROR"):
                                break
                        await asyncio.sleep(0.005)
                    else:
                        raise AssertionError(f"{handle} never ended")
                    await until_settled(db)
                await check(db, http, gateway, admin)
    finally:
        await gateway.close()
        await upstream.close()


async def until_settled(db: Path) -> None:
    for _ in range(500):
        with sqlite3.connect(db) as connection:
            if connection.execute("SELECT COUNT(*) FROM reservations WHERE state = 'open'").fetchone()[0] == 0:
                return
        await asyncio.sleep(0.005)
    raise AssertionError("a reservation stayed open")


async def check(db: Path, http: aiohttp.ClientSession, gateway: LoopbackServer, admin: dict[str, str]) -> None:
    assert await ledger_mismatches(db) == []
    async with http.get(gateway.make_url("/admin/spend"), headers=admin) as response:
        report = {row["team"]: row for row in await response.json()}
    with sqlite3.connect(db) as connection:
        for team, limit in LIMITS.items():
            spent, reserved, credit = connection.execute(
                "SELECT COALESCE(SUM(spent_micros), 0), COALESCE(SUM(reserved_micros), 0), "
                "COALESCE(SUM(credit_micros), 0) FROM budget_totals WHERE scope = ?", (f"team:{team}",)).fetchone()
            overruns = connection.execute(
                "SELECT spent_delta + reserved_delta, note FROM ledger WHERE team = ? AND kind = 'settle' "
                "AND spent_delta + reserved_delta > 0", (team,)).fetchall()
            assert spent + reserved <= limit + credit + sum(amount for amount, _ in overruns), (team, spent, overruns)
            assert all("overrun" in note for _, note in overruns)
            remaining = report[team]["remaining_usd"]
            assert remaining == _usd(limit + credit - spent - reserved), (team, remaining)


def _usd(micros: int) -> str:
    from proxy.domain.money import micros_to_usd

    return micros_to_usd(micros)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=operations, trust_input=st.booleans())
def test_spend_never_passes_limit_credit_and_documented_overruns(ops: list[tuple[Any, ...]], trust_input: bool) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(ops, trust_input, Path(directory)))
