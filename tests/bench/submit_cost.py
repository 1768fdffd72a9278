"""What a submit costs the gateway against the durable floor, side by side: throughput, latency and CPU per thread.

    .venv/bin/python -m tests.bench.submit_cost [--seconds 4] [--repeat 3] [--loop asyncio|uvloop] [--profile DIR]

The simulator, the ``durable`` floor (``servers.durable_app``: a pass-through plus the two durable writes any
proxy that must not lose a paid job makes) and the gateway each run in a process of their own; wrk sends
submits with bodies no other request has, at 1, 16 and 64 connections, the two servers interleaved, each cell
``--repeat`` times (medians). Before and after each cell the CPU time of every thread of the server under load
is read from ``/proc/<pid>/task/*/stat``, so the table gives microseconds of CPU per accepted submit, in all
and on its busiest threads (the event loop, the store's writer). ``--profile DIR`` also records the gateway
with py-spy at 16 connections (a flame graph and the top functions, ``DIR/gateway-16.*``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.run import (
    KEY,
    SECRET,
    SUBMIT,
    Server,
    bench_server,
    bench_team,
    drain,
    free_port,
    median,
    post,
    start_gateway,
    table,
    wrk,
)

CONNECTIONS = (1, 16, 64)
TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of ``pid``, by thread name (threads of one name added up)."""
    found: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        name = "event loop" if tid == str(pid) else name  # Python names no OS thread: the rest are "python"
        found[name] = found.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--profile", type=Path, help="also record the gateway with py-spy at 16 connections")
    parser.add_argument("--out", type=Path, help="write the tables here too (markdown)")
    parser.add_argument("--baseline", type=Path, help="a checkout of another version (git worktree add DIR REV): its "
                                                      "gateway runs too, interleaved with this one, on a store of its own")
    args = parser.parse_args()
    assert shutil.which("wrk"), "wrk is needed: apt-get install wrk"
    work = Path(tempfile.mkdtemp(prefix="pixazo-submit-cost-"))
    db = work / "bench.db"
    token = bench_team(db)
    simulator = bench_server("simulator", args.loop, "--key", KEY)
    durable = bench_server("durable", args.loop, "--upstream", simulator.url, "--db", str(work / "durable.db"))
    gateway = start_gateway(db, simulator.url, args.loop)
    baseline = None
    stores = {"gateway": db}
    if args.baseline:
        stores["baseline"] = work / "baseline.db"
        bench_team(stores["baseline"])
        port = free_port()
        baseline = Server("baseline", [sys.executable, "-m", "proxy.cli", "serve"], {
            "PIXAZO_API_KEY": KEY, "PROXY_JWT_SECRET": SECRET, "PROXY_DB": str(stores["baseline"]),
            "PIXAZO_UPSTREAM_URL": simulator.url, "PROXY_POLICIES": str(args.baseline / "policies"),
            "PROXY_PORT": str(port), "PROXY_EVENT_LOOP": args.loop, "PYTHONPATH": str(args.baseline)}, port,
            cwd=args.baseline)
    try:
        keeps = {name: post(server.url + SUBMIT, {"prompt": "warm-up"}, {"Ocp-Apim-Subscription-Key": token})["request_id"]
                 for name, server in (("gateway", gateway), ("baseline", baseline)) if server is not None}
        keep = keeps["gateway"]
        servers = {"durable": (durable, KEY), "gateway": (gateway, token)}
        if baseline is not None:
            servers["baseline"] = (baseline, token)
        rows, cpu_rows = [], []
        for connections in CONNECTIONS:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            cpu: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            for _ in range(args.repeat):
                for name, (server, key) in servers.items():
                    for other, store in stores.items():  # settlements of the last cell are not charged to this one
                        drain(store, keeps[other])
                    before = thread_cpu(server.process.pid)
                    found = wrk(server.url, SUBMIT, key, "POST", connections, args.seconds)
                    after = thread_cpu(server.process.pid)
                    runs[name].append(found)
                    done = max(1.0, found["rps"] * args.seconds)
                    cpu[name].append({thread: 1e6 * (after[thread] - before.get(thread, 0.0)) / done for thread in after})
            d = median(runs["durable"])
            for name in (n for n in servers if n != "durable"):
                g = median(runs[name])
                rows.append([str(connections), name, f"{d['rps']:.0f}", f"{g['rps']:.0f}", f"{g['rps'] / d['rps']:.2f}",
                             f"{d['p50']:.2f} / {d['p99']:.2f}", f"{g['p50']:.2f} / {g['p99']:.2f}",
                             f"{g['p50'] - d['p50']:+.2f}", str(int(d["errors"] + g["errors"]))])
                print(rows[-1], flush=True)
            for name in servers:
                threads = sorted({t for sample in cpu[name] for t in sample})
                per = {t: sorted(sample.get(t, 0.0) for sample in cpu[name])[len(cpu[name]) // 2] for t in threads}
                total = sorted(sum(sample.values()) for sample in cpu[name])[len(cpu[name]) // 2]
                busiest = sorted(per.items(), key=lambda item: -item[1])[:3]
                cpu_rows.append([str(connections), name, f"{total:.0f}",
                                 ", ".join(f"{thread} {value:.0f}" for thread, value in busiest)])
                print(cpu_rows[-1], flush=True)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            drain(db, keep)
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))  # pip install py-spy
            recorder = subprocess.Popen([spy, "record", "--pid", str(gateway.process.pid), "--rate", "250",
                                         "--duration", str(args.seconds + 2), "--format", "raw",
                                         "--output", str(args.profile / "gateway-16.txt"), "--threads"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            wrk(gateway.url, SUBMIT, token, "POST", 16, args.seconds)
            recorder.wait(timeout=60)
            print(f"py-spy samples: {args.profile / 'gateway-16.txt'}")
    finally:
        for server in (gateway, baseline, durable, simulator):
            if server is not None:
                server.stop()
    text = "\n".join([
        f"Submits, SQLite synchronous=FULL, event loop {args.loop}, wrk -t1, {args.seconds} s per cell, median of "
        f"{args.repeat} interleaved rounds.", "",
        table(rows, ["conns", "version", "durable req/s", "gateway req/s", "gateway / durable", "durable ms (p50 / p99)",
                     "gateway ms (p50 / p99)", "gateway p50 over durable, ms", "non-2xx"]), "",
        "CPU per accepted submit, microseconds (medians), in all and on the three busiest threads:", "",
        table(cpu_rows, ["conns", "server", "CPU µs per submit", "busiest threads (µs)"]), ""])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
