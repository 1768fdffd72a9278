"""Console page render times with an empty store and with 1M ledger rows, side by side in one run.

    .venv/bin/python -m tests.bench.console [--rows 1000000] [--requests 40] [--out tests/bench/results-console.md]

Two SQLite stores are filled the same way but for size: ``--rows`` settled jobs (a job, a handle and a
settle row each) of team ``bench`` spread over the current and the previous month's days, plus 19 small
teams; the ledger rows go in through the ledger trigger, so the day rollup is the one the gateway keeps.
A gateway serves each store (``pixazo-proxy serve``, logging at WARNING); one admin session asks for each
page ``--requests`` times in turn, the two gateways interleaved, and the table gives p50 / p99 of the
whole request as the client sees it (server-side rendering included) and the ratio of 1M to empty.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from http.cookiejar import CookieJar
from pathlib import Path

from tests.bench.run import KEY, ROOT, SECRET, T2V, Server, free_port, table

_NOW = datetime.now(UTC)
_PREVIOUS = (datetime(_NOW.year, _NOW.month, 1, tzinfo=UTC) - timedelta(days=1)).strftime("%Y-%m")
PAGES = (
    ("overview", "/console/"),
    ("team (charts, ledger page)", "/console/teams/bench"),
    ("team, the previous period's ledger", f"/console/teams/bench?period={_PREVIOUS}"),
    ("team, previous period, ledger by user", f"/console/teams/bench?period={_PREVIOUS}&user=user-7"),
    ("team, previous period, ledger by kind (none)", f"/console/teams/bench?period={_PREVIOUS}&kind=topup"),
    ("jobs (all teams)", "/console/jobs"),
    ("jobs of a team, by status", "/console/jobs?team=bench&status=COMPLETED"),
    ("jobs of a team, by user", "/console/jobs?team=bench&user=user-7"),
    ("gallery", "/console/gallery"),
    ("small team page", "/console/teams/small-3"),
)


def cli(db: Path, *args: str) -> str:
    env = {**os.environ, "PROXY_DB": str(db), "PROXY_JWT_SECRET": SECRET}
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def fill(db: Path, rows: int) -> None:
    cli(db, "teams", "create", "bench", "--budget", "10000000")
    for n in range(19):
        cli(db, "teams", "create", f"small-{n}", "--budget", "50")
    now = datetime.now(UTC)
    first = datetime(now.year, now.month, 1, tzinfo=UTC) - timedelta(days=28)
    days = max(1, (now - first).days)
    output = json.dumps({"media_url": ["https://cdn.example/x.mp4"], "media_type": "video/mp4"})
    params = json.dumps({"prompt": "a lighthouse at dusk, waves crashing", "duration": 6, "resolution": "720p"})
    with sqlite3.connect(db) as connection:
        spent: dict[tuple[str, str], int] = {}
        for offset in range(0, rows, 50_000):
            batch = range(offset + 1, min(rows, offset + 50_000) + 1)
            stamps = {i: (first + timedelta(seconds=(i * 86400 * days) // max(rows, 1))) for i in batch}
            text = {i: stamps[i].strftime("%Y-%m-%dT%H:%M:%S.000Z") for i in batch}
            connection.executemany(
                "INSERT INTO jobs (id, upstream_id, model, params, status, output, created_at, updated_at, completed_at, "
                "checked_at, fingerprint, finished_at) VALUES (?, ?, ?, ?, 'COMPLETED', ?, ?, ?, ?, 0, ?, ?)",
                [(i, f"up-{i}", T2V, params, output, text[i], text[i], text[i], f"fp-{i}", text[i]) for i in batch])
            connection.executemany(
                "INSERT INTO handles (id, job_id, team, user_id, model, created_at) VALUES (?, ?, 'bench', ?, ?, ?)",
                [(f"{T2V}_fill-{i}", i, f"user-{i % 50}", T2V, text[i]) for i in batch])
            connection.executemany(
                "INSERT INTO ledger (at, kind, team, user_id, handle, job_id, model, seconds, resolution, period_key, "
                "global_period_key, reserved_delta, spent_delta, basis) VALUES (?, 'settle', 'bench', ?, ?, ?, ?, 6, "
                "'720p', ?, ?, 0, 420000, 'params')",
                [(text[i], f"user-{i % 50}", f"{T2V}_fill-{i}", i, T2V, text[i][:7], text[i][:7]) for i in batch])
            for i in batch:
                for scope in ("team:bench", f"user:bench/user-{i % 50}", "global"):
                    spent[(scope, text[i][:7])] = spent.get((scope, text[i][:7]), 0) + 420_000
        for (scope, key), amount in spent.items():
            connection.execute("INSERT INTO budget_totals (scope, period_key, spent_micros) VALUES (?, ?, ?) "
                               "ON CONFLICT (scope, period_key) DO UPDATE SET spent_micros = excluded.spent_micros",
                               (scope, key, amount))
        connection.execute("ANALYZE")


class Session:
    def __init__(self, server: Server, db: Path) -> None:
        self.server = server
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        link = cli(db, "console", "link", "--team", "bench", "--user", "bench-admin", "--admin",
                   "--public-url", server.url).strip()
        self.opener.open(link).read()

    def timed(self, path: str) -> float:
        started = time.perf_counter()
        with self.opener.open(self.server.url + path) as response:
            response.read()
            assert response.status == 200, path
        return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "bench" / "results-console.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="console-bench-"))
    stores = {"empty": work / "empty.db", "full": work / "full.db"}
    started = time.monotonic()
    fill(stores["empty"], 0)
    fill(stores["full"], args.rows)
    print(f"filled in {time.monotonic() - started:.0f} s", flush=True)
    servers, sessions = {}, {}
    try:
        for name, db in stores.items():
            port = free_port()
            env = {"PIXAZO_API_KEY": KEY, "PROXY_JWT_SECRET": SECRET, "PROXY_DB": str(db), "PROXY_PORT": str(port),
                   "PROXY_POLICIES": str(ROOT / "policies"), "PIXAZO_UPSTREAM_URL": "http://127.0.0.1:9",
                   "PROXY_LOG_LEVEL": "WARNING"}
            servers[name] = Server(name, [sys.executable, "-m", "proxy.cli", "serve"], env, port)
            sessions[name] = Session(servers[name], db)
        rows = []
        for label, path in PAGES:
            times: dict[str, list[float]] = {"empty": [], "full": []}
            for name in times:  # warm each once (template compile, page cache)
                sessions[name].timed(path)
            for _ in range(args.requests):
                for name in times:
                    times[name].append(sessions[name].timed(path))
            cells = {name: (statistics.median(found), sorted(found)[int(len(found) * 0.99) - 1])
                     for name, found in times.items()}
            rows.append([label, f"{cells['empty'][0]:.1f} / {cells['empty'][1]:.1f}",
                         f"{cells['full'][0]:.1f} / {cells['full'][1]:.1f}", f"{cells['full'][0] / cells['empty'][0]:.2f}"])
            print(rows[-1], flush=True)
    finally:
        for server in servers.values():
            server.stop()
    text = (f"Console pages, SQLite, {args.rows:,} ledger rows (and as many jobs and handles) of one team against an "
            f"empty store, {args.requests} requests per page per store, interleaved; whole request as the client "
            f"sees it.\n\n" + table(rows, ["page", "empty ms (p50 / p99)", f"{args.rows:,} rows ms (p50 / p99)",
                                           "p50 ratio"]) + "\n")
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
