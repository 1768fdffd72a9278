"""The tracker follows every job to its end: nobody polling, a restart mid-job, an upstream in trouble."""

from __future__ import annotations

import asyncio

from proxy.simulator.server import Fault, Simulator
from tests.conftest import Gateway, until


def job_states(gateway: Gateway) -> list[tuple[str, str | None]]:
    return gateway.sql("SELECT j.status, r.state FROM jobs j LEFT JOIN reservations r ON r.job_id = j.id")



async def test_a_job_nobody_polls_is_followed_to_its_end_and_settled(start_gateway) -> None:
    gateway = await start_gateway(status_refresh_seconds=0.05)

    assert (await gateway.submit())[0] == 202

    await until(lambda: job_states(gateway) == [("COMPLETED", "settled")])
    assert [row[1:] for row in gateway.totals()] == [(420_000, 0, 0)]


async def test_a_restart_mid_job_still_ends_completed_and_settled(start_gateway, simulator: Simulator) -> None:
    simulator.settings.processing_seconds = 0.5
    first = await start_gateway(status_refresh_seconds=0.05)
    _, body, _ = await first.submit()
    await first.server.close()
    assert job_states(first) == [("QUEUED", "open")]

    second = await start_gateway(status_refresh_seconds=0.05)

    await until(lambda: job_states(second) == [("COMPLETED", "settled")])
    assert (await second.status(body["request_id"]))[1]["status"] == "COMPLETED"


async def test_the_tracker_backs_off_while_upstream_fails_and_recovers(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(status_refresh_seconds=0.05)
    simulator.add_fault(Fault(op="status", status=503, times=4))
    backoffs: list[float] = []

    assert (await gateway.submit())[0] == 202

    async def watch() -> None:
        while True:
            backoffs.append(gateway.services.tracker.backoff)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        await until(lambda: job_states(gateway) == [("COMPLETED", "settled")])
    finally:
        watcher.cancel()
    assert max(backoffs) >= 0.1  # doubled at least once
    # reset by the round that completed the job, once that round returns (a loaded machine may show the commit first)
    await until(lambda: gateway.services.tracker.backoff == 0.0)
    assert simulator.faults == []
