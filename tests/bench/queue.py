"""The local queue under load: waits per team in a flood, dispatch rate against the configured one, and what
admission into the queue costs a submit against one sent at once.

    .venv/bin/python -m tests.bench.queue [--flood 200] [--steady 20] [--rate 20] [--overhead 300]

The simulator and the gateway each run in a process of their own (SQLite, synchronous=FULL, the gateway's
defaults but for the policies named here). Three parts, each on a fresh store:

1. *Flood*: the account runs 4 jobs at once (``max_in_flight = 4``); team ``flood`` sends ``--flood`` submits
   at once, then team ``steady`` sends ``--steady``, one every 50 ms. Time in queue per team (a job's ``sent_at``
   minus its admission; 0 for a job sent at once), p50 / p99, and when each team's last job was sent.
2. *Rate*: ``submits_per_second = --rate``, no limit on jobs at once; ``--flood`` submits at once; the rate the
   dispatcher sent them at, from the first queued send to the last.
3. *Admission overhead*: sequential submits of two teams on one gateway, interleaved in rounds of 50: ``direct``
   (no limit: sent upstream at once) and ``queued`` (``max_concurrent_jobs = 1`` and its one job left running,
   so every submit is stored as waiting instead of sent). Client-side latency p50 / p99 of each.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import jwt

from tests.bench.run import KEY, ROOT, SECRET, SUBMIT, Server, bench_server, cli, free_port, table


def policies(directory: Path, account: str) -> Path:
    target = directory / "policies"
    shutil.copytree(ROOT / "policies", target)
    text = (target / "upstream.toml").read_text().replace("[account]\n", f"[account]\n{account}\n")
    (target / "upstream.toml").write_text(text.replace("poll_seconds = 0.2", "poll_seconds = 0.02"))
    return target


def gateway(db: Path, upstream: str, policy_dir: Path) -> Server:
    port = free_port()
    env = {"PIXAZO_API_KEY": KEY, "PROXY_JWT_SECRET": SECRET, "PROXY_DB": str(db), "PIXAZO_UPSTREAM_URL": upstream,
           "PROXY_POLICIES": str(policy_dir), "PROXY_PORT": str(port), "PROXY_POLL_INTERVAL": "0.05",
           "PROXY_LOG_LEVEL": "WARNING"}
    return Server("gateway", [sys.executable, "-m", "proxy.cli", "serve"], env, port)


def token(team: str) -> str:
    return jwt.encode({"sub": "bench", "team": team, "exp": int(time.time()) + 86400}, SECRET, algorithm="HS256")


async def post(http: aiohttp.ClientSession, base: str, team: str, prompt: str) -> float:
    started = time.perf_counter()
    async with http.post(base + SUBMIT, json={"prompt": prompt},
                         headers={"Ocp-Apim-Subscription-Key": token(team)}) as response:
        await response.read()
        assert response.status == 202, response.status
    return (time.perf_counter() - started) * 1000


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def wait_until_sent(db: Path, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as connection:
            (sent,) = connection.execute("SELECT COUNT(*) FROM jobs WHERE upstream_id IS NOT NULL").fetchone()
        if sent >= count:
            return
        assert time.monotonic() < deadline, f"only {sent} of {count} sent"
        time.sleep(0.2)


def waits(db: Path) -> dict[str, list[float]]:
    """Seconds each job waited in the local queue, by team."""
    found: dict[str, list[float]] = {}
    with sqlite3.connect(db) as connection:
        for team, created, sent in connection.execute(
                "SELECT h.team, j.created_at, j.sent_at FROM jobs j JOIN handles h ON h.job_id = j.id"):
            found.setdefault(team, []).append(_seconds(sent) - _seconds(created) if sent else 0.0)
    return found


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def flood_part(work: Path, simulator: Server, flood: int, steady: int) -> list[list[str]]:
    db = work / "flood.db"
    for team in ("flood", "steady"):
        cli("teams", "create", team, "--budget", "1000000000", db=db)
    server = gateway(db, simulator.url, policies(work / "p1", "max_in_flight = 4"))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            started = time.time()
            await asyncio.gather(*(post(http, server.url, "flood", f"flood {n}") for n in range(flood)))
            for n in range(steady):
                await post(http, server.url, "steady", f"steady {n}")
                await asyncio.sleep(0.05)
        wait_until_sent(db, flood + steady)
    finally:
        server.stop()
    found = waits(db)
    with sqlite3.connect(db) as connection:
        last = dict(connection.execute(
            "SELECT h.team, MAX(COALESCE(j.sent_at, j.created_at)) FROM jobs j JOIN handles h ON h.job_id = j.id "
            "GROUP BY h.team").fetchall())
    return [[team, str(len(values)), f"{quantile(values, 0.5):.2f}", f"{quantile(values, 0.99):.2f}",
             f"{_seconds(last[team]) - started:.1f}"] for team, values in sorted(found.items())]


async def rate_part(work: Path, simulator: Server, flood: int, rate: int) -> list[str]:
    db = work / "rate.db"
    cli("teams", "create", "flood", "--budget", "1000000000", db=db)
    server = gateway(db, simulator.url, policies(work / "p2", f"submits_per_second = {rate}"))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            await asyncio.gather(*(post(http, server.url, "flood", f"rate {n}") for n in range(flood)))
        wait_until_sent(db, flood)
    finally:
        server.stop()
    with sqlite3.connect(db) as connection:
        sent = sorted(_seconds(row[0]) for row in connection.execute(
            "SELECT sent_at FROM jobs WHERE sent_at IS NOT NULL"))
    achieved = (len(sent) - 1) / (sent[-1] - sent[0])
    return [str(rate), str(len(sent)), f"{achieved:.2f}", f"{achieved / rate:.3f}"]


async def overhead_part(work: Path, simulator: Server, count: int) -> list[list[str]]:
    db = work / "overhead.db"
    cli("teams", "create", "direct", "--budget", "1000000000", db=db)
    cli("teams", "create", "queued", "--budget", "1000000000", "--max-concurrent", "1", db=db)
    server = gateway(db, simulator.url, policies(work / "p3", ""))
    latencies: dict[str, list[float]] = {"direct": [], "queued": []}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(simulator.url + "/_simulator/outcomes", json={"outcomes": ["STUCK"]},
                                 headers={"Ocp-Apim-Subscription-Key": KEY}) as response:
                assert response.status == 200
            await post(http, server.url, "queued", "holds the team's one slot")
            for _ in range(20):  # warm up both paths
                await post(http, server.url, "direct", f"warm {time.time()}")
            for round_number in range(count // 50):
                for team in (("direct", "queued") if round_number % 2 == 0 else ("queued", "direct")):
                    for n in range(50):
                        latencies[team].append(await post(http, server.url, team, f"{team} {round_number} {n}"))
    finally:
        server.stop()
    with sqlite3.connect(db) as connection:
        (waiting,) = connection.execute("SELECT COUNT(*) FROM queued_jobs").fetchone()
    assert waiting == len(latencies["queued"]), (waiting, len(latencies["queued"]))  # every one of them waited
    direct = statistics.median(latencies["direct"])
    return [[team, str(len(values)), f"{statistics.median(values):.2f}", f"{quantile(values, 0.99):.2f}",
             f"{statistics.median(values) / direct:.2f}"] for team, values in latencies.items()]


async def main_async(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="pixazo-queue-bench-"))
    simulator = bench_server("simulator", "asyncio", "--key", KEY)
    try:
        flood = await flood_part(work, simulator, args.flood, args.steady)
        rate = await rate_part(work, simulator, args.flood, args.rate)
        overhead = await overhead_part(work, simulator, args.overhead)
    finally:
        simulator.stop()
        shutil.rmtree(work, ignore_errors=True)
    return "\n\n".join([
        f"Flood: account limit 4 jobs at once; {args.flood} submits of team flood at once, then {args.steady} of "
        "team steady, one every 50 ms.",
        table(flood, ["team", "jobs", "time in queue p50, s", "p99, s", "last sent, s after the flood began"]),
        table([rate], ["configured submits/s", "jobs", "dispatched submits/s", "achieved / configured"]),
        "Sequential submits, interleaved rounds of 50: sent at once against stored as waiting.",
        table(overhead, ["team", "submits", "p50 ms", "p99 ms", "p50 / direct"]),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--steady", type=int, default=20)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--overhead", type=int, default=300)
    args = parser.parse_args()
    print(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
