"""No reservation stays open forever: crashes mid-submit, jobs nobody polls, jobs that never end."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import requests

from proxy.jobs.sweeper import INDETERMINATE_CHARGED, INDETERMINATE_RELEASED, STALE_ERROR
from proxy.simulator.server import Fault, Simulator
from proxy.store.sqlite import SQLiteStore
from tests.conftest import TEXT_PATH, auth, free_port, ledger_mismatches, policies_with, until
from tests.processes import GatewayProcess

FAST_SWEEP = """
sweeper: interval_seconds = 0.1
sweeper: orphan_submit_seconds = 0.3
"""



def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql).fetchall()


async def test_a_job_nobody_polls_still_settles(start_gateway, tmp_path: Path) -> None:
    gateway = await start_gateway(policies_dir=policies_with(tmp_path, FAST_SWEEP))

    assert (await gateway.submit())[0] == 202
    await until(lambda: [r[0] for r in gateway.ledger_rows("kind")] == ["reserve", "settle"])

    assert [row[1:] for row in gateway.totals()] == [(420_000, 0, 0)]


async def test_a_job_that_never_ends_is_resolved_after_the_stale_timeout(start_gateway, simulator: Simulator,
                                                                      tmp_path: Path) -> None:
    gateway = await start_gateway(policies_dir=policies_with(tmp_path, FAST_SWEEP + "sweeper: stale_job_seconds = 0.6"))
    simulator.queue_outcomes("STUCK")
    _, body, _ = await gateway.submit()

    await until(lambda: gateway.ledger_rows("kind")[-1] == ("release",))

    code, status = await gateway.status(body["request_id"])
    assert (code, status["status"], status["error"]) == (200, "ERROR", STALE_ERROR)
    assert gateway.ledger_rows("note")[-1] == ("not terminal after 0.6 s: released by policy",)
    assert [row[1:] for row in gateway.totals()] == [(0, 0, 0)]


@pytest.fixture
async def blackhole() -> AsyncIterator[str]:
    """An upstream that accepts connections and never answers: a gateway stuck before its forward completes."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", free_port())
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    for writer in held:
        writer.close()
    server.close()


async def _crash_mid_submit(tmp_path: Path, upstream: str, policies: Path) -> Path:
    """Start a gateway, let a submit get stuck upstream, SIGKILL the gateway; the database it left."""
    db = tmp_path / "crash.db"
    store = SQLiteStore(db)
    await store.open()
    await store.create_team("design", 10_000_000, "month")
    await store.close()
    gateway = GatewayProcess(db, upstream, policies, PROXY_UPSTREAM_TIMEOUT="60").start()
    sender = asyncio.create_task(asyncio.to_thread(
        lambda: requests.post(gateway.url + TEXT_PATH, json={"prompt": "p"}, headers=auth(), timeout=30)))
    try:
        await until(lambda: rows(db, "SELECT status FROM jobs") == [("SUBMITTING",)])
    finally:
        gateway.kill()
    with pytest.raises(requests.ConnectionError):
        await sender
    assert rows(db, "SELECT state, amount_micros FROM reservations") == [("open", 420_000)]
    return db


async def _restart_and_expect_resolution(db: Path, upstream: str, policies: Path, *, charged: bool) -> None:
    """A submit the gateway was killed in is indeterminate (it may have reached the upstream): resolved by policy."""
    gateway = GatewayProcess(db, upstream, policies).start()
    state = "settled" if charged else "released"
    try:
        await until(lambda: rows(db, "SELECT state FROM reservations") == [(state,)])
    finally:
        gateway.stop()
    note = f"outcome unknown: {'charged' if charged else 'released'} by policy (settlement.indeterminate)"
    assert rows(db, "SELECT kind, reserved_delta, spent_delta, basis, note FROM ledger ORDER BY id") == [
        ("reserve", 420_000, 0, "params", None),
        ("settle" if charged else "release", -420_000, 420_000 if charged else 0, "indeterminate", note)]
    assert rows(db, "SELECT status, error FROM jobs") == [
        ("FAILED", INDETERMINATE_CHARGED) if charged else ("ERROR", INDETERMINATE_RELEASED)]
    assert rows(db, "SELECT spent_micros, reserved_micros FROM budget_totals WHERE scope = 'team:design'") == [
        (420_000 if charged else 0, 0)]
    assert await ledger_mismatches(db) == []


async def test_a_crash_after_sending_is_indeterminate_and_charged_by_default(tmp_path: Path, blackhole: str) -> None:
    policies = policies_with(tmp_path, FAST_SWEEP)

    db = await _crash_mid_submit(tmp_path, blackhole, policies)

    await _restart_and_expect_resolution(db, blackhole, policies, charged=True)


async def test_a_crash_after_the_upstream_created_the_job_is_charged_by_default(tmp_path: Path,
                                                                               simulator: Simulator) -> None:
    policies = policies_with(tmp_path, FAST_SWEEP)
    simulator.add_fault(Fault(op="submit", kind="delay", delay=20, stage="after"))  # created upstream, answer held

    db = await _crash_mid_submit(tmp_path, simulator.url, policies)  # type: ignore[attr-defined]

    assert len(simulator.jobs) == 1
    await _restart_and_expect_resolution(db, simulator.url, policies, charged=True)  # type: ignore[attr-defined]


async def test_the_policy_may_release_indeterminate_submits_instead(tmp_path: Path, blackhole: str) -> None:
    policies = policies_with(tmp_path, FAST_SWEEP + 'settlement: indeterminate = "release"')

    db = await _crash_mid_submit(tmp_path, blackhole, policies)

    await _restart_and_expect_resolution(db, blackhole, policies, charged=False)
