"""Side-by-side: the gateway on SQLite and on PostgreSQL, with 1 and 2 worker processes, plus the pass-through
and the durable floor, in one run. One command (PostgreSQL at PROXY_BENCH_POSTGRES_URL, default the local one):

    .venv/bin/python -m tests.bench.backends [--seconds 4] [--repeat 3] [--out F]

Each cell is wrk (one thread) for ``--seconds``, the servers interleaved round by round, medians reported:
submits (bodies no other request has, so the cache never answers) and status polls of a job left running. For
PostgreSQL the CPU its server processes spent during the submit cells (``/proc``), per accepted submit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jwt

from tests.bench.run import KEY, ROOT, SECRET, SUBMIT, Server, free_port, median, post, table, wrk

CONNECTIONS = (16, 64)


def gateway(db: str, upstream: str, workers: int) -> Server:
    port = free_port()
    env = {"PIXAZO_API_KEY": KEY, "PROXY_JWT_SECRET": SECRET, "PROXY_DB": db, "PIXAZO_UPSTREAM_URL": upstream,
           "PROXY_POLICIES": str(ROOT / "policies"), "PROXY_PORT": str(port), "PROXY_EVENT_LOOP": "asyncio",
           "PROXY_WORKERS": str(workers), "PROXY_LOG_LEVEL": "WARNING"}
    return Server(f"gateway-{workers}", [sys.executable, "-m", "proxy.cli", "serve"], env, port)


def cli(db: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "proxy.cli", *args, "--db", db], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PROXY_JWT_SECRET": SECRET})


def postgres_cpu_seconds() -> float:
    """CPU seconds (user + system) of every process named postgres on this machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if name.startswith("postgres"):
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results-backends.md"))
    args = parser.parse_args()
    base_url = os.environ.get("PROXY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    import psycopg

    database = f"pixazo_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
        if os.environ.get("PROXY_BENCH_PG_ASYNC_COMMIT"):  # an experiment: is the commit's flush what bounds it?
            admin.execute(f"ALTER DATABASE {database} SET synchronous_commit = off")
    pg_url = base_url.rsplit("/", 1)[0] + f"/{database}"
    work = Path(tempfile.mkdtemp(prefix="pixazo-bench-backends-"))
    token = jwt.encode({"sub": "bench", "team": "bench", "exp": int(time.time()) + 86400}, SECRET, algorithm="HS256")
    sim_port = free_port()
    simulator = Server("simulator", [sys.executable, "-m", "tests.bench.servers", "simulator", "--port", str(sim_port),
                                     "--key", KEY, "--loop", "asyncio"], {}, sim_port)
    pt_port = free_port()
    passthrough = Server("passthrough", [sys.executable, "-m", "tests.bench.servers", "passthrough", "--port",
                                         str(pt_port), "--upstream", simulator.url, "--loop", "asyncio"], {}, pt_port)
    durable_port = free_port()
    durable = Server("durable", [sys.executable, "-m", "tests.bench.servers", "durable", "--port", str(durable_port),
                                 "--upstream", simulator.url, "--db", str(work / "durable.db"), "--loop", "asyncio"],
                     {}, durable_port)
    setups = {"SQLite, 1 worker": (str(work / "one.db"), 1), "SQLite, 2 workers": (str(work / "two.db"), 2),
              "PostgreSQL, 1 worker": (pg_url, 1), "PostgreSQL, 2 workers": (pg_url, 2)}
    for db, _ in setups.values():
        cli(db, "teams", "create", "bench", "--budget", "1000000000", "--exist-ok")
    upstream_key = {"Ocp-Apim-Subscription-Key": KEY}
    post(simulator.url + "/_simulator/outcomes", {"outcomes": ["STUCK"] * 8}, upstream_key)
    running: dict[str, str] = {}
    rows: list[list[str]] = []
    servers: list[Server] = [simulator, passthrough, durable]
    try:
        gateways = {}
        for name, (db, workers) in setups.items():
            gateways[name] = gateway(db, simulator.url, workers)
            servers.append(gateways[name])
            time.sleep(1.0)  # every worker up
            running[name] = post(gateways[name].url + SUBMIT, {"prompt": f"running {name}"},
                                 {"Ocp-Apim-Subscription-Key": token})["request_id"]
        for connections in CONNECTIONS:
            submits: dict[str, list[dict[str, float]]] = {name: [] for name in [*setups, "pass-through", "durable"]}
            polls: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
            cpu: dict[str, list[float]] = {name: [] for name in setups if name.startswith("PostgreSQL")}
            for _ in range(args.repeat):
                submits["pass-through"].append(wrk(passthrough.url, SUBMIT, KEY, "POST", connections, args.seconds))
                submits["durable"].append(wrk(durable.url, SUBMIT, KEY, "POST", connections, args.seconds))
                for name, server in gateways.items():
                    before = postgres_cpu_seconds()
                    found = wrk(server.url, SUBMIT, token, "POST", connections, args.seconds)
                    spent = postgres_cpu_seconds() - before
                    submits[name].append(found)
                    if name in cpu:
                        cpu[name].append(1000 * spent / max(1.0, found["rps"] * args.seconds))
                    polls[name].append(wrk(server.url, f"/v2/requests/status/{running[name]}", token, "GET",
                                           connections, args.seconds))
            floor = median(submits["pass-through"])
            durable_floor = median(submits["durable"])
            for name in setups:
                s, p = median(submits[name]), median(polls[name])
                rows.append([name, str(connections), f"{s['rps']:.0f}", f"{s['p50']:.2f} / {s['p99']:.2f}",
                             f"{s['rps'] / durable_floor['rps']:.2f}", f"{p['rps']:.0f}",
                             f"{p['p50']:.2f} / {p['p99']:.2f}",
                             f"{sorted(cpu[name])[len(cpu[name]) // 2]:.2f}" if name in cpu else "-",
                             str(int(s["errors"] + p["errors"]))])
                print(rows[-1], flush=True)
            rows.append(["pass-through", str(connections), f"{floor['rps']:.0f}", f"{floor['p50']:.2f} / {floor['p99']:.2f}",
                         "-", "-", "-", "-", str(int(floor["errors"]))])
            rows.append(["durable floor", str(connections), f"{durable_floor['rps']:.0f}",
                         f"{durable_floor['p50']:.2f} / {durable_floor['p99']:.2f}", "1.00", "-", "-", "-",
                         str(int(durable_floor["errors"]))])
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.stop()
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    text = "\n".join([
        f"Machine: {os.cpu_count()} cores; wrk -t1, {args.seconds} s per cell, median of {args.repeat} interleaved "
        "rounds; gateways at WARNING log level; SQLite synchronous=FULL; PostgreSQL as installed (fsync on).", "",
        table(rows, ["store, processes", "conns", "submit req/s", "submit ms (p50 / p99)", "submit / durable floor",
                     "status req/s (in flight)", "status ms (p50 / p99)", "PostgreSQL CPU ms per submit",
                     "non-2xx"]), ""])
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
