"""Rate limits come first: before any outbound fetch, and for every request that creates a handle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from proxy.simulator.server import Simulator
from tests.conftest import EDIT_PATH, TEXT_PATH, Gateway, auth, loopback_server, policies_with, wait_for_status

BIG = bytes(8 * 1024 * 1024)  # 8 MB that is not a video: a probe reads it to its cap, parses nothing


class FileServer:
    def __init__(self) -> None:
        self.ranges: list[str | None] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()

    async def big(self, request: web.Request) -> web.StreamResponse:
        self.ranges.append(request.headers.get("Range"))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.wait_for(self.release.wait(), 5)  # held until the test has seen the probes queue up
            return web.Response(body=BIG, content_type="video/mp4")
        finally:
            self.in_flight -= 1


@pytest.fixture
async def files() -> AsyncIterator[tuple[FileServer, str]]:
    state = FileServer()
    async with loopback_server(("GET", "/big.mp4", state.big)) as server:
        yield state, str(server.make_url("/big.mp4"))


async def test_dry_runs_are_rate_limited_before_any_fetch_and_probes_are_bounded(
        start_gateway, files: tuple[FileServer, str], tmp_path) -> None:
    state, url = files
    gateway: Gateway = await start_gateway(
        teams={"design": {"budget_limit_micros": 50_000_000, "max_submits_per_minute": 1}},
        policies_dir=policies_with(tmp_path, budgets="probe: trust_input = true"))
    dry = auth() | {"X-Proxy-Dry-Run": "1"}

    async def quote(n: int) -> int:
        return (await gateway.submit(EDIT_PATH, {"prompt": f"p{n}", "video_url": url}, headers=dry))[0]

    tasks = [asyncio.create_task(quote(n)) for n in range(40)]
    while state.in_flight < 4:  # the probes that got through are all waiting on the file server
        await asyncio.sleep(0.01)
    state.release.set()
    codes = await asyncio.gather(*tasks)

    assert sorted(codes) == [200] * 10 + [429] * 30  # dry runs: 10 x the team's 1 submit per minute
    assert len(state.ranges) == 10 and state.most_in_flight == 4  # probe.concurrency
    assert set(state.ranges) == {f"bytes=0-{8 * 1024 * 1024 - 1}"}


async def test_cache_hits_and_new_idempotency_keys_count_against_the_rate_limit(start_gateway,
                                                                             simulator: Simulator) -> None:
    gateway: Gateway = await start_gateway(
        teams={"design": {"budget_limit_micros": 50_000_000, "max_submits_per_minute": 5}})
    body = {"prompt": "the same request"}
    code, first, _ = await gateway.submit(TEXT_PATH, body)
    assert code == 202
    await wait_for_status(gateway, first["request_id"], {"COMPLETED"})

    hits = [await gateway.submit(TEXT_PATH, body) for _ in range(2)]
    keyed = [await gateway.submit(TEXT_PATH, body, headers=auth() | {"Idempotency-Key": f"k{n}"}) for n in range(2)]
    refused = await gateway.submit(TEXT_PATH, body, headers=auth() | {"Idempotency-Key": "k9"})

    assert [(c, h.get("X-Proxy-Cache")) for c, _, h in hits + keyed] == [(202, "HIT")] * 4
    assert refused[0] == 429 and refused[2]["Retry-After"]
    assert len(simulator.calls_of("submit")) == 1
    handles = [row for row in gateway.ledger_rows("kind") if row[0] == "saving"]
    assert len(handles) == 4  # the refused request wrote nothing
