"""SIGKILL at random moments under mixed load, many rounds, one database: nothing is lost, every cent adds up."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
from collections import defaultdict
from pathlib import Path

import aiohttp

from proxy.simulator.server import Simulator
from proxy.store.sqlite import SQLiteStore
from tests.conftest import TEXT_PATH, Receiver, auth, ledger_mismatches, policies_with, until
from tests.processes import GatewayProcess

ROUNDS = 6
FAST = """
sweeper: interval_seconds = 0.2
sweeper: orphan_submit_seconds = 1.0
"""
FAST_HOOKS = """
delivery: poll_seconds = 0.05
delivery: retry_schedule_seconds = [0.1, 0.2, 0.4, 0.8, 1.6]
"""


async def load(gateway: GatewayProcess, hook: str, accepted: list[str], rng: random.Random, seconds: float) -> None:
    """Submits (with webhooks) and polls, concurrently, until ``seconds`` pass or the gateway dies."""
    headers = auth()

    async def submitter(http: aiohttp.ClientSession, worker: int) -> None:
        while True:
            body = {"prompt": f"crash test {worker}-{rng.random()}", "duration": rng.randint(3, 10)}
            try:
                async with http.post(gateway.url + TEXT_PATH, json=body,
                                     headers=headers | {"X-Webhook-URL": hook}) as response:
                    if response.status == 202:
                        accepted.append((await response.json())["request_id"])
            except aiohttp.ClientError:
                return
            await asyncio.sleep(rng.uniform(0, 0.05))

    async def poller(http: aiohttp.ClientSession) -> None:
        while True:
            if accepted:
                try:
                    async with http.get(f"{gateway.url}/v2/requests/status/{rng.choice(accepted)}", headers=headers) as r:
                        await r.read()
                except aiohttp.ClientError:
                    return
            await asyncio.sleep(0.01)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        workers = [asyncio.create_task(submitter(http, n)) for n in range(4)] + [asyncio.create_task(poller(http))]
        await asyncio.sleep(seconds)
        gateway.kill()  # SIGKILL mid-load: no cleanup, no flush
        await asyncio.gather(*workers, return_exceptions=True)


async def test_sigkill_under_load_loses_nothing(tmp_path: Path, simulator: Simulator) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(1 << 30))  # a failure names its seed
    rng = random.Random(seed)
    simulator.settings.queued_seconds, simulator.settings.processing_seconds = 0.2, 0.5
    db = tmp_path / "crash.db"
    store = SQLiteStore(db)
    await store.open()
    await store.create_team("design", 1_000_000_000, "month")
    await store.close()
    policies = policies_with(tmp_path, budgets=FAST, webhooks=FAST_HOOKS)
    env = {"PROXY_WEBHOOK_ALLOW_PRIVATE": "1", "PROXY_POLL_INTERVAL": "0.1"}
    accepted: list[str] = []

    async with Receiver() as receiver:
        for _ in range(ROUNDS):
            gateway = GatewayProcess(db, simulator.url, policies, **env).start()  # type: ignore[attr-defined]
            await load(gateway, receiver.url(), accepted, rng, rng.uniform(0.3, 1.2))

        final = GatewayProcess(db, simulator.url, policies, **env).start()  # type: ignore[attr-defined]
        try:
            def settled() -> bool:
                with sqlite3.connect(db) as connection:
                    open_reservations = connection.execute(
                        "SELECT COUNT(*) FROM reservations WHERE state = 'open'").fetchone()[0]
                    pending = connection.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
                    unfinished = connection.execute(
                        "SELECT COUNT(*) FROM handles h JOIN jobs j ON j.id = h.job_id WHERE h.id IN (%s) "
                        "AND j.status NOT IN ('COMPLETED', 'FAILED', 'ERROR')" % ",".join("?" * len(accepted)),
                        accepted).fetchone()[0]
                return open_reservations == pending == unfinished == 0

            await until(settled, timeout=60)
        finally:
            final.stop()

    assert len(accepted) >= ROUNDS, f"seed {seed}: too little load to mean anything"
    with sqlite3.connect(db) as connection:
        statuses = dict(connection.execute(
            "SELECT h.id, j.status FROM handles h JOIN jobs j ON j.id = h.job_id WHERE h.id IN (%s)"
            % ",".join("?" * len(accepted)), accepted).fetchall())
        failed_deliveries = connection.execute("SELECT COUNT(*) FROM outbox WHERE state = 'failed'").fetchone()[0]
    assert set(statuses) == set(accepted), f"seed {seed}: an accepted handle was lost"
    assert set(statuses.values()) == {"COMPLETED"}, f"seed {seed}"
    # totals, the /metrics rollups and the console's day rollup, each against the ledger
    assert await ledger_mismatches(db) == [], f"seed {seed}"
    assert failed_deliveries == 0
    ids_by_handle: dict[str, set[str]] = defaultdict(set)
    for headers, body, _ in receiver.calls:
        payload = json.loads(body)
        if payload["status"] == "COMPLETED":
            ids_by_handle[payload["request_id"]].add(headers["webhook-id"])
    # A submit killed just after its job was recorded never got its 202 to the client, but the gateway
    # still followed it and reported it: such handles appear here too, and must be real and finished.
    assert set(accepted) <= set(ids_by_handle), f"seed {seed}: a terminal webhook never arrived"
    with sqlite3.connect(db) as connection:
        extra = set(ids_by_handle) - set(accepted)
        known = dict(connection.execute(
            "SELECT h.id, j.status FROM handles h JOIN jobs j ON j.id = h.job_id WHERE h.id IN (%s)"
            % ",".join("?" * len(extra)), sorted(extra)).fetchall()) if extra else {}
    assert set(known) == extra and set(known.values()) <= {"COMPLETED"}, f"seed {seed}"
    assert {len(ids) for ids in ids_by_handle.values()} == {1}, f"seed {seed}: a duplicate with a new webhook-id"
