"""Side-by-side benchmark: the client straight to the simulator, through a minimal aiohttp pass-through
proxy, and through the gateway with its whole pipeline. One command:

    .venv/bin/python -m tests.bench.run [--seconds 4] [--repeat 3] [--loop asyncio|uvloop] [--out F]

Load comes from wrk (Debian's package) in its own process, one thread; submits carry bodies no other
request has, so the gateway's cache never answers them. All servers run on the same event loop
(``--loop``); each cell is run ``--repeat`` times, the servers interleaved, and the table gives medians.
For submits, a fourth server gives the floor for a proxy that must not lose a paid job: the pass-through
plus two durable writes (``servers.durable_app``). Also measured: added latency at half of the gateway's
saturation (wrk paced with a delay per connection), latency with 0, 100k and 1M rows already in the
store, a spend report over 1M ledger rows, and peak memory with 10k jobs in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import jwt

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("submit.lua")
KEY = "bench-upstream-key-not-secret"
SECRET = "bench-jwt-secret-0123456789-abcdefghijkl"
T2V = "grok-imagine-video-text-to-video"
SUBMIT = f"/{T2V}/v1/{T2V}-request"
CONCURRENCY = (1, 16, 64)
#: The growth table's cells: name, path, method, fixed body ("" = a new one each request), connections.
GROWTH_CELLS = (
    ("status", "/v2/requests/status/{done}", "GET", "", 16),
    ("running", "/v2/requests/status/{running}", "GET", "", 16),
    ("submit", SUBMIT, "POST", "", 16),
    ("hit", SUBMIT, "POST", '{"prompt": "done via gateway"}', 16),
    ("coalesced", SUBMIT, "POST", '{"prompt": "running via gateway"}', 16),
    ("scrape", "/metrics", "GET", "", 1),
)
GROWTH_TITLES = ("status terminal ms (p50 / p99)", "status in flight ms (p50 / p99)", "submit MISS ms (p50 / p99)",
                 "submit HIT ms (p50 / p99)", "submit COALESCED ms (p50 / p99)", "/metrics scrape ms (p50 / p99)")
PACED = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, name: str, args: list[str], env: dict[str, str], port: int, cwd: Path = ROOT) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(args, env={**os.environ, **env}, cwd=cwd,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                assert self.process.poll() is None, f"{name} exited"
                assert time.monotonic() < deadline, f"{name} did not start"
                time.sleep(0.1)

    def rss_peak_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def wrk(base: str, path: str, key: str, method: str, connections: int, seconds: int,
        delay_ms: float = 0.0, body: str = "") -> dict[str, float]:
    env = {**os.environ, "BENCH_PATH": path, "BENCH_KEY": key, "BENCH_METHOD": method,
           "BENCH_DELAY_MS": f"{delay_ms:.3f}", "BENCH_BODY": body}
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(SCRIPT), base],
                         capture_output=True, text=True, env=env, check=True).stdout

    def millis(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": millis("50"),
            "p99": millis("99"), "errors": int(bad.group(1)) if bad else 0}


def drain(db: Path, keep: str, timeout: float = 300.0) -> None:
    """Wait until the gateway has followed every job it accepted to its end, but the one it keeps running.

    After a burst of submits its tracker works through the backlog (a status call and a settlement per job);
    measuring while it does would charge that work to whatever cell comes next.
    """
    deadline = time.monotonic() + timeout
    with sqlite3.connect(db, timeout=30) as connection:
        while connection.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN ('SUBMITTING', 'QUEUED', 'PROCESSING') "
                "AND id <> (SELECT job_id FROM handles WHERE id = ?)", (keep,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the gateway did not finish its jobs in time"
            time.sleep(0.5)


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds (errors: their sum)."""
    return {key: (sum(run[key] for run in runs) if key == "errors" else statistics.median(run[key] for run in runs))
            for key in runs[0]}


def post(url: str, body: dict, headers: dict[str, str]) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def cli(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROXY_JWT_SECRET": SECRET, "PROXY_DB": str(db), "PROXY_POLICIES": str(ROOT / "policies")}
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, env=env, check=True)


def start_gateway(db: Path, upstream: str, loop: str = "asyncio") -> Server:
    port = free_port()
    env = {"PIXAZO_API_KEY": KEY, "PROXY_JWT_SECRET": SECRET, "PROXY_DB": str(db), "PIXAZO_UPSTREAM_URL": upstream,
           "PROXY_POLICIES": str(ROOT / "policies"), "PROXY_PORT": str(port), "PROXY_EVENT_LOOP": loop}
    return Server("gateway", [sys.executable, "-m", "proxy.cli", "serve"], env, port)


def bench_server(kind: str, loop: str, *args: str) -> Server:
    """One of ``tests.bench.servers`` (simulator, passthrough, durable) on a free port."""
    port = free_port()
    return Server(kind, [sys.executable, "-m", "tests.bench.servers", kind, "--port", str(port), *args, "--loop", loop],
                  {}, port)


def bench_team(db: Path) -> str:
    """Team ``bench`` with a budget no run reaches, in ``db``; a day's token for it."""
    cli("teams", "create", "bench", "--budget", "1000000000", db=db)
    return jwt.encode({"sub": "bench", "team": "bench", "exp": int(time.time()) + 86400}, SECRET, algorithm="HS256")


def fill(db: Path, rows: int) -> None:
    """``rows`` finished jobs, handles and ledger rows of team bench in October, with matching totals."""
    with sqlite3.connect(db) as connection:
        start = connection.execute("SELECT COALESCE(MAX(id), 0) FROM jobs").fetchone()[0]
        stamp = "2026-10-15T12:00:00.000Z"
        output = json.dumps({"media_url": ["https://cdn.example/x.mp4"], "media_type": "video/mp4"})
        for offset in range(0, rows, 50_000):
            ids = range(start + offset + 1, start + min(rows, offset + 50_000) + 1)
            connection.executemany(
                "INSERT INTO jobs (id, upstream_id, model, params, status, output, created_at, updated_at, completed_at, "
                "checked_at, fingerprint, finished_at) VALUES (?, ?, ?, '{}', 'COMPLETED', ?, ?, ?, ?, 0, ?, ?)",
                [(i, f"up-{i}", T2V, output, stamp, stamp, stamp, f"fp-{i}", stamp) for i in ids])
            connection.executemany(
                "INSERT INTO handles (id, job_id, team, user_id, model, created_at) VALUES (?, ?, 'bench', 'filler', ?, ?)",
                [(f"{T2V}_fill-{i}", i, T2V, stamp) for i in ids])
            connection.executemany(
                "INSERT INTO ledger (at, kind, team, user_id, handle, job_id, model, seconds, resolution, period_key, "
                "global_period_key, reserved_delta, spent_delta) VALUES (?, 'settle', 'bench', 'filler', ?, ?, ?, 6, "
                "'720p', '2026-10', '2026-10', 0, 420000)",
                [(stamp, f"{T2V}_fill-{i}", i, T2V) for i in ids])
        spent = connection.execute(
            "SELECT COALESCE(SUM(spent_delta), 0) FROM ledger WHERE team = 'bench' AND period_key = '2026-10'").fetchone()[0]
        for scope in ("team:bench", "user:bench/filler", "global"):
            connection.execute("INSERT INTO budget_totals (scope, period_key, spent_micros) VALUES (?, '2026-10', ?) "
                               "ON CONFLICT (scope, period_key) DO UPDATE SET spent_micros = excluded.spent_micros",
                               (scope, spent))


async def submit_many(base: str, token: str, count: int, concurrency: int = 32) -> None:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(headers={"Ocp-Apim-Subscription-Key": token}) as http:
        async def one(i: int) -> None:
            async with sem:
                async with http.post(base + SUBMIT, json={"prompt": f"in flight {i}"}) as response:
                    assert response.status == 202, await response.text()
        await asyncio.gather(*(one(i) for i in range(count)))


def table(rows: list[list[str]], head: list[str]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"))
    parser.add_argument("--repeat", type=int, default=3, help="rounds per cell, interleaved; the table gives medians")
    parser.add_argument("--skip-growth", action="store_true")
    parser.add_argument("--only-growth", action="store_true", help="just the table with rows already in the store")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="event loop of all three servers (uvloop needs pixazo-proxy[fast])")
    args = parser.parse_args()
    assert shutil.which("wrk"), "wrk is needed: apt-get install wrk"
    work = Path(tempfile.mkdtemp(prefix="pixazo-bench-"))
    db = work / "bench.db"
    token = bench_team(db)
    simulator = bench_server("simulator", args.loop, "--key", KEY)
    passthrough = bench_server("passthrough", args.loop, "--upstream", simulator.url)
    durable = bench_server("durable", args.loop, "--upstream", simulator.url, "--db", str(work / "durable.db"))
    gateway = start_gateway(db, simulator.url, args.loop)
    lines: list[str] = [f"Machine: {os.cpu_count()} cores; wrk -t1, {args.seconds} s per cell, median of {args.repeat} "
                        f"interleaved rounds; event loop: {args.loop} "
                        "(all servers); gateway logging at INFO (JSON lines to /dev/null), SQLite "
                        "synchronous=FULL.", ""]
    try:
        upstream_key = {"Ocp-Apim-Subscription-Key": KEY}
        # jobs to poll: one left running, one finished, on each side
        post(simulator.url + "/_simulator/outcomes", {"outcomes": ["STUCK", "STUCK"]}, upstream_key)
        running_upstream = post(simulator.url + SUBMIT, {"prompt": "running"}, upstream_key)["request_id"]
        running_handle = post(gateway.url + SUBMIT, {"prompt": "running via gateway"},
                              {"Ocp-Apim-Subscription-Key": token})["request_id"]
        done_upstream = post(simulator.url + SUBMIT, {"prompt": "done"}, upstream_key)["request_id"]
        done_handle = post(gateway.url + SUBMIT, {"prompt": "done via gateway"},
                           {"Ocp-Apim-Subscription-Key": token})["request_id"]
        time.sleep(0.2)
        urllib.request.urlopen(urllib.request.Request(gateway.url + f"/v2/requests/status/{done_handle}",
                                                      headers={"Ocp-Apim-Subscription-Key": token}))
        targets = {"direct": (simulator.url, KEY), "pass-through": (passthrough.url, KEY), "gateway": (gateway.url, token)}
        scenarios = {
            "submit": ("POST", {"direct": SUBMIT, "pass-through": SUBMIT, "gateway": SUBMIT}),
            "status, in flight": ("GET", {"direct": f"/v2/requests/status/{running_upstream}",
                                          "pass-through": f"/v2/requests/status/{running_upstream}",
                                          "gateway": f"/v2/requests/status/{running_handle}"}),
            "status, terminal": ("GET", {"direct": f"/v2/requests/status/{done_upstream}",
                                         "pass-through": f"/v2/requests/status/{done_upstream}",
                                         "gateway": f"/v2/requests/status/{done_handle}"}),
        }
        if not args.only_growth:
            rows, paced, floor = [], [], []
            for scenario, (method, paths) in scenarios.items():
                saturation = 0.0
                for connections in CONCURRENCY:
                    names = [*targets, "durable"] if scenario == "submit" else list(targets)
                    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
                    for _ in range(args.repeat):  # interleaved rounds, medians: one noisy cell decides nothing
                        for name in names:
                            drain(db, running_handle)  # the tracker's backlog from the last gateway cell, not charged here
                            base, key = (durable.url, KEY) if name == "durable" else targets[name]
                            path = SUBMIT if name == "durable" else paths[name]
                            runs[name].append(wrk(base, path, key, method, connections, args.seconds))
                    results = {name: median(found) for name, found in runs.items()}
                    d, p, g = results["direct"], results["pass-through"], results["gateway"]
                    saturation = max(saturation, g["rps"])
                    rows.append([scenario, str(connections)] + [f"{r['rps']:.0f}" for r in (d, p, g)]
                                + [f"{r['p50']:.2f} / {r['p99']:.2f}" for r in (d, p, g)]
                                + [f"{g['rps'] / p['rps']:.2f}", f"{g['p50'] - d['p50']:+.2f} / {g['p99'] - d['p99']:+.2f}",
                                   str(sum(r["errors"] for r in (d, p, g)))])
                    print(rows[-1], flush=True)
                    if scenario == "submit":  # the floor for any proxy that must not lose a submit
                        f = results["durable"]
                        floor.append([str(connections), f"{p['rps']:.0f}", f"{f['rps']:.0f}", f"{g['rps']:.0f}",
                                      f"{f['p50']:.2f} / {f['p99']:.2f}", f"{f['rps'] / p['rps']:.2f}",
                                      f"{g['rps'] / f['rps']:.2f}", f"{f['p50'] - d['p50']:+.2f}", str(f["errors"])])
                        print(floor[-1], flush=True)
                # half of the gateway's saturation: PACED connections, each pausing so together they offer that rate
                target = saturation / 2
                delay = 1000.0 * PACED / target
                drain(db, running_handle)
                d, g = (wrk(targets[name][0], paths[name], targets[name][1], method, PACED, args.seconds, delay)
                        for name in ("direct", "gateway"))
                paced.append([scenario, f"{target:.0f}", f"{d['rps']:.0f} / {g['rps']:.0f}",
                              f"{d['p50']:.2f} / {d['p99']:.2f}", f"{g['p50']:.2f} / {g['p99']:.2f}",
                              f"{g['p50'] - d['p50']:+.2f} / {g['p99'] - d['p99']:+.2f}", str(d["errors"] + g["errors"])])
                print(paced[-1], flush=True)
            lines += ["### Throughput (req/s) and latency (p50 / p99, ms)", "", table(rows, [
                "scenario", "conns", "direct", "pass-through", "gateway", "direct ms", "pass-through ms", "gateway ms",
                "gateway / pass-through", "added over direct ms (p50 / p99)", "non-2xx"]), ""]
            lines += ["### The floor for a submit that must not be lost", "",
                      "`durable` is the pass-through plus the two durable writes any proxy that must not lose a paid "
                      "job makes per submit: a record before the upstream call and the upstream's answer after it, "
                      "through the gateway's own group-commit writer and checkpoint thread (WAL, synchronous=FULL), "
                      "nothing else (`tests/bench/servers.py`). Measured in the same rounds as the row above.", "",
                      table(floor, ["conns", "pass-through req/s", "durable req/s", "gateway req/s", "durable ms (p50 / p99)",
                                    "durable / pass-through", "gateway / durable", "durable added over direct, p50 ms",
                                    "non-2xx"]), ""]
            lines += ["### Added latency at half of the gateway's saturation", "",
                      f"{PACED} connections, each pausing between requests so that together they offer half the "
                      "gateway's best throughput above; direct gets the same pacing.", "", table(paced, [
                          "scenario", "offered req/s", "achieved req/s (direct / gateway)", "direct ms (p50 / p99)",
                          "gateway ms (p50 / p99)", "added ms (p50 / p99)", "non-2xx"]), ""]

        if not args.skip_growth:
            growth = []
            for total in (0, 100_000, 1_000_000):
                gateway.stop()
                with sqlite3.connect(db) as connection:
                    present = connection.execute("SELECT COUNT(*) FROM ledger WHERE period_key = '2026-10'").fetchone()[0]
                fill(db, total - present)
                gateway = start_gateway(db, simulator.url, args.loop)
                drain(db, running_handle)
                cells: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in GROWTH_CELLS}
                for _ in range(args.repeat):
                    drain(db, running_handle)
                    for name, path, method, body, connections in GROWTH_CELLS:
                        path = path.format(done=done_handle, running=running_handle)
                        cells[name].append(wrk(gateway.url, path, token, method, connections, args.seconds, body=body))
                found = {name: median(runs) for name, runs in cells.items()}
                started = time.perf_counter()
                cli("spend", "report", "--team", "bench", "--period", "2026-10", "--format", "json", db=db)
                report = time.perf_counter() - started
                growth.append([f"{total:,}"] + [f"{found[name]['p50']:.2f} / {found[name]['p99']:.2f}"
                                                for name, *_ in GROWTH_CELLS] + [f"{report:.2f}"])
                print(growth[-1], flush=True)
            lines += ["### With rows already in the store (medians of the same rounds)", "",
                      "A finished job's answer is kept in memory after its first poll, so the terminal column "
                      "shows the steady state of polling one; the in-flight column reads the store on every poll. "
                      "HIT submits send the finished job's body (a new handle on it, a saving row), COALESCED ones "
                      "the running job's; the scrape is one Prometheus scraper (1 connection).",
                      "", table(growth, ["rows (jobs, handles, ledger)"] + list(GROWTH_TITLES)
                                + ["spend report over those ledger rows, s (CLI, process start included)"]), ""]

        if not args.only_growth:  # memory with 10k jobs in flight
            gateway.stop()
            fresh = work / "memory.db"
            cli("teams", "create", "bench", "--budget", "1000000000", db=fresh)
            post(simulator.url + "/_simulator/settings", {"queued_seconds": 3600}, upstream_key)
            gateway = start_gateway(fresh, simulator.url, args.loop)
            baseline = gateway.rss_peak_kib()
            asyncio.run(submit_many(gateway.url, token, 10_000))
            time.sleep(6)  # one tracker round over all of them
            peak = gateway.rss_peak_kib()
            lines += ["### Memory", "", f"Peak RSS of the gateway with 10,000 jobs in flight: {peak / 1024:.0f} MiB "
                      f"(at start: {baseline / 1024:.0f} MiB).", ""]
    finally:
        for server in (gateway, durable, passthrough, simulator):
            if server.process.poll() is None:
                server.stop()
    text = "\n".join(lines)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
