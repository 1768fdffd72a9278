"""Property: over any sequence of submits, outcomes, upstream refusals and restarts, the money adds up.

At every step: each scope's totals equal the sum of its ledger, and no team
has more spent + reserved than its allowance. At the end, with every job
followed to its end: nothing is reserved, and each team has spent exactly
what an independent reckoning from the price table says.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import build_app
from proxy.config import load_config
from proxy.domain.catalog import load_catalog
from proxy.simulator.server import Fault, Simulator, SimulatorSettings
from proxy.store.sqlite import SQLiteStore
from tests.conftest import JWT_SECRET, POLICIES, TEXT_PATH, UPSTREAM_KEY, LoopbackServer, auth, free_port, ledger_mismatches

RATE = {"480p": 50_000, "720p": 70_000}
LIMITS = {"a": 1_000_000, "b": 500_000}
PROMPTS = itertools.count()  # every submit its own request: no cache hits in this property

submit = st.tuples(st.just("submit"), st.sampled_from(sorted(LIMITS)), st.integers(3, 10), st.sampled_from(sorted(RATE)),
                   st.sampled_from(["COMPLETED", "FAILED", "ERROR", "REFUSED"]))
operations = st.lists(st.one_of(submit, st.just(("restart",)), st.just(("poll",))), min_size=1, max_size=14)


async def scenario(ops: list[tuple[Any, ...]], directory: Path) -> None:
    catalog = load_catalog(POLICIES)
    simulator = Simulator(catalog, SimulatorSettings(key=UPSTREAM_KEY, queued_seconds=0.0, processing_seconds=0.0))
    upstream = LoopbackServer(simulator.build_app(), host="127.0.0.1", port=free_port())
    await upstream.start_server()
    db = directory / "property.db"
    store = SQLiteStore(db)
    await store.open()
    for team, limit in LIMITS.items():
        await store.create_team(team, limit, "month")
    await store.close()
    config = load_config({}, upstream_url=str(upstream.make_url("")).rstrip("/"), upstream_key=UPSTREAM_KEY,
                         jwt_secret=JWT_SECRET, db_path=str(db), policies_dir=POLICIES, status_refresh_seconds=0.001)
    expected = dict.fromkeys(LIMITS, 0)
    handles: list[str] = []
    gateway = LoopbackServer(build_app(config), host="127.0.0.1", port=free_port())
    await gateway.start_server()
    http = aiohttp.ClientSession()
    try:
        for op in ops:
            if op[0] == "restart":
                await gateway.close()
                gateway = LoopbackServer(build_app(config), host="127.0.0.1", port=free_port())
                await gateway.start_server()
            elif op[0] == "poll":
                await poll_all(http, gateway, handles)
            else:
                _, team, seconds, resolution, outcome = op
                if outcome == "REFUSED":
                    simulator.add_fault(Fault(op="submit", status=503))
                else:
                    simulator.queue_outcomes(outcome)
                async with http.post(gateway.make_url(TEXT_PATH), headers=auth(team=team),
                                     json={"prompt": f"p{next(PROMPTS)}", "duration": seconds,
                                           "resolution": resolution}) as response:
                    assert response.status in (202, 402, 503), await response.text()
                    if response.status == 202:
                        handles.append((await response.json())["request_id"])
                        if outcome in ("COMPLETED", "FAILED"):
                            expected[team] += seconds * RATE[resolution]
                    elif outcome != "REFUSED":
                        simulator.outcomes.pop()  # the job never reached the upstream
                    else:
                        simulator.faults.clear()
            await check_invariants(db)
        await poll_all(http, gateway, handles)
        await check_invariants(db)
        with sqlite3.connect(db) as connection:
            spent = dict(connection.execute(
                "SELECT substr(scope, 6), SUM(spent_micros) FROM budget_totals WHERE scope LIKE 'team:%' GROUP BY scope"))
            reserved = connection.execute("SELECT COALESCE(SUM(reserved_micros), 0) FROM budget_totals").fetchone()[0]
        assert reserved == 0
        assert {team: spent.get(team, 0) for team in LIMITS} == expected
    finally:
        await http.close()
        await gateway.close()
        await upstream.close()


async def poll_all(http: aiohttp.ClientSession, gateway: LoopbackServer, handles: list[str]) -> None:
    for handle in handles:
        admin = auth(team="a", role="admin")  # admins read every team's handles
        for _ in range(200):
            async with http.get(gateway.make_url(f"/v2/requests/status/{handle}"), headers=admin) as response:
                assert response.status == 200
                if (await response.json())["status"] in ("COMPLETED", "FAILED", "ERROR"):
                    break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError(f"{handle} never ended")


async def check_invariants(db: Path) -> None:
    assert await ledger_mismatches(db) == []  # totals, /metrics rollups and the day rollup, each against the ledger
    with sqlite3.connect(db) as connection:
        for team, spent, reserved, credit in connection.execute(
            "SELECT substr(scope, 6), spent_micros, reserved_micros, credit_micros FROM budget_totals WHERE scope LIKE 'team:%'"
        ):
            assert spent + reserved <= LIMITS[team] + credit, (team, spent, reserved)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_money_adds_up_over_any_sequence(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(ops, Path(directory)))
