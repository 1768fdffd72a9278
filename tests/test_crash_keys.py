"""SIGKILL rounds under load with retries: no key and no body starts a second upstream job, every job is accounted for.

Clients retry as the upstream document invites (same Idempotency-Key, same body) across gateway crashes. An
answer a crash lost leaves the job's outcome unknown: its key and fingerprint stay bound (409) until the
sweeper resolves it by policy, so a retry never sends it again.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import uuid
from collections import Counter
from pathlib import Path

import aiohttp

from proxy.simulator.server import Simulator
from tests.conftest import TEXT_PATH, auth, create_teams, ledger_mismatches, policies_with, until
from tests.processes import GatewayProcess

ROUNDS = 5
POLICY = """
sweeper: interval_seconds = 0.2
sweeper: orphan_submit_seconds = 1.5
"""
SHARED_BODIES = [f"a shared scene {n}" for n in range(4)]  # sent without keys by every worker: one job each at most


async def round_of_load(gateway: GatewayProcess, pending: list[tuple[str, str]], rng: random.Random,
                        seconds: float) -> None:
    """Keyed requests (retried until answered 202) and shared unkeyed bodies, until SIGKILL."""
    headers = auth()

    async def worker(http: aiohttp.ClientSession) -> None:
        while True:
            if pending and rng.random() < 0.6:
                key, prompt = rng.choice(pending)
                sent = {**headers, "Idempotency-Key": key}
            elif rng.random() < 0.5:
                key, prompt = str(uuid.uuid4()), f"keyed {uuid.uuid4()}"
                pending.append((key, prompt))
                sent = {**headers, "Idempotency-Key": key}
            else:
                key, prompt, sent = "", rng.choice(SHARED_BODIES), headers
            try:
                async with http.post(gateway.url + TEXT_PATH, json={"prompt": prompt, "duration": 3},
                                     headers=sent) as response:
                    if response.status == 202 and key and (key, prompt) in pending:
                        pending.remove((key, prompt))
            except aiohttp.ClientError:
                return
            await asyncio.sleep(rng.uniform(0, 0.03))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        workers = [asyncio.create_task(worker(http)) for _ in range(4)]
        await asyncio.sleep(seconds)
        gateway.kill()
        await asyncio.gather(*workers, return_exceptions=True)


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql).fetchall()


async def test_retries_across_crashes_never_start_a_second_upstream_job(tmp_path: Path, simulator: Simulator) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    simulator.settings.queued_seconds, simulator.settings.processing_seconds = 0.1, 0.3
    db = tmp_path / "keys.db"
    await create_teams(db, {"design": 1_000_000_000})
    policies = policies_with(tmp_path, budgets=POLICY)
    pending: list[tuple[str, str]] = []

    for _ in range(ROUNDS):
        gateway = GatewayProcess(db, simulator.url, policies, PROXY_POLL_INTERVAL="0.1").start()  # type: ignore[attr-defined]
        await round_of_load(gateway, pending, rng, rng.uniform(0.4, 1.2))

    final = GatewayProcess(db, simulator.url, policies, PROXY_POLL_INTERVAL="0.1").start()  # type: ignore[attr-defined]
    try:
        await until(lambda: rows(db, "SELECT COUNT(*) FROM reservations WHERE state = 'open'") == [(0,)] and rows(
            db, "SELECT COUNT(*) FROM jobs WHERE status NOT IN ('COMPLETED', 'FAILED', 'ERROR', 'REJECTED')") == [(0,)],
            timeout=60)
    finally:
        final.stop()

    upstream_prompts = Counter(job.params["prompt"] for job in simulator.jobs.values())
    keys = rows(db, "SELECT COUNT(*) FROM idempotency_keys")[0][0]
    bodies = rows(db, "SELECT COUNT(DISTINCT params) FROM jobs")[0][0]
    assert len(simulator.jobs) >= ROUNDS, f"seed {seed}: too little load to mean anything"
    assert len(simulator.jobs) <= keys + bodies, f"seed {seed}"
    assert max(n for prompt, n in upstream_prompts.items() if prompt.startswith("keyed")) == 1, f"seed {seed}"
    for prompt in SHARED_BODIES:  # a new job only after the last one ended without a result to reuse
        jobs = rows(db, f"SELECT status FROM jobs WHERE params LIKE '%{prompt}%' AND status <> 'REJECTED' ORDER BY id")
        assert all(status != "COMPLETED" for (status,) in jobs[:-1]), f"seed {seed}: {prompt} ran after a result"
    # every job the upstream may have run is charged or released, with the reason in the ledger
    maybe_run = rows(db, "SELECT COUNT(*) FROM jobs WHERE status <> 'REJECTED'")[0][0]
    assert len(simulator.jobs) <= maybe_run, f"seed {seed}: an upstream job the gateway has no record of"
    assert rows(db, "SELECT COUNT(*) FROM reservations r JOIN jobs j ON j.id = r.job_id WHERE j.status <> 'REJECTED' "
                    "AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.job_id = r.job_id AND l.kind IN ('settle', 'release') "
                    "AND (l.note IS NOT NULL OR l.basis IS NOT NULL))") == [(0,)], f"seed {seed}"
    assert await ledger_mismatches(db) == [], f"seed {seed}"
