"""Concurrent submits against a budget that admits exactly N: exactly N admitted, upstream called N times."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import requests

from proxy.simulator.server import Simulator
from tests.conftest import TEXT_PATH, auth, policies_with


async def release_together(count: int, send) -> list[int]:
    """Start ``count`` submits that all wait at one barrier, then go at once."""
    barrier = asyncio.Barrier(count)

    async def one(index: int) -> int:
        await barrier.wait()
        return await send(index)

    return list(await asyncio.gather(*(one(index) for index in range(count))))


async def test_a_budget_for_seven_admits_exactly_seven_of_forty(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(teams={"design": 7 * 420_000})
    headers = auth()

    async def send(index: int) -> int:
        return (await gateway.submit(TEXT_PATH, {"prompt": f"race {index}"}, headers=headers))[0]

    codes = await release_together(40, send)

    assert (codes.count(202), codes.count(402)) == (7, 33)
    assert len(simulator.calls_of("submit")) == 7
    # held or already charged (a fast job may have settled by now): exactly the seven, never more
    assert [(spent + reserved, credit) for _, spent, reserved, credit in gateway.totals()] == [(7 * 420_000, 0)]
    assert await gateway.services.store.ledger_mismatches() == []


async def test_several_teams_under_a_global_cap(start_gateway, simulator: Simulator, tmp_path) -> None:
    gateway = await start_gateway(teams={"a": 10_000_000, "b": 10_000_000, "c": 840_000},
                                  policies_dir=policies_with(tmp_path, 'global: limit_usd = "2.10"'))
    teams = ["a", "b", "c"]
    tokens = {team: auth(team=team) for team in teams}

    async def send(index: int) -> int:
        return (await gateway.submit(TEXT_PATH, {"prompt": f"race {index}"}, headers=tokens[teams[index % 3]]))[0]

    codes = await release_together(45, send)

    assert codes.count(202) == 5  # 2.10 / 0.42
    assert len(simulator.calls_of("submit")) == 5
    # spent + reserved: what was admitted, whether or not a quick job has settled by the time this reads it
    assert sum(row[1] + row[2] for row in gateway.totals("global")) == 5 * 420_000
    assert sum(row[1] + row[2] for row in gateway.totals("team:c")) <= 840_000
    assert await gateway.services.store.ledger_mismatches() == []


async def test_threads_released_by_a_barrier(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(teams={"design": 3 * 420_000})
    headers = auth()
    count = 16
    barrier = threading.Barrier(count)

    def send(index: int) -> int:
        barrier.wait()
        return requests.post(gateway.url + TEXT_PATH, json={"prompt": f"thread {index}"}, headers=headers, timeout=30).status_code

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=count) as pool:  # one thread each, or the barrier never fills
        codes = await asyncio.gather(*(loop.run_in_executor(pool, send, index) for index in range(count)))

    assert (codes.count(202), codes.count(402)) == (3, 13)
    assert len(simulator.calls_of("submit")) == 3
